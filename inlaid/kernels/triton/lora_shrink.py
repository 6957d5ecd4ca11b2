"""Triton SGMV shrink: buf[s, t, :r] = scaling[slot] * x[t] @ A_s[slot, :r].T, tokens grouped by slot.

Grid (token tiles x rank tiles x SPLIT_K, slices), sized from shapes only so the launch can be
captured in a CUDA graph: the token tiles are the metadata's (each inside one slot's group), and a
program past the last tile or whose rank tile lies past its slot's real rank returns at once. A
program reads its A rows once per token tile, masked by the real rank, so bytes read scale with
real ranks. In decode (about one token per slot) that A read is the whole cost and one program per
(tile, slice) would leave most SMs idle, so the K loop is split over SPLIT_K programs adding
atomically into a zeroed buf (fp32 sums in a varying order: results may differ by rounding between
runs).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from inlaid.kernels import pdl
from inlaid.kernels.lora import MAX_SLICES, LoraBatchMeta, check_step
from inlaid.kernels.lora_blocks import shrink_config
from inlaid.kernels.triton.pdl import start as pdl_start


@triton.jit
def _lora_shrink_kernel(
    x_ptr,  # [T, K] fp16/bf16
    a0_ptr, a1_ptr, a2_ptr,  # [L, R, K] per slice (unused slices repeat a0)
    out_ptr,  # [S, T, R] fp32, zeroed when SPLIT_K > 1
    sorted_ids_ptr,  # [max_tokens] int32, token ids grouped by slot
    tile_slot_ptr, tile_start_ptr, tile_rows_ptr,  # [max_tiles] int32: slot (−1 = none), start, rows
    ranks_ptr,  # [L] int32 per slot
    scalings_ptr,  # [L] fp32 per slot
    K, num_n_tiles,
    stride_xm, stride_xk, stride_al, stride_ar, stride_ak, stride_os, stride_om, stride_on,
    SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_start(PDL)
    pid = tl.program_id(0)
    slice_id = tl.program_id(1)
    pid_k = pid % SPLIT_K
    pid_n = (pid // SPLIT_K) % num_n_tiles
    tile = pid // (SPLIT_K * num_n_tiles)
    slot = tl.load(tile_slot_ptr + tile)
    rows = tl.load(tile_rows_ptr + tile)  # issued with the slot load: one round trip, not two
    start = tl.load(tile_start_ptr + tile)
    if slot < 0:
        return
    rank = tl.load(ranks_ptr + slot)
    if pid_n * BLOCK_N >= rank:
        return
    if slice_id == 0:
        a_ptr = a0_ptr
    elif slice_id == 1:
        a_ptr = a1_ptr
    else:
        a_ptr = a2_ptr

    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < rows
    # int64: token id x row stride and slot x slot stride can pass 2**31 at large T / many slots.
    tok = tl.load(sorted_ids_ptr + start + offs_m, mask=mask_m, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < rank  # rows past the real rank are never read
    x_rows = x_ptr + tok[:, None] * stride_xm
    a_rows = a_ptr + slot.to(tl.int64) * stride_al + offs_n[None, :] * stride_ar

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        xt = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :],
                     other=0.0)
        at = tl.load(a_rows + offs_k[:, None] * stride_ak, mask=mask_k[:, None] & mask_n[None, :],
                     other=0.0)
        acc += tl.dot(xt, at)
    acc *= tl.load(scalings_ptr + slot)

    out = out_ptr + slice_id * stride_os + tok[:, None] * stride_om + offs_n[None, :] * stride_on
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc, mask=mask)
    else:
        tl.atomic_add(out, acc, mask=mask, sem="relaxed")


def _check(x: torch.Tensor, lora_a: Sequence[torch.Tensor], out: torch.Tensor | None) -> None:
    if not x.is_cuda or x.dim() != 2 or x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"x must be a 2-D fp16/bf16 CUDA tensor, got {x.dtype} {tuple(x.shape)} "
                         f"on {x.device}")
    if x.stride(1) != 1:
        raise ValueError("x must be contiguous along features (stride(1) == 1)")
    if not 1 <= len(lora_a) <= MAX_SLICES:
        raise ValueError(f"1 to {MAX_SLICES} lora_a slices, got {len(lora_a)}")
    first = lora_a[0]
    for a in lora_a:
        if (a.dtype != x.dtype or a.device != x.device or a.dim() != 3 or a.shape != first.shape
                or a.stride() != first.stride() or a.stride(2) != 1):
            raise ValueError("every lora_a slice must be [max_loras, max_rank, in] with x's dtype and "
                             "device, one shape and one stride, contiguous along in")
    if first.shape[2] != x.shape[1]:
        raise ValueError(f"lora_a in_features {first.shape[2]} != x features {x.shape[1]}")
    want = (len(lora_a), x.shape[0], first.shape[1])
    if out is not None and (out.shape != want or out.dtype != torch.float32 or out.device != x.device):
        raise ValueError(f"out must be float32 {list(want)} on {x.device}, got {out.dtype} "
                         f"{tuple(out.shape)} on {out.device}")


def lora_shrink_triton(x: torch.Tensor, lora_a: Sequence[torch.Tensor], meta: LoraBatchMeta,
                       ranks: torch.Tensor, scalings: torch.Tensor, *,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] fp16/bf16; lora_a: 1-3 slices of [L, R, K]; meta prepared for T tokens and L slots;
    ranks int32 [L]; scalings fp32 [L]; out fp32 [S, T, R] or None. Returns out: the scaled
    products at [s, t, :rank] of tokens with an adapter, zeros everywhere else."""
    _check(x, lora_a, out)
    num_loras, max_rank, k = lora_a[0].shape
    num_tokens = x.shape[0]
    check_step(meta, ranks, num_tokens, num_loras, x.device, scalings)
    if out is None:
        out = torch.empty(len(lora_a), num_tokens, max_rank, dtype=torch.float32, device=x.device)
    out.zero_()  # the defined value of every entry no program writes; split-K adds into it
    if num_tokens == 0:
        return out
    if meta.block_m < 16:
        raise ValueError(f"the Triton kernels need meta.block_m >= 16 (tl.dot), got {meta.block_m}")
    cfg = shrink_config(num_tokens, max_rank, k)
    num_n_tiles = triton.cdiv(max_rank, cfg["BLOCK_N"])
    grid = (meta.tile_bound(num_tokens) * num_n_tiles * cfg["SPLIT_K"], len(lora_a))
    a = list(lora_a) + [lora_a[0]] * (MAX_SLICES - len(lora_a))
    _lora_shrink_kernel[grid](
        x, a[0], a[1], a[2], out,
        meta.sorted_token_ids, meta.tile_slot, meta.tile_start, meta.tile_rows, ranks, scalings,
        k, num_n_tiles,
        x.stride(0), x.stride(1), a[0].stride(0), a[0].stride(1), a[0].stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        BLOCK_M=meta.block_m, **cfg, **pdl.triton_args(x.device),
    )
    return out
