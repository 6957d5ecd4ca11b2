"""How many programs the paged decode attention kernel (``inlaid.kernels.triton.paged_attention``,
mma variant) gives each (sequence, KV head): Triton-free, so CPU tests can check it.

One program per pair walks the whole context. At batch 32 of Llama-2-7B that is 1,024 programs of a
few 64-token tiles each: too few loads in flight to keep HBM busy, and a partly filled last wave.
Splitting each context over several programs (flash-decoding), combined in the kernel by the last
split to finish, puts more of them in flight. The split count comes from shapes the host knows, so a
captured CUDA graph keeps its grid; each program divides its sequence's actual tiles at run time.
"""

from __future__ import annotations

# the grid size below which contexts are split, and the most splits (an H100 sweep:
# docs/results/bench_attention_SPLITS.log)
SPLIT_TARGET = 2048
MAX_SPLITS = 8


def decode_splits(batch: int, kv_heads: int, max_blocks: int, block_size: int, tile: int) -> int:
    """Double the splits while the grid has fewer than ``SPLIT_TARGET`` programs and each split
    still gets a tile of the longest context the block tables (``max_blocks`` wide) hold."""
    tiles = -(-max_blocks * block_size // tile)
    splits = 1
    while splits < MAX_SPLITS and batch * kv_heads * splits < SPLIT_TARGET and 2 * splits <= tiles:
        splits *= 2
    return splits
