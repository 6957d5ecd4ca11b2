"""Triton paged decode attention: one query token per sequence over its KV blocks, read in place.

The torch path (``inlaid.engine.attention``) gathers each sequence's K/V into a padded copy first:
that reads and writes the KV twice more than attention needs, and its shape changes every step, so
it cannot be captured in a CUDA graph. This kernel reads K/V straight from the cache through the
block table, with shapes fixed by (batch, max blocks per sequence): graph-safe.

Two kernels, one walk. A program walks its sequence's tokens TILE at a time (several KV blocks per
step, each token's slot looked up through the block table) with an online softmax in fp32 (running
max and sum), so any context length runs in one pass. Sliding window: tiles entirely before the
window are skipped, partial ones masked. A sequence with context length 0 (graph padding rows) writes
zeros.

- "mma" (the default): grid (sequences, KV heads, splits). The query heads that share a KV head (GQA) are
  the rows of a [16+, head_dim] block, so q·K and P·V are tensor-core dots and each K/V tile is read
  once per KV head; Triton software-pipelines the K/V loads of those dots (num_stages), which the
  FMA kernel's loop does not get. P is rounded to the cache's dtype before P·V, as in
  FlashAttention. On an H100 it takes 15-16% off the FMA kernel at batch 32 (192 and 1,024 tokens of
  context) and 25-50% at batch 1-8 (docs/results/bench_attention_8d21b75.log). With fp32 caches the
  dots are IEEE (exact fp32 products, no P rounding): TF32 would put the fp32 engine ~1e-3 off torch.
  With several splits per (sequence, KV head) (``inlaid.kernels.decode_splits``), each program walks
  a share of the context's tiles and the last split of the pair to finish merges the others' partial
  results (flash-decoding's combine, in the same kernel: no second launch).
- "fma": grid (sequences, query heads), CUDA-core dot products in fp32. Query head h reads KV head
  h // (heads / kv_heads). 64-token steps instead of one 16-token block took batch 32 from 42% to
  57% of the bytes floor at 192 tokens of context; 8 warps are slower everywhere
  (docs/results/bench_attention_82f77a4.log).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from inlaid.kernels import dispatch, pdl
from inlaid.kernels.decode_splits import DEFAULT_LAUNCH, decode_launch, decode_splits
from inlaid.kernels.triton.pdl import start as pdl_start
from inlaid.kernels.triton.scratch import persistent


@triton.jit
def _kv_tile(k_ptr, v_ptr, tables_ptr, b, j, kvh, length, first, stride_kslot, stride_kh, stride_tb,
             BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Tile j of sequence b's K and V for KV head kvh, [TILE, HEAD_DIM] in the cache's dtype (zeros
    where a token is outside [first, length)), and that validity mask. K and V are both issued
    before any math; table entries past the sequence's are never read."""
    pos = j * TILE + tl.arange(0, TILE)
    valid = (pos < length) & (pos >= first)
    block = tl.load(tables_ptr + b * stride_tb + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    slots = block * BLOCK_SIZE + pos % BLOCK_SIZE
    kv_off = slots[:, None] * stride_kslot + kvh * stride_kh + tl.arange(0, HEAD_DIM)[None, :]
    k = tl.load(k_ptr + kv_off, mask=valid[:, None], other=0.0)
    v = tl.load(v_ptr + kv_off, mask=valid[:, None], other=0.0)
    return k, v, valid


@triton.jit
def _paged_decode_kernel(
    q_ptr,  # [B, H, D]
    k_ptr, v_ptr,  # [num_slots, KVH, D] (slot = block * BLOCK_SIZE + offset)
    out_ptr,  # [B, H, D]
    tables_ptr,  # [B, max_blocks] int32
    lens_ptr,  # [B] int32: context length incl. the new token
    scale, window,
    stride_qb, stride_qh, stride_kslot, stride_kh, stride_ob, stride_oh, stride_tb,
    GROUPS: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, HEAD_DIM: tl.constexpr,
    HAS_WINDOW: tl.constexpr, PDL: tl.constexpr,
):
    pdl_start(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUPS
    length = tl.load(lens_ptr + b)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_d).to(tl.float32) * scale
    if HAS_WINDOW:  # compile-time branch: only one definition of ``first`` exists
        first = tl.maximum(length - window, 0)
    else:
        first = 0
    # loop-carried scalars must start as fp32 tensors, not Python floats
    m_i = tl.max(tl.full([TILE], -float("inf"), tl.float32), axis=0)
    l_i = tl.sum(tl.zeros([TILE], tl.float32), axis=0)
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for j in range(first // TILE, tl.cdiv(length, TILE)):
        k, v, valid = _kv_tile(k_ptr, v_ptr, tables_ptr, b, j, kvh, length, first, stride_kslot, stride_kh,
                               stride_tb, BLOCK_SIZE, TILE, HEAD_DIM)
        k, v = k.to(tl.float32), v.to(tl.float32)
        s = tl.sum(k * q[None, :], axis=1)
        s = tl.where(valid, s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        p = tl.exp(s - m_new)  # every tile walked holds a valid token: m_new is finite
        alpha = tl.exp(m_i - m_new)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    out = tl.where(l_i > 0, acc / l_i, 0.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty))


@triton.jit
def _split_range(first, length, split, TILE: tl.constexpr, SPLITS: tl.constexpr):
    """The tiles [lo, hi) that split ``split`` of a (sequence, KV head) walks: its share of the
    tiles holding context tokens [first, length) (all of them when SPLITS == 1)."""
    lo, hi = first // TILE, tl.cdiv(length, TILE)
    per = tl.cdiv(hi - lo, SPLITS)
    lo = lo + split * per
    return lo, tl.minimum(hi, lo + per)


@triton.jit
def _walk_mma(q, k_ptr, v_ptr, tables_ptr, b, kvh, length, first, lo, hi, scale, stride_kslot, stride_kh,
              stride_tb, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, HEAD_DIM: tl.constexpr,
              BLOCK_H: tl.constexpr, IEEE: tl.constexpr):
    """Online softmax of q [BLOCK_H, HEAD_DIM] (the cache's dtype) over tiles [lo, hi) of sequence
    b's K/V for KV head kvh: the unnormalised acc, the running max and the running sum."""
    m_i = tl.full([BLOCK_H], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], dtype=tl.float32)
    for j in range(lo, hi):
        k, v, valid = _kv_tile(k_ptr, v_ptr, tables_ptr, b, j, kvh, length, first, stride_kslot, stride_kh,
                               stride_tb, BLOCK_SIZE, TILE, HEAD_DIM)
        if IEEE:  # fp32 caches: no TF32 rounding, so the fp32 engine stays exact against torch
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:
            s = tl.dot(q, tl.trans(k)) * scale  # fp32 sums of exact fp16/bf16 products
        s = tl.where(valid[None, :], s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])  # every tile walked holds a valid token: m_new is finite
        alpha = tl.exp(m_i - m_new)
        if IEEE:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _finish_mma(out_ptr, part_ptr, count_ptr, b, kvh, split, acc, m_i, l_i, stride_ob, stride_oh,
                GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, SPLITS: tl.constexpr):
    """Store the (sequence, KV head)'s query heads' output: this program's own result, or, with
    several splits, the merged result by the last split to finish."""
    offs_d = tl.arange(0, HEAD_DIM)
    offs_h = tl.arange(0, BLOCK_H)
    own = offs_h < GROUPS
    if SPLITS > 1:
        acc, l_i, done = _merge_splits(part_ptr, count_ptr, b * tl.num_programs(1) + kvh, split, acc, m_i,
                                       l_i, offs_h, offs_d, own, GROUPS, HEAD_DIM, SPLITS)
    else:
        done = True
    if done:
        out = tl.where(l_i[:, None] > 0, acc / l_i[:, None], 0.0)
        heads = kvh * GROUPS + offs_h
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=own[:, None])


@triton.jit
def _paged_decode_mma_kernel(
    q_ptr,  # [B, H, D]
    k_ptr, v_ptr,  # [num_slots, KVH, D] (slot = block * BLOCK_SIZE + offset)
    out_ptr,  # [B, H, D]
    tables_ptr,  # [B, max_blocks] int32
    lens_ptr,  # [B] int32: context length incl. the new token
    part_ptr,  # SPLITS > 1: fp32 [B, KVH, SPLITS, GROUPS, D + 4]: each split's acc, max and sum
    count_ptr,  # SPLITS > 1: int32 [B * KVH], zero at launch and left at zero
    scale, window,
    stride_qb, stride_qh, stride_kslot, stride_kh, stride_ob, stride_oh, stride_tb,
    GROUPS: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, HEAD_DIM: tl.constexpr,
    HAS_WINDOW: tl.constexpr, BLOCK_H: tl.constexpr, IEEE: tl.constexpr, SPLITS: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_start(PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(lens_ptr + b)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_h = tl.arange(0, BLOCK_H)
    heads = kvh * GROUPS + offs_h
    # rows past the group are zero queries, never stored
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=(offs_h < GROUPS)[:, None], other=0.0)
    if HAS_WINDOW:
        first = tl.maximum(length - window, 0)
    else:
        first = 0
    lo, hi = _split_range(first, length, split, TILE, SPLITS)
    acc, m_i, l_i = _walk_mma(q, k_ptr, v_ptr, tables_ptr, b, kvh, length, first, lo, hi, scale, stride_kslot,
                              stride_kh, stride_tb, BLOCK_SIZE, TILE, HEAD_DIM, BLOCK_H, IEEE)
    _finish_mma(out_ptr, part_ptr, count_ptr, b, kvh, split, acc, m_i, l_i, stride_ob, stride_oh, GROUPS,
                HEAD_DIM, BLOCK_H, SPLITS)


@triton.jit
def _merge_splits(part_ptr, count_ptr, pair, split, acc, m_i, l_i, offs_h, offs_d, own,
                  GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr):
    """Flash-decoding's combine, in the kernel: every split stores its unnormalised acc, running max
    and sum; the last of the (sequence, KV head) pair's splits to arrive rescales them all to one
    max and returns the sums with ``done`` (the others return ``done`` False and store nothing).

    The barrier orders every thread's stores before the release of the arrival count; the last
    program's acquire then makes the other splits' stores visible, read through L2 (.cg). It sets
    the count back to 0 for the next launch (``inlaid.kernels.triton.scratch``)."""
    width = HEAD_DIM + 4  # acc, max, sum, 2 pad: rows stay 16-byte aligned
    rows = (pair * SPLITS + split) * GROUPS + offs_h
    tl.store(part_ptr + rows[:, None] * width + offs_d[None, :], acc, mask=own[:, None])
    tl.store(part_ptr + rows * width + HEAD_DIM, m_i, mask=own)
    tl.store(part_ptr + rows * width + HEAD_DIM + 1, l_i, mask=own)
    tl.debug_barrier()
    arrived = tl.atomic_add(count_ptr + pair, 1, sem="acq_rel", scope="gpu")
    done = arrived == SPLITS - 1
    if done:
        tl.debug_barrier()
        offs_s = tl.arange(0, SPLITS)
        first_rows = pair * SPLITS * GROUPS + offs_h
        stat = part_ptr + ((first_rows[None, :] + offs_s[:, None] * GROUPS) * width + HEAD_DIM)
        m_all = tl.load(stat, mask=own[None, :], other=-float("inf"), cache_modifier=".cg")
        m_max = tl.max(m_all, axis=0)
        # a split with no tokens has max -inf and weighs 0; a row with none at all stays all zero
        m_max = tl.where(m_max == -float("inf"), 0.0, m_max)
        l_i = tl.sum(tl.load(stat + 1, mask=own[None, :], other=0.0, cache_modifier=".cg")
                     * tl.exp(m_all - m_max[None, :]), axis=0)
        acc = tl.zeros_like(acc)
        for s in tl.static_range(SPLITS):
            r = first_rows + s * GROUPS
            w = tl.exp(tl.load(part_ptr + r * width + HEAD_DIM, mask=own, other=-float("inf"),
                               cache_modifier=".cg") - m_max)
            part = tl.load(part_ptr + r[:, None] * width + offs_d[None, :], mask=own[:, None], other=0.0,
                           cache_modifier=".cg")
            acc += part * w[:, None]
        tl.store(count_ptr + pair, 0)
    return acc, l_i, done


def check_shapes(heads: int, kv_heads: int, dim: int, block_size: int, tile: int) -> None:
    if dim & (dim - 1) or heads % kv_heads or block_size & (block_size - 1) or tile & (tile - 1):
        raise ValueError(f"head_dim {dim}, block_size {block_size} and tile {tile} must be powers of 2 "
                         f"and heads {heads} a multiple of kv_heads {kv_heads}")


def _sms(device: torch.device) -> int | None:
    return dispatch.sm_count(device.index or 0) if device.type == "cuda" else None


def mma_launch(batch: int, heads: int, kv_heads: int, dim: int, block_size: int, max_blocks: int,
               tile: int | None, splits: int | None, sliding_window: int | None, out: torch.Tensor,
               num_stages: int | None = None) -> tuple[tuple, tuple, dict]:
    """What a launch of an mma decode kernel needs besides its tensors: its grid, its split buffers
    (the partial results and the arrival counts; with one split, which never touches them, ``out``) and
    its compile-time constants and launch options as keyword arguments. ``splits`` None picks them
    from the shapes (:func:`decode_splits`); ``tile`` and ``num_stages`` None pick the launch
    (:func:`decode_launch`: the default one, or a compact one where the grid would not fit the
    GPU in one wave); a given ``tile`` gets ``num_stages`` (default 3) and no register cap."""
    default_tile, default_stages, _ = DEFAULT_LAUNCH
    if splits is None:
        splits = decode_splits(batch, kv_heads, max_blocks, block_size, max(16, block_size, tile or default_tile))
    if splits < 1 or splits & (splits - 1):
        raise ValueError(f"splits must be a power of 2; got {splits}")
    maxnreg = 0
    if tile is None and num_stages is None:
        tile, num_stages, maxnreg = decode_launch(batch * kv_heads * splits, _sms(out.device))
    tile = max(16, block_size, tile or default_tile)
    kwargs = dict(GROUPS=heads // kv_heads, BLOCK_SIZE=block_size, TILE=tile, HEAD_DIM=dim,
                  HAS_WINDOW=sliding_window is not None,
                  BLOCK_H=max(16, triton.next_power_of_2(heads // kv_heads)), IEEE=out.dtype == torch.float32,
                  SPLITS=splits, num_stages=num_stages or default_stages, **pdl.triton_args(out.device))
    if maxnreg:
        kwargs["maxnreg"] = maxnreg
    buffers = (out, out)
    if splits > 1:
        buffers = (persistent("decode_attention_parts", out.device, batch * heads * splits * (dim + 4),
                              torch.float32),
                   persistent("decode_attention_counts", out.device, batch * kv_heads, torch.int32))
    return (batch, kv_heads, splits), buffers, kwargs


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int,
                           scale: float, sliding_window: int | None = None,
                           out: torch.Tensor | None = None, tile: int | None = None,
                           num_warps: int = 4, variant: str = "mma", num_stages: int | None = None,
                           splits: int | None = None) -> torch.Tensor:
    """q [B, H, D] -> [B, H, D]. ``block_tables`` int32 [B, max_blocks], ``context_lens`` int32 [B];
    ``tile``: tokens per loop step (a power of 2; at least one block); ``num_warps`` per program;
    ``variant`` "fma" (one program per query head) or "mma" (one per KV head, tensor cores);
    ``splits`` (mma only, a power of 2): programs per (sequence, KV head), each over a share of the
    context; None picks them from the shapes (:func:`decode_splits`); ``tile`` and ``num_stages``
    None (mma) pick the launch from the grid (:func:`mma_launch`)."""
    batch, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    check_shapes(heads, kv_heads, dim, block_size, tile or DEFAULT_LAUNCH[0])
    if k_cache.stride(2) != 1 or q.stride(2) != 1:
        raise ValueError("q and the caches must be contiguous in head_dim")
    if variant not in ("fma", "mma"):
        raise ValueError(f"variant must be 'fma' or 'mma', got {variant!r}")
    if variant == "fma" and splits not in (None, 1):
        raise ValueError(f"the fma variant takes no splits; got {splits}")
    out = torch.empty_like(q) if out is None else out
    args = (q, k_cache, v_cache, out, block_tables, context_lens)
    scalars = (scale, sliding_window or 0, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
               out.stride(0), out.stride(1), block_tables.stride(0))
    if variant == "mma":
        grid, buffers, kwargs = mma_launch(batch, heads, kv_heads, dim, block_size, block_tables.shape[1], tile,
                                           splits, sliding_window, out, num_stages)
        _paged_decode_mma_kernel[grid](*args, *buffers, *scalars, num_warps=num_warps, **kwargs)
    else:
        _paged_decode_kernel[(batch, heads)](
            *args, *scalars, GROUPS=heads // kv_heads, BLOCK_SIZE=block_size,
            TILE=max(block_size, tile or DEFAULT_LAUNCH[0]),
            HEAD_DIM=dim, HAS_WINDOW=sliding_window is not None, num_warps=num_warps,
            **pdl.triton_args(q.device))
    return out
