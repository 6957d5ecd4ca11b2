"""Time multi-task GPTQ per decoder layer on a GPU, on Llama-2-7B layer shapes with random weights.

    python scripts/gpu_quant_timing.py [--layers 2] [--tasks 4] [--samples 128] [--seq-len 512]

Random weights, random rank-16 adapters on all 7 projections, random token ids: no checkpoint has to
reach the GPU machine. Prints one row per (propagation, layer) with seconds, and writes the table to
$OUT/quant_timing.md when OUT is set.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from safetensors.torch import save_file

from inlaid.bench.report import emit
from inlaid.config import QuantConfig
from inlaid.model.dummy import dummy_model, random_adapter
from inlaid.quant.calib_data import random_calibration
from inlaid.quant.calibrate import CalibTask, calibrate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama-2-7b")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--export", default=os.environ.get("INLAID_EXPORTED_LAYER"),
                        help="write layer 0's packed q_proj/down_proj here (safetensors)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: skipping GPU quantization timing")
        return
    rows = []
    for propagation in ("fp", "quantized"):
        model = dummy_model(args.shape, args.layers)
        tasks = [CalibTask(name=f"t{i}", adapter=random_adapter(model.config, f"t{i}", 16, seed=i),
                           samples=random_calibration(model.config.vocab_size, samples=args.samples,
                                                      seq_len=args.seq_len, seed=0, task=f"t{i}"))
                 for i in range(args.tasks)]
        cfg = QuantConfig(bits=4, group_size=128, aggregation="max", propagation=propagation,
                          samples=args.samples, seq_len=args.seq_len)
        torch.cuda.synchronize()
        started = time.perf_counter()
        result = calibrate(model, tasks, cfg, device="cuda", dtype=torch.float16)
        torch.cuda.synchronize()
        total = time.perf_counter() - started
        if propagation == "fp" and args.export:
            # Hand one GPTQ-solved layer to exllama_check.py: real solver output, not RTN.
            tensors = {}
            for name, packed in result.packed.items():
                if name.startswith("model.layers.0.") and name.endswith(("q_proj", "down_proj")):
                    tensors.update(packed.tensors(name))
            save_file(tensors, args.export)
        for layer, seconds in enumerate(result.layer_seconds):
            errs = result.errors[layer]
            rows.append((propagation, layer, seconds, min(errs.values()), max(errs.values())))
        rows.append((propagation, "total", total, float("nan"), float("nan")))
        del model, tasks, result
        torch.cuda.empty_cache()
    header = (f"{args.shape} shapes, {args.tasks} tasks x {args.samples} samples x {args.seq_len} tokens, "
              f"4-bit g128, aggregation max, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    lines = [header, "", "| propagation | layer | seconds | min task rel. err | max task rel. err |",
             "|---|---|---|---|---|"]
    lines += [f"| {p} | {l} | {s:.2f} | {a:.3e} | {b:.3e} |" for p, l, s, a, b in rows]
    text = "\n".join(lines)
    emit(text, "quant_timing.md")


if __name__ == "__main__":
    main()
