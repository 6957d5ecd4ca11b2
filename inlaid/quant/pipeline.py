"""``quantize`` and ``add_task``: validate everything, run the driver, write the checkpoint atomically.

All input checks happen before the (long) calibration starts, so bad input fails in seconds and
nothing is written.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from inlaid.config import SUPPORTED_GROUP_SIZES, QuantConfig, TaskSpec
from inlaid.device import pick_device
from inlaid.errors import CheckpointError, ConfigError
from inlaid.model.arch import PROJECTIONS, get_projection, module_path, projection_shapes
from inlaid.model.loader import LoadedModel, fingerprint, load_base
from inlaid.paths import check_writable_dir
from inlaid.model.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraAdapter, load_adapter, sha256_file, \
    validate_adapter
from inlaid.quant.calib_data import load_calibration
from inlaid.quant.calibrate import CalibrationResult, CalibTask, Reporter, calibrate
from inlaid.quant.checkpoint import (ADAPTERS_DIR, FORMAT_VERSION, REPORT, TASKS, CheckpointWriter,
                                     quantization_config, read_checkpoint, write_model)
from inlaid.quant.primitives import pack_linear, rtn_quantize


@dataclass
class QuantizeReport:
    out_dir: Path
    tasks: list[str]
    errors: dict[int, dict[str, float]] = field(default_factory=dict)
    layer_seconds: list[float] = field(default_factory=list)
    total_seconds: float = 0.0
    state_bytes: int = 0


def check_out_dir(out_dir: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse, before any work, an OUT_DIR whose replacement would lose something: a file, a
    directory that holds an input (the base, an adapter, a data file) or the working directory, and
    with --overwrite a non-empty directory that is not an inlaid checkpoint."""
    check_writable_dir(out_dir, "OUT_DIR")
    out = out_dir.resolve()
    for path in [*(p for p in inputs if p.exists()), Path.cwd()]:
        if path.resolve().is_relative_to(out):
            what = "the working directory" if path == Path.cwd() else f"the input {path}"
            raise ConfigError(f"{out_dir} holds {what}; replacing it would delete that: pick another OUT_DIR")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"{out_dir} exists and is not empty (pass --overwrite to replace it)")
        try:  # a checkpoint with broken weights may still be replaced
            read_checkpoint(out, check_weights=False)
        except CheckpointError:
            raise ConfigError(f"{out_dir} is not an inlaid checkpoint: --overwrite only replaces "
                              "checkpoints; remove it yourself or pick another OUT_DIR") from None


def check_task_specs(specs: list[TaskSpec], existing: tuple[str, ...] = ()) -> None:
    if not specs:
        raise ConfigError("give at least one --task NAME=ADAPTER_DIR:DATA_FILE")
    seen = set(existing)
    for spec in specs:
        if spec.name in seen:
            raise ConfigError(f"duplicate task name {spec.name!r}")
        seen.add(spec.name)
        if spec.adapter is not None and not spec.adapter.exists():
            raise ConfigError(f"task {spec.name!r}: adapter not found: {spec.adapter}")
        if not spec.data.exists():
            raise ConfigError(f"task {spec.name!r}: calibration data not found: {spec.data}")


def check_shapes(config, cfg: QuantConfig) -> None:
    shapes = projection_shapes(config)
    for proj, (out_f, in_f) in shapes.items():
        if cfg.group_size != -1 and in_f % cfg.group_size:
            fits = [g for g in SUPPORTED_GROUP_SIZES if g == -1 or all(i % g == 0 for _, i in shapes.values())]
            raise ConfigError(f"--group-size {cfg.group_size} does not divide {proj} in_features {in_f} "
                              f"(group sizes that fit this model: {', '.join(map(str, fits))})")
        if in_f % 32 or out_f % 32:
            raise ConfigError(f"{proj} is {out_f}x{in_f}: the GPTQ layout needs multiples of 32")


def _prepare_tasks(specs: list[TaskSpec], base: LoadedModel, cfg: QuantConfig):
    adapters: dict[str, LoraAdapter | None] = {}
    for spec in specs:
        adapter = None
        if spec.adapter is not None:
            adapter = load_adapter(spec.adapter, spec.name)
            validate_adapter(adapter, base.config)
        adapters[spec.name] = adapter
    tasks = []
    for spec in specs:
        samples = [] if cfg.method == "rtn" else load_calibration(
            spec.data, base.tokenizer, samples=cfg.samples, seq_len=cfg.seq_len,
            min_tokens=cfg.min_tokens, seed=cfg.seed, task=spec.name)
        active = adapters[spec.name] if cfg.with_adapters else None
        tasks.append(CalibTask(name=spec.name, adapter=active, samples=samples))
    return adapters, tasks


def _manifest_entry(spec: TaskSpec, adapter: LoraAdapter | None, task: CalibTask) -> dict:
    entry = {"name": spec.name, "data": str(spec.data.resolve()), "data_sha256": sha256_file(spec.data),
             "samples": len(task.samples), "tokens": int(sum(s.shape[1] for s in task.samples)),
             "adapter": None, "adapter_sha256": None, "rank": None, "target_modules": None}
    if adapter is not None:
        entry.update(adapter=str(spec.adapter.resolve()),
                     adapter_sha256=sha256_file(spec.adapter / ADAPTER_WEIGHTS),
                     rank=adapter.max_rank, target_modules=adapter.target_modules)
    return entry


def _copy_adapter(spec: TaskSpec, dest_root: Path) -> None:
    if spec.adapter is None:
        return
    dest = dest_root / ADAPTERS_DIR / spec.name
    dest.mkdir(parents=True)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        shutil.copy2(spec.adapter / name, dest / name)


def _rtn(model, cfg: QuantConfig) -> CalibrationResult:
    result = CalibrationResult()
    for index, layer in enumerate(model.model.layers):
        for proj in PROJECTIONS:
            module = get_projection(layer, proj)
            _, codes, scales, zeros, g_idx = rtn_quantize(module.weight.detach(), cfg.bits,
                                                          cfg.group_size, cfg.sym)
            bias = None if module.bias is None else module.bias.detach()
            result.packed[module_path(index, proj)] = pack_linear(codes, scales, zeros, g_idx,
                                                                  cfg.bits, bias)
    return result


def compute_dtype(device: torch.device) -> torch.dtype:
    """fp16 layer forwards on GPU (as the GPTQ reference), fp32 on CPU (fp16 matmuls are slow there)."""
    return torch.float16 if device.type == "cuda" else torch.float32


def _run(base: LoadedModel, tasks, cfg, writer, device, reporter, prior_states=None):
    dtype = compute_dtype(device)
    if cfg.method == "rtn":
        return _rtn(base.model, cfg)
    return calibrate(base.model, tasks, cfg, device=device, dtype=dtype, prior_states=prior_states,
                     state_sink=writer.write_state, reporter=reporter)


def _finish(writer: CheckpointWriter, base: LoadedModel, result: CalibrationResult, cfg: QuantConfig,
            manifest: list[dict], base_info: dict, started: float) -> QuantizeReport:
    block = {"format_version": FORMAT_VERSION, "aggregation": cfg.aggregation,
             "propagation": cfg.propagation, "method": cfg.method,
             "tasks": [t["name"] for t in manifest], "settings": cfg.settings(), "base_model": base_info}
    write_model(writer.path, base.model, result.packed, quantization_config(cfg, block))
    base.tokenizer.save_pretrained(writer.path)
    (writer.path / TASKS).write_text(json.dumps({"tasks": manifest}, indent=2))
    report = QuantizeReport(out_dir=writer.out_dir, tasks=[t["name"] for t in manifest],
                            errors=result.errors, layer_seconds=result.layer_seconds,
                            total_seconds=time.perf_counter() - started)
    report.state_bytes = sum(f.stat().st_size for f in (writer.path / "state").glob("*"))
    (writer.path / REPORT).write_text(json.dumps(
        {"errors": {str(k): v for k, v in report.errors.items()}, "layer_seconds": report.layer_seconds,
         "total_seconds": report.total_seconds, "state_bytes": report.state_bytes}, indent=2))
    writer.commit()
    return report


def quantize(base_source: str, out_dir: Path, specs: list[TaskSpec], cfg: QuantConfig, *,
             device: str | None = None, overwrite: bool = False,
             reporter: Reporter | None = None) -> QuantizeReport:
    started = time.perf_counter()
    out_dir = Path(out_dir)
    check_task_specs(specs)
    inputs = [Path(base_source)] + [p for s in specs for p in (s.adapter, s.data) if p is not None]
    check_out_dir(out_dir, inputs, overwrite)
    dev = pick_device(device)
    base = load_base(base_source, dtype=compute_dtype(dev))
    check_shapes(base.config, cfg)
    adapters, tasks = _prepare_tasks(specs, base, cfg)
    base_info = {"source": base_source, "path": str(base.path.resolve()) if base.path else None,
                 "sha256": fingerprint(base.path)}
    with CheckpointWriter(out_dir, replace=True) as writer:
        result = _run(base, tasks, cfg, writer, dev, reporter)
        for spec in specs:
            _copy_adapter(spec, writer.path)
        manifest = [_manifest_entry(s, adapters[s.name], t) for s, t in zip(specs, tasks)]
        return _finish(writer, base, result, cfg, manifest, base_info, started)


def add_task(out_dir: Path, specs: list[TaskSpec], *, base_source: str | None = None,
             overrides: dict | None = None, device: str | None = None,
             reporter: Reporter | None = None, keep_previous: Path | None = None) -> QuantizeReport:
    """Fold new tasks into an existing checkpoint: forwards for the new tasks only, then re-solve.
    ``keep_previous``: move the replaced checkpoint there instead of deleting it (live task
    addition keeps it until the served model has taken the new one)."""
    started = time.perf_counter()
    ckpt = read_checkpoint(out_dir)
    cfg = ckpt.quant_config()
    for key, value in (overrides or {}).items():
        if value is not None and cfg.settings().get(key) != value:
            raise CheckpointError(f"{out_dir} was made with {key}={cfg.settings().get(key)!r}, not "
                                  f"{value!r}; add-task must use the checkpoint's settings")
    check_task_specs(specs, existing=tuple(t["name"] for t in ckpt.tasks))
    base_info = ckpt.inlaid["base_model"]
    dev = pick_device(device)
    if base_source is None:  # the recorded absolute path works from any directory; a hub id has none
        recorded = base_info.get("path")
        base_source = recorded if recorded and Path(recorded).exists() else base_info["source"]
    base = load_base(base_source, dtype=compute_dtype(dev))
    if base_info.get("sha256") and fingerprint(base.path) != base_info["sha256"]:
        raise CheckpointError(f"base model {base.source!r} differs from the one {out_dir} was made "
                              "from (weights sha256 mismatch)")
    adapters, tasks = _prepare_tasks(specs, base, cfg)
    prior = None if cfg.method == "rtn" else (lambda i: ckpt.load_state(i, dev))
    with CheckpointWriter(out_dir, replace=True, keep_previous=keep_previous) as writer:
        result = _run(base, tasks, cfg, writer, dev, reporter, prior_states=prior)
        if (ckpt.path / ADAPTERS_DIR).is_dir():
            shutil.copytree(ckpt.path / ADAPTERS_DIR, writer.path / ADAPTERS_DIR)
        for spec in specs:
            _copy_adapter(spec, writer.path)
        manifest = ckpt.tasks + [_manifest_entry(s, adapters[s.name], t) for s, t in zip(specs, tasks)]
        return _finish(writer, base, result, cfg, manifest, base_info, started)
