"""Decode attention with the new token's RoPE and KV-cache write fused in: one launch per layer
instead of two.

In a decode step the RoPE + KV-write kernel (``norm_rope.rope_write_kv_triton``, or its LoRA form
that also adds q/k/v's LoRA update) moves a few KB, so nearly all of its ~8 µs is the fixed cost
of a dependent kernel: the wait for the GEMM ahead, its dependent loads, its tail, and the next
kernel's own wait (docs/results/serving.md, the removal table). Here the attention program of each
(sequence, KV head, split) builds what it needs itself, from the fused q/k/v projection's output:

- its query heads: the projection's q columns plus their LoRA update, rotated, rounded to the
  activation dtype (the values the separate kernel stores), held in registers;
- the program whose share of the context holds the new token (exactly one per (sequence, KV head))
  rotates k, adds k's and v's updates and writes them into the token's cache slot, then a barrier
  makes the writes visible to its own loads, and it walks the cache like the plain kernel.

So the cache ends up as the separate kernels leave it, and the walk, the split merge and the output
are the plain mma kernel's (``paged_attention._walk_mma`` / ``_finish_mma``): the two paths compute
the same values (tests/kernels/test_rope_attention_gpu.py bounds the difference). The rotated q
is never stored: nothing but attention reads it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from inlaid.kernels.decode_splits import DEFAULT_LAUNCH
from inlaid.kernels.triton.norm_rope import (_adapter_of, _check_rope, _cos_sin, _lora_head, _plus_lora,
                                             _rope_halves, check_rope_lora)
from inlaid.kernels.triton.paged_attention import _finish_mma, _split_range, _walk_mma, check_shapes, mma_launch
from inlaid.kernels.triton.pdl import trigger as pdl_trigger
from inlaid.kernels.triton.pdl import wait as pdl_wait


@triton.jit
def _head_halves(x_ptr, buf_row, b_ptr, col0, rank, stride_bn, c1, c2, s1, s2, LORA: tl.constexpr,
                 ROTATE: tl.constexpr, HALF: tl.constexpr, BLOCK_R: tl.constexpr, MAX_R: tl.constexpr):
    """One head of the new token, as the separate kernels leave it: the projection's row at
    ``x_ptr`` plus its LoRA update rounded to the activation dtype (LORA), rotated (ROTATE), and
    rounded again: two halves in the activation dtype."""
    if LORA:
        d1, d2 = _lora_head(buf_row, b_ptr, col0, rank, stride_bn, HALF, BLOCK_R, MAX_R)
        x1, x2 = _plus_lora(x_ptr, d1, d2, HALF)
    else:
        offs = tl.arange(0, HALF)
        x1 = tl.load(x_ptr + offs).to(tl.float32)
        x2 = tl.load(x_ptr + HALF + offs).to(tl.float32)
    dtype = x_ptr.dtype.element_ty
    if ROTATE:
        x1, x2 = _rope_halves(x1, x2, c1, c2, s1, s2)
    return x1.to(dtype), x2.to(dtype)


@triton.jit
def _rope_decode_mma_kernel(
    qkv_ptr,  # [B, (H + 2 KVH) D]: the fused projection's output, one decode token per sequence
    cos_ptr, sin_ptr,  # [B, D]
    k_ptr, v_ptr,  # [num_slots, KVH, D]
    slot_ptr,  # [B] int64: the new token's cache slot
    out_ptr,  # [B, H, D]
    tables_ptr, lens_ptr,  # [B, max_blocks] int32, [B] int32 (context length incl. the new token)
    part_ptr, count_ptr,  # the split merge's buffers (paged_attention.mma_launch)
    buf_ptr, bq_ptr, bk_ptr, bv_ptr, lora_slot_ptr, ranks_ptr,  # LORA: as rope_write_kv_lora_triton's
    num_loras, scale, window,
    stride_t, stride_c, stride_kslot, stride_kh, stride_ob, stride_oh, stride_tb,
    stride_bs, stride_bt, stride_bql, stride_bkl, stride_bn,
    GROUPS: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, HEAD_DIM: tl.constexpr,
    HAS_WINDOW: tl.constexpr, BLOCK_H: tl.constexpr, IEEE: tl.constexpr, SPLITS: tl.constexpr,
    LORA: tl.constexpr, BLOCK_R: tl.constexpr, MAX_R: tl.constexpr, PDL: tl.constexpr,
):
    pdl_trigger(PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    kv_heads = tl.num_programs(1)
    HALF: tl.constexpr = HEAD_DIM // 2
    # Before the wait, step inputs no kernel of the forward pass writes (inlaid.kernels.pdl): the
    # context length and the token's adapter slot and rank, whose dependent loads then run under
    # the q/k/v GEMM ahead; after the wait the B rows, the shrink row and the projection's row all
    # load at once.
    length = tl.load(lens_ptr + b)
    if LORA:
        lora_slot, rank = _adapter_of(lora_slot_ptr, ranks_ptr, b, num_loras)
    else:
        lora_slot, rank = 0, 0
    pdl_wait(PDL)
    c1, c2, s1, s2 = _cos_sin(cos_ptr, sin_ptr, b, stride_c, HALF)
    row = buf_ptr + b * stride_bt
    x = qkv_ptr + b * stride_t

    # the group's query heads as the rows of q; rows past the group stay zero queries
    offs_h = tl.arange(0, BLOCK_H)
    q = tl.zeros([BLOCK_H, HEAD_DIM], dtype=qkv_ptr.dtype.element_ty)
    for g in tl.static_range(GROUPS):
        head = kvh * GROUPS + g
        lo, hi = _head_halves(x + head * HEAD_DIM, row, bq_ptr + lora_slot * stride_bql, head * HEAD_DIM, rank,
                              stride_bn, c1, c2, s1, s2, LORA, True, HALF, BLOCK_R, MAX_R)
        q_row = tl.reshape(tl.permute(tl.join(lo, hi), (1, 0)), (HEAD_DIM,))  # [lo, hi]
        q = tl.where(offs_h[:, None] == g, q_row[None, :], q)

    if HAS_WINDOW:
        first = tl.maximum(length - window, 0)
    else:
        first = 0
    lo, hi = _split_range(first, length, split, TILE, SPLITS)
    last = (length - 1) // TILE
    if (length > 0) & (lo <= last) & (last < hi):  # this program's tiles hold the new token
        offs = tl.arange(0, HALF)
        dst = tl.load(slot_ptr + b).to(tl.int64) * stride_kslot + kvh * stride_kh + offs
        col0 = kvh * HEAD_DIM
        k_row = x + (kv_heads * GROUPS + kvh) * HEAD_DIM
        k1, k2 = _head_halves(k_row, row + stride_bs, bk_ptr + lora_slot * stride_bkl, col0, rank, stride_bn,
                              c1, c2, s1, s2, LORA, True, HALF, BLOCK_R, MAX_R)
        tl.store(k_ptr + dst, k1)
        tl.store(k_ptr + dst + HALF, k2)
        v1, v2 = _head_halves(k_row + kv_heads * HEAD_DIM, row + 2 * stride_bs, bv_ptr + lora_slot * stride_bkl,
                              col0, rank, stride_bn, c1, c2, s1, s2, LORA, False, HALF, BLOCK_R, MAX_R)
        tl.store(v_ptr + dst, v1)
        tl.store(v_ptr + dst + HALF, v2)
    # the walk below reads the new token's K/V back from the cache: the barrier orders every
    # thread's stores above before any thread's loads (one program, so a CTA barrier suffices)
    tl.debug_barrier()
    acc, m_i, l_i = _walk_mma(q, k_ptr, v_ptr, tables_ptr, b, kvh, length, first, lo, hi, scale, stride_kslot,
                              stride_kh, stride_tb, BLOCK_SIZE, TILE, HEAD_DIM, BLOCK_H, IEEE)
    _finish_mma(out_ptr, part_ptr, count_ptr, b, kvh, split, acc, m_i, l_i, stride_ob, stride_oh, GROUPS,
                HEAD_DIM, BLOCK_H, SPLITS)


def rope_decode_attention(qkv: torch.Tensor, heads: int, kv_heads: int, cos: torch.Tensor, sin: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                          block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int, scale: float,
                          sliding_window: int | None = None,
                          lora: tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor] | None = None,
                          out: torch.Tensor | None = None, tile: int | None = None, num_warps: int = 4,
                          num_stages: int | None = None, splits: int | None = None) -> torch.Tensor:
    """Attention of one new token per sequence, from the fused q/k/v output ``qkv`` [B, (heads +
    2 kv_heads) D]: the same as ``norm_rope.rope_write_kv_triton`` (with ``lora``:
    ``rope_write_kv_lora_triton``, ``lora`` = (buf, lora_b, slot_of_token, ranks) as it takes
    them) on qkv's q/k/v views followed by ``paged_attention.paged_decode_attention`` (the mma
    variant), in one launch. Returns [B, heads, D]; k/v get written into the caches at
    ``slot_mapping``; ``qkv`` is not modified. ``tile``, ``num_stages`` and ``splits`` None pick
    the launch from the shapes, as paged_decode_attention does."""
    tokens, width = qkv.shape
    dim = width // (heads + 2 * kv_heads)
    check_shapes(heads, kv_heads, dim, block_size, tile or DEFAULT_LAUNCH[0])
    if qkv.stride(1) != 1 or width != (heads + 2 * kv_heads) * dim:
        raise ValueError(f"qkv [T, (heads + 2 kv_heads) D] with contiguous rows expected, got {tuple(qkv.shape)}")
    q, k, v = (t.reshape(tokens, -1, dim) for t in qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], 1))
    _check_rope(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)
    if block_tables.shape[0] != tokens or context_lens.shape != (tokens,):
        raise ValueError("one block table and one context length per decode token expected")
    out = q.new_empty(q.shape) if out is None else out
    grid, buffers, kwargs = mma_launch(tokens, heads, kv_heads, dim, block_size, block_tables.shape[1], tile,
                                       splits, sliding_window, out, num_stages)
    if lora is not None:
        buf, lora_b, slot_of_token, ranks = lora
        check_rope_lora(q, k, buf, lora_b, slot_of_token, ranks)
        lora_args = (buf, *lora_b, slot_of_token, ranks, lora_b[0].shape[0])
        lora_strides = (buf.stride(0), buf.stride(1), lora_b[0].stride(0), lora_b[1].stride(0), lora_b[0].stride(1))
        max_r = lora_b[0].shape[2]
        block_r = max(16, triton.next_power_of_2(max_r))
    else:  # placeholders: LORA=False compiles every use away
        lora_args, lora_strides, block_r, max_r = (qkv,) * 6 + (0,), (0,) * 5, 16, 16
    if tokens:
        _rope_decode_mma_kernel[grid](
            qkv, cos, sin, k_cache, v_cache, slot_mapping, out, block_tables, context_lens, *buffers, *lora_args,
            scale, sliding_window or 0, qkv.stride(0), cos.stride(0), k_cache.stride(0), k_cache.stride(1),
            out.stride(0), out.stride(1), block_tables.stride(0), *lora_strides,
            LORA=lora is not None, BLOCK_R=block_r, MAX_R=max_r, num_warps=num_warps, **kwargs)
    return out
