"""Triton SGMV expand: y[t, off_s:off_s + out_s] += buf[s, t, :r] @ B_s[slot, :, :r].T, in place.

Grid (token tiles x output tiles, slices), sized from shapes only (CUDA-graph safe): the token tiles
are the metadata's (each inside one slot's group); programs past the last tile or whose output tile
lies past their slice's width return at once. The rank loop stops at the slot's real rank and the B
loads are masked by it, so bytes read scale with real ranks. Tiles hold distinct tokens and slices
own disjoint column ranges, so every y element has one writer: a plain load-add-store, no atomics.
The buf tile (fp32) meets B upcast to fp32 in a tf32 dot: bf16/fp16 B is exact in tf32, and the sum
stays fp32 until the single rounding to y's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from inlaid.kernels import pdl
from inlaid.kernels.lora import MAX_SLICES, LoraBatchMeta, check_step, default_offsets
from inlaid.kernels.triton.pdl import start as pdl_start
from inlaid.kernels.triton.rank_mask import rank_mask


@triton.jit
def _lora_expand_kernel(
    buf_ptr,  # [S, T, R] fp32 from shrink
    b0_ptr, b1_ptr, b2_ptr,  # [L, N_s, R] per slice (unused slices repeat b0)
    y_ptr,  # [T, N_total] fp16/bf16, updated in place
    sorted_ids_ptr,  # [max_tokens] int32, token ids grouped by slot
    tile_slot_ptr, tile_start_ptr, tile_rows_ptr,  # [max_tiles] int32: slot (−1 = none), start, rows
    ranks_ptr,  # [L] int32 per slot
    n0, n1, n2,  # width N_s of each slice
    off0, off1, off2,  # first y column of each slice
    stride_bl0, stride_bl1, stride_bl2,  # slot stride of each slice's B
    num_n_tiles,
    stride_ss, stride_sm, stride_sk, stride_bn, stride_bk, stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MAX_R: tl.constexpr, PDL: tl.constexpr,
):
    pdl_start(PDL)
    pid = tl.program_id(0)
    slice_id = tl.program_id(1)
    pid_n = pid % num_n_tiles
    tile = pid // num_n_tiles
    width = tl.where(slice_id == 0, n0, tl.where(slice_id == 1, n1, n2))
    if pid_n * BLOCK_N >= width:
        return
    slot = tl.load(tile_slot_ptr + tile)
    rows = tl.load(tile_rows_ptr + tile)  # issued with the slot load: one round trip, not two
    start = tl.load(tile_start_ptr + tile)
    if slot < 0:
        return
    if slice_id == 0:
        b_ptr = b0_ptr
    elif slice_id == 1:
        b_ptr = b1_ptr
    else:
        b_ptr = b2_ptr
    col0 = tl.where(slice_id == 0, off0, tl.where(slice_id == 1, off1, off2))
    stride_bl = tl.where(slice_id == 0, stride_bl0, tl.where(slice_id == 1, stride_bl1, stride_bl2))

    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < rows
    # int64: token id x row stride and slot x slot stride can pass 2**31 at large T / many slots.
    tok = tl.load(sorted_ids_ptr + start + offs_m, mask=mask_m, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < width
    rank = tl.load(ranks_ptr + slot)
    s_rows = buf_ptr + slice_id * stride_ss + tok[:, None] * stride_sm
    b_cols = b_ptr + slot.to(tl.int64) * stride_bl + offs_n[None, :] * stride_bn
    # Issue the y read first: its latency then overlaps the B reads instead of following them.
    y = y_ptr + tok[:, None] * stride_ym + (col0 + offs_n)[None, :] * stride_yn
    mask = mask_m[:, None] & mask_n[None, :]
    old = tl.load(y, mask=mask, other=0.0)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, rank, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < rank  # the shrink's entries past the real rank are never read (zeros)
        st = tl.load(s_rows + offs_k[None, :] * stride_sk, mask=mask_m[:, None] & mask_k[None, :],
                     other=0.0)
        bt = tl.load(b_cols + offs_k[:, None] * stride_bk,
                     mask=rank_mask(offs_k, rank, MAX_R)[:, None] & mask_n[None, :], other=0.0)
        acc += tl.dot(st, bt.to(tl.float32))

    tl.store(y, (old.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=mask)


def expand_config(num_tokens: int, max_rank: int) -> dict:
    """Block sizes from host-known shapes only (a captured graph keeps its config; BLOCK_M is the
    metadata's tile height). Wide output tiles: fewer programs, each streaming a long contiguous
    run of B; one stage, since the rank loop is one or two steps. Picked by a sweep on an H100 over
    scripts/bench_lora.py shapes."""
    block_k = min(32, max(16, triton.next_power_of_2(max_rank)))
    return dict(BLOCK_N=256, BLOCK_K=block_k, num_warps=4, num_stages=1)


def _check(buf: torch.Tensor, lora_b: Sequence[torch.Tensor], y: torch.Tensor,
           offsets: Sequence[int]) -> None:
    if not y.is_cuda or y.dim() != 2 or y.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"y must be a 2-D fp16/bf16 CUDA tensor, got {y.dtype} {tuple(y.shape)} "
                         f"on {y.device}")
    if y.stride(1) != 1:
        raise ValueError("y must be contiguous along features (stride(1) == 1)")
    if not 1 <= len(lora_b) <= MAX_SLICES or len(offsets) != len(lora_b):
        raise ValueError(f"1 to {MAX_SLICES} lora_b slices with one offset each, got {len(lora_b)} "
                         f"slices and {len(offsets)} offsets")
    first = lora_b[0]
    for b in lora_b:
        if (b.dtype != y.dtype or b.device != y.device or b.dim() != 3 or b.shape[0] != first.shape[0]
                or b.shape[2] != first.shape[2] or b.stride()[1:] != first.stride()[1:]
                or b.stride(2) != 1):
            raise ValueError("every lora_b slice must be [max_loras, out_s, max_rank] with y's dtype and "
                             "device, one row stride, contiguous along rank")
    want = (len(lora_b), y.shape[0], first.shape[2])
    if buf.shape != want or buf.dtype != torch.float32 or buf.device != y.device:
        raise ValueError(f"buf must be float32 {list(want)} on {y.device}, got {buf.dtype} "
                         f"{tuple(buf.shape)} on {buf.device}")
    spans = sorted((off, off + b.shape[1]) for off, b in zip(offsets, lora_b))
    if spans[0][0] < 0 or spans[-1][1] > y.shape[1] or any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
        raise ValueError(f"slices at offsets {list(offsets)} overlap or leave y's {y.shape[1]} columns")


def lora_expand_triton(buf: torch.Tensor, lora_b: Sequence[torch.Tensor], meta: LoraBatchMeta,
                       ranks: torch.Tensor, y: torch.Tensor,
                       slice_offsets: Sequence[int] | None = None) -> torch.Tensor:
    """buf fp32 [S, T, R]; lora_b: 1-3 slices of [L, N_s, R] in y's dtype; meta prepared for T
    tokens and L slots; ranks int32 [L]; y fp16/bf16 [T, N_total], updated in place and returned;
    slice_offsets: first y column of each slice (default back to back from 0)."""
    offsets = default_offsets([b.shape[1] for b in lora_b]) if slice_offsets is None else slice_offsets
    _check(buf, lora_b, y, offsets)
    num_loras, _, max_rank = lora_b[0].shape
    num_tokens = y.shape[0]
    check_step(meta, ranks, num_tokens, num_loras, y.device)
    if num_tokens == 0:
        return y
    if meta.block_m < 16:
        raise ValueError(f"the Triton kernels need meta.block_m >= 16 (tl.dot), got {meta.block_m}")
    cfg = expand_config(num_tokens, max_rank)
    num_n_tiles = triton.cdiv(max(b.shape[1] for b in lora_b), cfg["BLOCK_N"])
    grid = (meta.tile_bound(num_tokens) * num_n_tiles, len(lora_b))
    pad = MAX_SLICES - len(lora_b)
    b = list(lora_b) + [lora_b[0]] * pad
    widths = [t.shape[1] for t in lora_b] + [0] * pad
    offs = list(offsets) + [0] * pad
    _lora_expand_kernel[grid](
        buf, b[0], b[1], b[2], y,
        meta.sorted_token_ids, meta.tile_slot, meta.tile_start, meta.tile_rows, ranks,
        *widths, *offs, *(t.stride(0) for t in b),
        num_n_tiles,
        buf.stride(0), buf.stride(1), buf.stride(2), b[0].stride(1), b[0].stride(2),
        y.stride(0), y.stride(1),
        BLOCK_M=meta.block_m, MAX_R=max_rank, **cfg, **pdl.triton_args(y.device),
    )
    return y
