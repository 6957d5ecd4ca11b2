"""Triton varlen prefill attention over the paged KV cache: every multi-token chunk of a step in one
launch, K/V read in place through each chunk's block table.

The torch path (``inlaid.engine.attention``) runs one SDPA call per chunk over a gathered copy of
its context (with a gather, a mask and a scatter around it), so a step that prefills P prompts
launches ~5 P kernels per layer and its time grows with the number of prompts rather than their
tokens (serving.md: prefill steps were launch-bound). Here a chunk is cut into query tiles of
BLOCK_M rows; grid (all chunks' tiles, query heads). A program walks the keys its tile can see
(causal, offset by the chunk's start position, so chunked prefill and recompute attend to their
cached prefix too) in BLOCK_N-token steps, gathering each step's slots through the block table, with
an online softmax in fp32. GQA: query head h reads KV head h // (heads / kv_heads). Sliding window:
key steps wholly before the tile's window are skipped, partial ones masked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from inlaid.kernels import pdl
from inlaid.kernels.prefill_tiles import BLOCK_M
from inlaid.kernels.triton.pdl import start as pdl_start



@triton.jit
def _paged_prefill_kernel(
    q_ptr,  # [T, H, D]: the step's flat tokens
    k_ptr, v_ptr,  # [num_slots, KVH, D] (slot = block * BLOCK_SIZE + offset)
    out_ptr,  # [T, H, D]
    tables_ptr,  # [C, max_blocks] int32: each chunk's block table
    tile_chunk_ptr, tile_m0_ptr,  # [num_tiles] int32: the tile's chunk and first query row in it
    rows_ptr, lens_ptr, starts_ptr,  # [C] int32: first row in the flat batch, tokens, position of row 0
    scale, window,
    stride_qt, stride_qh, stride_kslot, stride_kh, stride_ot, stride_oh, stride_tb,
    GROUPS: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_WINDOW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
):
    pdl_start(PDL)
    tile = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUPS
    c = tl.load(tile_chunk_ptr + tile)
    m0 = tl.load(tile_m0_ptr + tile)
    row0 = tl.load(rows_ptr + c)
    n = tl.load(lens_ptr + c)
    start = tl.load(starts_ptr + c)

    offs_m = m0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n
    q_pos = start + offs_m
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + (row0 + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=mask_m[:, None], other=0.0)
    end = start + tl.minimum(m0 + BLOCK_M, n)  # keys this tile can see: positions < end
    if HAS_WINDOW:
        lo = tl.maximum(start + m0 - window + 1, 0) // BLOCK_N * BLOCK_N
    else:
        lo = 0

    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for k0 in range(lo, end, BLOCK_N):
        k_pos = k0 + tl.arange(0, BLOCK_N)
        valid = k_pos < end
        block = tl.load(tables_ptr + c * stride_tb + k_pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        slots = block * BLOCK_SIZE + k_pos % BLOCK_SIZE
        kv_off = slots[:, None] * stride_kslot + kvh * stride_kh + offs_d[None, :]
        k = tl.load(k_ptr + kv_off, mask=valid[:, None], other=0.0)
        if IEEE:  # fp32 caches: no TF32 rounding, so the fp32 engine stays exact against torch
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale
        see = valid[None, :] & (k_pos[None, :] <= q_pos[:, None])
        if HAS_WINDOW:
            see = see & (q_pos[:, None] - k_pos[None, :] < window)
        s = tl.where(see, s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # a row that has seen no key yet keeps m = -inf: subtract 0 there instead (exp(-inf) = 0)
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        v = tl.load(v_ptr + kv_off, mask=valid[:, None], other=0.0)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + (row0 + offs_m)[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None])


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, chunk_meta: torch.Tensor, tiles: torch.Tensor,
                            block_size: int, scale: float, sliding_window: int | None = None,
                            out: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, H, D] -> out [T, H, D], rows of chunk tokens written (other rows left as they are).

    ``block_tables`` int32 [C, max_blocks]; ``chunk_meta`` int32 [3, C]: each chunk's first row in
    q, its number of tokens and the position of its first token; ``tiles`` from
    :func:`inlaid.kernels.prefill_tiles.tile_map` (or a static buffer of such rows: CUDA graphs)."""
    _, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    if dim & (dim - 1) or dim < 16 or heads % kv_heads or block_size & (block_size - 1):
        raise ValueError(f"head_dim {dim} (a power of 2, >= 16) and block_size {block_size} (a power of 2) "
                         f"and heads {heads} a multiple of kv_heads {kv_heads}")
    if k_cache.stride(2) != 1 or q.stride(2) != 1:
        raise ValueError("q and the caches must be contiguous in head_dim")
    out = torch.empty_like(q) if out is None else out
    block_n = 64 if dim <= 64 else 32  # keeps K, V and the score tile in registers at head_dim 128
    _paged_prefill_kernel[(tiles.shape[1], heads)](
        q, k_cache, v_cache, out, block_tables, tiles[0], tiles[1], chunk_meta[0], chunk_meta[1],
        chunk_meta[2], scale, sliding_window or 0,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), out.stride(0), out.stride(1),
        block_tables.stride(0),
        GROUPS=heads // kv_heads, BLOCK_SIZE=block_size, HEAD_DIM=dim, HAS_WINDOW=sliding_window is not None,
        BLOCK_M=BLOCK_M, BLOCK_N=block_n, IEEE=q.dtype == torch.float32, num_warps=4, num_stages=2,
        **pdl.triton_args(q.device))
    return out
