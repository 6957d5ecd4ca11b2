"""``inlaid quantize`` and ``inlaid add-task``: flags -> QuantConfig -> inlaid.quant.pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from inlaid.cli.progress import RichReporter, console, summary_table
from inlaid.config import QuantConfig, TaskSpec
from inlaid.quant import pipeline

TaskOpt = Annotated[list[str], typer.Option(
    "--task", "-t", help="NAME=ADAPTER_DIR:DATA_FILE (repeatable). ADAPTER_DIR may be 'none'.")]
_D = QuantConfig()  # flag defaults come from the config, so the two cannot drift apart
DeviceOpt = Annotated[Optional[str], typer.Option(
    "--device", help="Compute device (default: cuda when available, else cpu).")]
# QuantConfig fields only calibration and the GPTQ solve read -> the flag that sets them off default
_CALIBRATION_FLAGS = {"samples": "--samples", "seq_len": "--seq-len", "seed": "--seed", "damp_percent": "--damp",
                      "desc_act": "--desc-act", "static_groups": "--static-groups", "aggregation": "--aggregation",
                      "propagation": "--propagation", "with_adapters": "--without-adapters"}


def _rtn_note(cfg: QuantConfig) -> str | None:
    """A note naming the flags --method rtn ignores, when any was set: rtn never calibrates, and a
    flag that silently does nothing reads as if it had been applied."""
    if cfg.method != "rtn":
        return None
    ignored = [flag for key, flag in _CALIBRATION_FLAGS.items() if getattr(cfg, key) != getattr(_D, key)]
    if not ignored:
        return None
    return (f"note: --method rtn rounds each weight on its own, without calibration data: "
            f"{', '.join(ignored)} {'has' if len(ignored) == 1 else 'have'} no effect")


def _report(report) -> None:
    if report.errors:
        console.print(summary_table(report))
    console.print(f"wrote {report.out_dir} (tasks: {', '.join(report.tasks)}) in "
                  f"{report.total_seconds:.1f}s; incremental state {report.state_bytes / 2**20:.1f} MiB")


def quantize_cmd(
    base: Annotated[str, typer.Argument(help="HF safetensors dir, .gguf file, hub id, or 'default'.")],
    out_dir: Annotated[Path, typer.Argument(help="Output checkpoint directory.")],
    task: TaskOpt,
    bits: Annotated[int, typer.Option(help="2, 3, 4 or 8.")] = _D.bits,
    group_size: Annotated[int, typer.Option(help="-1 (per row), 32, 64 or 128.")] = _D.group_size,
    sym: Annotated[bool, typer.Option("--sym/--asym", help="Symmetric or asymmetric grid.")] = _D.sym,
    desc_act: Annotated[bool, typer.Option("--desc-act/--no-desc-act", help="Act-order.")] = _D.desc_act,
    static_groups: Annotated[bool, typer.Option(help="Fix group grids before act-order.")] = _D.static_groups,
    damp: Annotated[float, typer.Option(help="Damping as a fraction of mean(diag H).")] = _D.damp_percent,
    method: Annotated[str, typer.Option(help="gptq, or rtn (round-to-nearest baseline).")] = _D.method,
    aggregation: Annotated[str, typer.Option(
        help="mean (task-balanced), mix (pooled = plain GPTQ) or max (LoRA-Inlaid).")] = _D.aggregation,
    propagation: Annotated[str, typer.Option(help="fp (exact add-task) or quantized.")] = _D.propagation,
    with_adapters: Annotated[bool, typer.Option(
        "--with-adapters/--without-adapters",
        help="Calibrate with each task's adapter active (MLGPTQ) or on the base alone.")] = _D.with_adapters,
    samples: Annotated[int, typer.Option(help="Calibration sequences per task.")] = _D.samples,
    seq_len: Annotated[int, typer.Option(help="Max tokens per calibration sequence.")] = _D.seq_len,
    seed: Annotated[int, typer.Option(help="Seed for sampling calibration rows.")] = _D.seed,
    device: DeviceOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT_DIR if it exists.")] = False,
) -> None:
    """Quantize BASE once for all tasks (multi-task GPTQ) into OUT_DIR."""
    cfg = QuantConfig(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act,
                      static_groups=static_groups, damp_percent=damp, method=method,
                      aggregation=aggregation, propagation=propagation, with_adapters=with_adapters,
                      samples=samples, seq_len=seq_len, seed=seed)
    specs = [TaskSpec.parse(t) for t in task]
    note = _rtn_note(cfg)
    if note:
        console.print(f"[yellow]{note}[/yellow]", soft_wrap=True)
    with RichReporter() as reporter:
        report = pipeline.quantize(base, out_dir, specs, cfg, device=device, overwrite=overwrite,
                                   reporter=reporter)
    _report(report)


def add_task_cmd(
    out_dir: Annotated[Path, typer.Argument(help="An existing inlaid checkpoint.")],
    task: TaskOpt,
    base: Annotated[Optional[str], typer.Option(
        help="Base model (default: the one recorded in the checkpoint).")] = None,
    bits: Annotated[Optional[int], typer.Option(help="Must match the checkpoint if given.")] = None,
    group_size: Annotated[Optional[int], typer.Option(help="Must match if given.")] = None,
    aggregation: Annotated[Optional[str], typer.Option(help="Must match if given.")] = None,
    propagation: Annotated[Optional[str], typer.Option(help="Must match if given.")] = None,
    device: DeviceOpt = None,
) -> None:
    """Fold new tasks into OUT_DIR incrementally (forwards for the new tasks only)."""
    specs = [TaskSpec.parse(t) for t in task]
    overrides = {"bits": bits, "group_size": group_size, "aggregation": aggregation,
                 "propagation": propagation}
    with RichReporter() as reporter:
        report = pipeline.add_task(out_dir, specs, base_source=base, overrides=overrides,
                                   device=device, reporter=reporter)
    _report(report)
