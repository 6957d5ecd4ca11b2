"""Block sizes of the Triton LoRA shrink (``inlaid.kernels.triton.lora_shrink``) from host-known
shapes only, so a captured CUDA graph keeps its config: Triton-free, so CPU tests can check the
rule."""

from __future__ import annotations


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def shrink_config(num_tokens: int, max_rank: int, k: int) -> dict:
    """The shrink's blocks (BLOCK_M is the metadata's tile height).

    Decode (few tokens per slot) is latency-bound: the A read is split over several programs per
    (tile, rank tile, slice), about two K steps each, so many loads are in flight at once; split K
    fades out as T grows and tiles alone fill the GPU. Picked by a sweep on an H100 over
    scripts/bench_lora.py shapes, then in the engine: the shrink runs on a side stream beside the
    4-bit GEMM, and from 17 tokens on its programs compete with the GEMM's, so there it splits over
    at most 8 programs, not 16 (batch-32 decode over 32 adapters 1.1-1.6% faster, batch 1 and 8
    and the 8-adapter batch 32 a tie or within 0.6%: docs/results/gpu_ab_shrink_2643059.log)."""
    if num_tokens <= 64:
        cap = 16 if num_tokens <= 16 else 8
        split_k = max(1, min(cap, _cdiv(k, 128) // 2))
        return dict(BLOCK_N=16, BLOCK_K=128, SPLIT_K=split_k, num_warps=4, num_stages=3)
    block_n = min(64, max(16, _next_power_of_2(max_rank)))
    split_k = 4 if num_tokens <= 512 else 1
    return dict(BLOCK_N=block_n, BLOCK_K=128, SPLIT_K=split_k, num_warps=4, num_stages=3)
