"""Time the Triton paged decode attention kernel by variant, loop tile, warps and stages (CUDA only).

    python scripts/bench_attention.py [--batches 1,8,32,128] [--contexts 192,1024] [--variants fma,mma]

Llama-2-7B's attention (32 heads, head_dim 128, no GQA), 16-token KV blocks scattered at random over
the cache, one layer. Per row: the median µs of ``triton.testing.do_bench`` (L2 flushed before each
call, so K/V come from HBM as in a real step) and the fraction of the bytes floor: every context
token's K and V read once, at the HBM bandwidth measured in docs/results/kernels.md.
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
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA, skipping")
        return
    import triton.testing

    from inlaid.kernels.triton.paged_attention import paged_decode_attention

    ints = lambda text: [int(v) for v in text.split(",")]  # noqa: E731
    print("| batch | context | variant | tile | warps | stages | µs | % of bytes floor |\n"
          "|---|---|---|---|---|---|---|---|")
    for batch, context in itertools.product(ints(args.batches), ints(args.contexts)):
        blocks_per_seq = -(-context // BLOCK)
        num_blocks = batch * blocks_per_seq
        k = torch.randn(num_blocks * BLOCK, HEADS, DIM, device="cuda", dtype=torch.float16)
        v = torch.randn_like(k)
        tables = torch.randperm(num_blocks, device="cuda").to(torch.int32).view(batch, blocks_per_seq)
        lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
        q = torch.randn(batch, HEADS, DIM, device="cuda", dtype=torch.float16)
        out = torch.empty_like(q)
        floor_us = batch * context * 2 * HEADS * DIM * 2 / HBM_BYTES_PER_S * 1e6
        configs = itertools.product(args.variants.split(","), ints(args.tiles), ints(args.warps),
                                    ints(args.stages))
        for variant, tile, warps, stages in configs:
            if variant == "fma" and stages != ints(args.stages)[0]:
                continue  # its loop has no dot for Triton to pipeline: stages change nothing
            def call(tile=tile, warps=warps, variant=variant, stages=stages):
                paged_decode_attention(q, k, v, tables, lens, BLOCK, DIM ** -0.5, out=out, tile=tile,
                                       num_warps=warps, variant=variant, num_stages=stages)
            us = triton.testing.do_bench(call, warmup=10, rep=100, return_mode="median") * 1e3
            print(f"| {batch} | {context} | {variant} | {tile} | {warps} | {stages} | {us:.1f} "
                  f"| {floor_us / us:.0%} |", flush=True)
        del k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
