"""The mask of a LoRA B tile's rank columns, in 16-byte pieces.

B rows ([out, max_rank], rank contiguous) hold a slot's adapter in their first ``rank`` columns.
Masked by ``offs < rank`` exactly, Triton cannot prove the mask constant over any run of columns,
so it loads each fp16 element with its own 2-byte load (ld.global.b16): the SiLU-and-mul epilogue
compiled to 32 of them per thread for two [128, 16] B tiles. The mask below is the rank rounded up
to 8 columns, constant over each 8, so a row loads in 16-byte vectors and no byte past the
rounded rank is read (rank 0, no adapter: none at all). The vectors also need rows Triton can
prove 16-byte aligned: it specialises integer arguments on divisibility by 16, so a max_rank of
16, 32, 64 or 128 gets them, while 8, 24 or 40 compile to 2-byte loads still (the row stride is
then not known to be a multiple of 8 elements; sm_90 PTX checked on a CPU machine).

The columns between the rank and its round-up must be finite, and the other operand (the shrink's
output, loaded with the exact mask) is zero there, so they add exactly nothing. The engine's slots
are zero past the rank (``inlaid.kernels.qlinear.LoraSlots``). The round-up never passes B's own
rank width ``MAX_R`` (a max_rank of 12 reads at most 12 columns), so no read leaves a row; where
``MAX_R`` is not a multiple of 8 that cap breaks the 8-column constancy and the loads get narrower
again, still correct."""

import triton
import triton.language as tl


@triton.jit
def rank_mask(offs, rank, MAX_R: tl.constexpr):
    """Columns ``offs`` (an arange from a multiple of 8) of B rows ``MAX_R`` wide to read for an
    adapter of ``rank``."""
    return ((offs // 8) < (rank + 7) // 8) & (offs < MAX_R)
