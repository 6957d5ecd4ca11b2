"""How many programs the paged decode attention kernel (``inlaid.kernels.triton.paged_attention``,
mma variant) gives each (sequence, KV head), and the launch each program gets: Triton-free, so CPU
tests can check the rules.

One program per pair walks the whole context. At batch 1 of Llama-2-7B that is 32 programs on 132
SMs: a long context leaves most of the GPU idle. Splitting each context over several programs
(flash-decoding), merged in the kernel by the last split to finish, fills it. The split count comes
from shapes the host knows, so a captured CUDA graph keeps its grid; each program divides its
sequence's actual tiles at run time (splits past a short context hold no token and cost little).

Measured on an H100 (Llama-2-7B heads, 64-token tiles; docs/results/bench_attention_splits_03b3b13.log
and bench_attention_splits_00e4223.log):
- batch 1: 4,096 tokens of context 128.4 -> 41.2 µs with 8 splits (3.1x), 1,024 tokens 38.8 ->
  20.4, 512 tokens 22.9 -> 14.0;
- batch 2, 4 splits: 130.1 -> 65.1 µs at 4,096 tokens, 42.7 -> 26.4 at 1,024;
- batch 4, 2 splits: 140.3 -> 109.4 µs at 4,096 tokens;
- from batch 8 (256 pairs) on, splitting gains nothing at 1,024 tokens and costs 6-55% at 192,
  where the merge's extra stores, arrival count and reads are not paid back. So only grids under
  256 programs split. At 192 tokens and batch 1-4 every split count lies within the noise of
  these ~15-25 µs timings.
"""

from __future__ import annotations

SPLIT_TARGET = 256  # programs: splits double while the grid is smaller
MAX_SPLITS = 8


def decode_splits(batch: int, kv_heads: int, max_blocks: int, block_size: int, tile: int) -> int:
    """Double the splits while the grid has fewer than ``SPLIT_TARGET`` programs and each split
    still gets a tile of the longest context the block tables (``max_blocks`` wide) hold."""
    tiles = -(-max_blocks * block_size // tile)
    splits = 1
    while splits < MAX_SPLITS and batch * kv_heads * splits < SPLIT_TARGET and 2 * splits <= tiles:
        splits *= 2
    return splits


# The mma kernels' launch: (loop tile, pipeline stages, register cap; 0 = none), 4 warps either way.
DEFAULT_LAUNCH = (64, 3, 0)
COMPACT_LAUNCH = (32, 2, 64)
# Programs an SM holds at the default launch: with Llama-2-7B's heads (head_dim 128) the kernels
# take 106-124 registers a thread, so registers allow 4 (scripts/triton_resources.py, compiled for
# sm_90); the compact launch fits 64 registers (no spill with LoRA, 8 bytes of stack without) and
# ~21 KB of shared memory: 8.
DEFAULT_RESIDENT = 4


def decode_launch(programs: int, sms: int | None) -> tuple[int, int, int]:
    """(tile, stages, register cap) of an mma decode kernel's grid of ``programs`` (sequences x KV
    heads x splits, the splits taken at the default tile) on a GPU of ``sms`` SMs (None: not a
    GPU, the default launch).

    A grid wider than the SMs hold at the default launch runs in two waves, each as long as a
    whole program (a short context is mostly the program's fixed latency: q, the LoRA update, the
    cache write, the first tiles), so there the compact launch, which holds twice the programs,
    runs it in one. On an H100 (docs/results/gpu_ab_attention_launch_*.log), batch 32 of
    Llama-2-7B (1,024 programs; 528 fit at the default launch) took 4.87-4.91 ms a decode step
    instead of 5.01-5.02 and the step over 8 adapters 4.45-4.49 instead of 4.65; at batch 8 (256
    programs, one wave either way) the compact launch was slower, 3.12-3.20 ms against 2.96, and
    at batch 1 2.77-2.82 against 2.72-2.73: its 32-token tiles make twice the loop steps. With
    this rule against the default launch everywhere: batch 64 (two waves even compact) 10.19-10.22
    ms against 10.33-10.39, batch 128 a tie (16.42-16.52 against 16.47-16.49), batch 16 (512
    programs: the default launch) a tie."""
    if sms is not None and programs > DEFAULT_RESIDENT * sms:
        return COMPACT_LAUNCH
    return DEFAULT_LAUNCH
