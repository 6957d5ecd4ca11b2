"""Time the Triton paged decode attention kernel by variant, loop tile, warps and stages (CUDA only).

    python scripts/bench_attention.py [--batches 1,8,32,128] [--contexts 192,1024] [--variants fma,mma]
                                      [--tiles ...] [--warps ...] [--stages ...] [--splits auto,1,2,...]
                                      [--layouts token,head]

Llama-2-7B's attention (32 heads, head_dim 128, no GQA), 16-token KV blocks scattered at random over
the cache, one layer. Per row: the median µs of ``triton.testing.do_bench`` (L2 flushed before each
call, so K/V come from HBM as in a real step) and the fraction of the bytes floor: every context
token's K and V read once, at the HBM bandwidth measured in docs/results/kernels.md.

Layouts of the cache (the kernels take its strides): ``token`` [slots, heads, D], a token's heads
side by side, so one (sequence, head)'s K rows are 256-byte pieces 8 KB apart; ``head`` the same
shape as a view of [heads, slots, D], so a block's 16 rows of one head are 4 KB in one piece.
"""

from __future__ import annotations

import argparse
import itertools

import torch

HBM_BYTES_PER_S = 2.99e12
HEADS, DIM, BLOCK = 32, 128, 16


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="1,8,32,128")
    parser.add_argument("--contexts", default="192,1024")
    parser.add_argument("--tiles", default="16,32,64,128")
    parser.add_argument("--warps", default="4,8")
    parser.add_argument("--variants", default="fma,mma")
    parser.add_argument("--stages", default="2,3", help="software-pipeline stages (the mma variant's loads)")
    parser.add_argument("--splits", default="auto",
                        help="programs per (sequence, KV head), the mma variant only; auto: decode_splits")
    parser.add_argument("--layouts", default="token", help="cache layouts: token, head (see above)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA, skipping")
        return
    import triton.testing

    from inlaid.kernels.decode_splits import decode_splits
    from inlaid.kernels.triton.paged_attention import paged_decode_attention

    ints = lambda text: [int(v) for v in text.split(",")]  # noqa: E731
    print("| batch | context | layout | variant | tile | warps | stages | splits | µs | % of bytes floor |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    for batch, context, layout in itertools.product(ints(args.batches), ints(args.contexts),
                                                    args.layouts.split(",")):
        blocks_per_seq = -(-context // BLOCK)
        num_blocks = batch * blocks_per_seq
        if layout not in ("token", "head"):
            raise SystemExit(f"unknown layout {layout!r}")
        shape = (num_blocks * BLOCK, HEADS, DIM) if layout == "token" else (HEADS, num_blocks * BLOCK, DIM)
        k, v = (torch.randn(shape, device="cuda", dtype=torch.float16) for _ in range(2))
        if layout == "head":
            k, v = k.transpose(0, 1), v.transpose(0, 1)
        tables = torch.randperm(num_blocks, device="cuda").to(torch.int32).view(batch, blocks_per_seq)
        lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
        q = torch.randn(batch, HEADS, DIM, device="cuda", dtype=torch.float16)
        out = torch.empty_like(q)
        floor_us = batch * context * 2 * HEADS * DIM * 2 / HBM_BYTES_PER_S * 1e6
        configs = itertools.product(args.variants.split(","), ints(args.tiles), ints(args.warps),
                                    ints(args.stages), args.splits.split(","))
        for variant, tile, warps, stages, split_arg in configs:
            if variant == "fma" and (stages != ints(args.stages)[0] or split_arg != "auto"):
                continue  # its loop has no dot for Triton to pipeline, and it has no splits
            splits = None if split_arg == "auto" or variant == "fma" else int(split_arg)
            if splits is None and variant == "mma":
                split_arg = f"auto ({decode_splits(batch, HEADS, blocks_per_seq, BLOCK, max(16, tile))})"

            def call(tile=tile, warps=warps, variant=variant, stages=stages, splits=splits):
                paged_decode_attention(q, k, v, tables, lens, BLOCK, DIM ** -0.5, out=out, tile=tile,
                                       num_warps=warps, variant=variant, num_stages=stages, splits=splits)
            us = triton.testing.do_bench(call, warmup=10, rep=100, return_mode="median") * 1e3
            print(f"| {batch} | {context} | {layout} | {variant} | {tile} | {warps} | {stages} | {split_arg} | {us:.1f} "
                  f"| {floor_us / us:.0%} |", flush=True)
        del k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
