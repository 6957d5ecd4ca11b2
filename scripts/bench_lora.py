"""Time the Triton multi-LoRA ops on one Llama-2-7B decoder layer (CUDA only).

    python scripts/bench_lora.py [--rank 16] [--dtype float16]
    python scripts/bench_lora.py --sweep   # block configs of shrink and expand at batch 32, distinct
    python scripts/bench_lora.py --sweep --sweep-batch 1024 --sweep-workload uniform   # prefill sizes

Per row: shrink + expand for all 7 projections (fused q/k/v as 3 slices, o, fused gate/up as 2
slices, down), captured once in a CUDA graph and replayed; median of CUDA-event timings from
``triton.testing.do_bench``, which flushes L2 before every replay, so adapters come from HBM as in
a real forward (so does the small metadata, which a real forward keeps in L2 across layers: small
batches read pessimistic here). The roofline counts the bytes that must move: A and B of the
distinct adapters in the batch at their real ranks, x read once per projection group, y read and
written. Workloads: distinct (one adapter per token), uniform (round(sqrt(batch)) adapters),
identical (one adapter).
Writes the table to $OUT/lora_bench.md when OUT is set.
"""

from __future__ import annotations

import argparse
import math
import os

import torch

HBM_BYTES_PER_S = 2.99e12  # measured device-to-device copy on the H100 (docs: DESIGN.md §6)
HIDDEN, INTERMEDIATE = 4096, 11008
# name -> (in_features, output slice widths): Llama-2-7B has as many KV heads as query heads.
LAYER = {"qkv": (HIDDEN, (HIDDEN,) * 3), "o": (HIDDEN, (HIDDEN,)),
         "gate_up": (HIDDEN, (INTERMEDIATE,) * 2), "down": (INTERMEDIATE, (HIDDEN,))}


def build_layer(max_loras: int, max_rank: int, dtype: torch.dtype) -> dict:
    """Random adapter slots for every projection group (scaled so y stays finite over many replays)."""
    layer = {}
    for name, (in_features, widths) in LAYER.items():
        a = [torch.randn(max_loras, max_rank, in_features, device="cuda", dtype=dtype) / in_features ** 0.5
             for _ in widths]
        b = [torch.randn(max_loras, w, max_rank, device="cuda", dtype=dtype) * 1e-3 for w in widths]
        layer[name] = (a, b)
    return layer


def workload_slots(workload: str, batch: int) -> torch.Tensor:
    num_adapters = {"distinct": batch, "uniform": max(1, round(math.sqrt(batch))), "identical": 1}[workload]
    return (torch.arange(batch, device="cuda") % num_adapters).to(torch.int32)


def roofline_bytes(slots: torch.Tensor, ranks: torch.Tensor, elem: int) -> int:
    batch = slots.shape[0]
    used_ranks = ranks[slots.unique().long()].sum().item()
    total = 0
    for in_features, widths in LAYER.values():
        total += used_ranks * (in_features * len(widths) + sum(widths)) * elem  # A and B rows read
        total += batch * (in_features + 2 * sum(widths)) * elem  # x read, y read + written
    return total


def time_layer(layer: dict, slots: torch.Tensor, ranks: torch.Tensor, dtype: torch.dtype) -> float:
    """Median µs of one replay of shrink + expand over the 7 projections (metadata prepared once)."""
    import triton.testing

    from inlaid.kernels.lora import LoraBatchMeta, lora_expand, lora_shrink

    batch, max_loras = slots.shape[0], ranks.shape[0]
    meta = LoraBatchMeta(batch, max_loras, "cuda").prepare(slots)
    scalings = torch.ones(max_loras, device="cuda")
    xs = {n: torch.randn(batch, in_f, device="cuda", dtype=dtype) for n, (in_f, _) in LAYER.items()}
    ys = {n: torch.zeros(batch, sum(w), device="cuda", dtype=dtype) for n, (_, w) in LAYER.items()}
    bufs = {n: torch.empty(len(b), batch, b[0].shape[2], device="cuda") for n, (_, b) in layer.items()}

    def forward():
        for name, (a, b) in layer.items():
            lora_shrink(xs[name], a, meta, ranks, scalings, out=bufs[name], backend="triton")
            lora_expand(bufs[name], b, meta, ranks, ys[name], backend="triton")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        forward()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        forward()
    return triton.testing.do_bench(graph.replay, warmup=25, rep=200, return_mode="median") * 1e3


def bench_row(batch: int, workload: str, rank_set: tuple[int, ...], max_rank: int,
              dtype: torch.dtype, label: str) -> str:
    slots = workload_slots(workload, batch)
    max_loras = max(batch, 32)
    ranks = torch.tensor([rank_set[i % len(rank_set)] for i in range(max_loras)], dtype=torch.int32,
                         device="cuda")
    layer = build_layer(max_loras, max_rank, dtype)
    us = time_layer(layer, slots, ranks, dtype)
    moved = roofline_bytes(slots, ranks, torch.finfo(dtype).bits // 8)
    floor_us = moved / HBM_BYTES_PER_S * 1e6
    del layer
    torch.cuda.empty_cache()
    return (f"| {batch} | {label} | {us:.1f} | {moved / 1e6:.2f} | {moved / us / 1e3:.0f} | "
            f"{floor_us:.1f} | {floor_us / us:.2f} |")


def sweep(rank: int, dtype: torch.dtype, batch: int = 32, workload: str = "distinct") -> None:
    """Time the layer with each candidate config of one kernel (the other at its default) for a
    batch of ``batch`` tokens (``workload_slots``); prints the default and the five fastest per
    kernel."""
    import itertools

    from inlaid.kernels.triton import lora_expand, lora_shrink

    slots = workload_slots(workload, batch)
    ranks = torch.full((max(batch, 32),), rank, dtype=torch.int32, device="cuda")
    layer = build_layer(ranks.shape[0], rank, dtype)
    floor_us = roofline_bytes(slots, ranks, torch.finfo(dtype).bits // 8) / HBM_BYTES_PER_S * 1e6
    spaces = {
        "shrink": (lora_shrink, "shrink_config", [
            dict(BLOCK_N=16, BLOCK_K=bk, SPLIT_K=sk, num_warps=nw, num_stages=st)
            for bk, sk, nw, st in itertools.product((64, 128, 256), (1, 2, 4, 8, 16, 32), (2, 4), (2, 3))]),
        "expand": (lora_expand, "expand_config", [
            dict(BLOCK_N=bn, BLOCK_K=16, num_warps=nw, num_stages=st)
            for bn, nw, st in itertools.product((128, 256, 512, 1024), (2, 4, 8), (1, 2))]),
    }
    for name, (module, attr, configs) in spaces.items():
        default = getattr(module, attr)
        times = []
        try:
            for cfg in configs:
                setattr(module, attr, lambda *_, cfg=cfg: dict(cfg))
                times.append((time_layer(layer, slots, ranks, dtype), cfg))
        finally:
            setattr(module, attr, default)
        base = time_layer(layer, slots, ranks, dtype)
        times.sort(key=lambda item: item[0])
        print(f"sweep {name}, batch {batch} {workload} rank {rank}: default {base:.1f} µs "
              f"({floor_us / base:.0%} of the layer's floor {floor_us:.1f} µs); best: "
              + "; ".join(f"{us:.1f} µs {cfg}" for us, cfg in times[:5]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--batches", default="1,8,32,128")
    parser.add_argument("--sweep", action="store_true", help="sweep the kernels' block configs")
    parser.add_argument("--sweep-batch", type=int, default=32, help="--sweep: tokens in the batch")
    parser.add_argument("--sweep-workload", default="distinct", choices=["distinct", "uniform", "identical"],
                        help="--sweep: how the tokens spread over adapters")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA, skipping")
        return
    dtype = getattr(torch, args.dtype)
    if args.sweep:
        sweep(args.rank, dtype, args.sweep_batch, args.sweep_workload)
        return
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        for workload in ("distinct", "uniform", "identical"):
            rows.append(bench_row(batch, workload, (args.rank,), args.rank, dtype, workload))
            print(rows[-1], flush=True)
    for rank_set, label in (((8, 16, 32, 64), "distinct, ranks 8/16/32/64"),
                            ((64,), "distinct, all rank 64")):
        rows.append(bench_row(32, "distinct", rank_set, 64, dtype, label))
        print(rows[-1], flush=True)
    head = (f"One Llama-2-7B layer, all 7 projections, shrink + expand, rank {args.rank} unless noted, "
            f"{args.dtype}, {torch.cuda.get_device_name()}; roofline at "
            f"{HBM_BYTES_PER_S / 1e12:.2f} TB/s; L2 flushed before each replay.\n\n"
            "| batch | workload | µs | MB moved | GB/s | roofline µs | fraction of roofline |\n"
            "|---|---|---|---|---|---|---|")
    table = "\n".join([head, *rows])
    print("\n" + table)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "lora_bench.md"), "w") as fh:
            fh.write(table + "\n")


if __name__ == "__main__":
    main()
