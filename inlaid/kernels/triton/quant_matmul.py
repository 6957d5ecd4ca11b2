"""Triton W{2,3,4,8}A16 GEMM reading the GPTQ v1 layout directly.

Each program computes a [BLOCK_M, BLOCK_N] tile of y = x @ W^T. Per K-step it loads the packed
words that hold its BLOCK_K x BLOCK_N codes, unpacks them in registers, looks up each row's group
(g_idx, so act-order needs no permutation), dequantizes to fp16/bf16 and feeds ``tl.dot``.
For small M the weight read is the whole cost, so the K loop is split over SPLIT_K programs:
enough programs to cover every SM even when N is small. They add their fp32 partial tiles into a
per-device workspace; the last of a tile's programs to arrive (an arrival counter per tile) writes
the sum to y in y's dtype and zeroes the workspace tile and its counter again. So a split-K call is
one kernel: no memset before it and no cast after it (at batch-32 decode those two extra kernels per
GEMM cost ~0.5 ms a step). The workspace belongs to one stream at a time (the engine has one).
(A tensor-core-free GEMV variant for M <= 8 was tried and measured slower: docs/results/kernels.md.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from inlaid.kernels import dispatch
from inlaid.kernels.quant_matmul import PreparedQuant, split_k_state


@triton.jit
def _unpack_gather(qw_ptr, offs_k, offs_n, wmask, stride_qk, stride_qn, BITS: tl.constexpr):
    """Codes [BLOCK_K, BLOCK_N] for any bit width by per-row word gather (3 bits: codes 10 and 21
    of each 32 straddle two words, so their high bits come from the next word)."""
    bit = offs_k * BITS
    word = bit // 32
    shift = (bit % 32).to(tl.uint32)
    packed = tl.load(qw_ptr + word[:, None] * stride_qk + offs_n[None, :] * stride_qn,
                     mask=wmask, other=0).to(tl.uint32, bitcast=True)
    codes = packed >> shift[:, None]
    straddle = (shift > 32 - BITS)[:, None] & wmask
    nxt = tl.load(qw_ptr + (word[:, None] + 1) * stride_qk + offs_n[None, :] * stride_qn,
                  mask=straddle, other=0).to(tl.uint32, bitcast=True)
    return codes | tl.where(straddle, nxt << ((32 - shift) % 32)[:, None], 0)


@triton.jit
def _load_codes(qw_ptr, k0, offs_k, offs_n, mask_k, mask_n, K, stride_qk, stride_qn, BITS: tl.constexpr,
                BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Raw codes [BLOCK_K, BLOCK_N] of rows k0.. (bits above BITS not yet masked off)."""
    if BITS == 3:
        return _unpack_gather(qw_ptr, offs_k, offs_n, mask_k[:, None] & mask_n[None, :], stride_qk, stride_qn,
                              BITS)
    else:
        # PER_WORD codes share a word: load each word once, then fan it out in registers.
        PER_WORD: tl.constexpr = 32 // BITS
        offs_w = k0 // PER_WORD + tl.arange(0, BLOCK_K // PER_WORD)
        words = tl.load(qw_ptr + offs_w[:, None] * stride_qk + offs_n[None, :] * stride_qn,
                        mask=(offs_w < K // PER_WORD)[:, None] & mask_n[None, :], other=0)
        words = words.to(tl.uint32, bitcast=True)
        shifts = (tl.arange(0, PER_WORD) * BITS).to(tl.uint32)
        return tl.reshape(words[:, None, :] >> shifts[None, :, None], (BLOCK_K, BLOCK_N))


@triton.jit
def _dequant(codes, scales_ptr, zeros_ptr, gidx_ptr, k0, offs_k, offs_n, mask_k, mask_n, stride_sg, dtype,
             BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, MAGIC: tl.constexpr):
    """(code - zero) * scale for a [rows of offs_k, BLOCK_N] tile of raw codes (bits above BITS ignored).

    In the compute dtype: codes and zero points are small integers (exact in fp16 and bf16), so the only
    rounding is the one product, as in the fp32 path, at half the ALU work."""
    MASK: tl.constexpr = (1 << BITS) - 1
    if MAGIC:
        # fp16 only: OR-ing a code (< 1024) into the mantissa of 1024.0 gives exactly 1024 + code, with
        # two integer ops instead of an int-to-float conversion (a quarter-rate instruction).
        codes = ((codes & MASK) | 0x6400).to(tl.uint16).to(tl.float16, bitcast=True)
    else:
        codes = (codes & MASK).to(dtype)
    if GROUP_SIZE > 0:
        # Natural order and BLOCK_K divides the group: one scale/zero row per K step.
        soff = (k0 // GROUP_SIZE) * stride_sg + offs_n
        scale = tl.load(scales_ptr + soff, mask=mask_n, other=0.0)[None, :]
        zero = tl.load(zeros_ptr + soff, mask=mask_n, other=0.0)[None, :]
    else:
        g = tl.load(gidx_ptr + offs_k, mask=mask_k, other=0)
        soff = g[:, None] * stride_sg + offs_n[None, :]
        wmask = mask_k[:, None] & mask_n[None, :]
        scale = tl.load(scales_ptr + soff, mask=wmask, other=0.0)
        zero = tl.load(zeros_ptr + soff, mask=wmask, other=0.0)
    if MAGIC:
        zero = zero + 1024.0  # exact: both are small integers
    return (codes - zero) * scale


@triton.jit
def _mma(acc, x, w, SWAP_AB: tl.constexpr):
    if SWAP_AB:
        # acc^T += W x^T: the dequantized tile (built in registers) is the MMA's left operand, which
        # Hopper's wgmma can read from registers; the right one must sit in shared memory.
        acc = tl.dot(tl.trans(w), tl.trans(x), acc)
    else:  # (no early return: Triton's code generator would go on to trace the rest for this branch too)
        acc = tl.dot(x, w, acc)
    return acc


@triton.jit
def _store_tile(acc, bias_ptr, y_ptr, ws_ptr, count_ptr, tile, offs_m, offs_n, mask_m, mask_n, stride_ym, N,
                pid_k, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """Bias (added once, by the first K split), then a plain store, or the split-K reduction."""
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    out_mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
    else:
        ws_ptrs = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.atomic_add(ws_ptrs, acc, mask=out_mask, sem="relaxed")
        # Every thread's adds are issued before one thread's release on the counter; the program
        # that sees SPLIT_K - 1 arrivals before its own then reads complete sums (acquire).
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.load(ws_ptrs, mask=out_mask, other=0.0, cache_modifier=".cg")
            tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=out_mask)
            tl.store(ws_ptrs, tl.zeros_like(total), mask=out_mask)
            tl.atomic_xchg(count_ptr + tile, 0)


@triton.jit
def _quant_matmul_kernel(
    x_ptr, qw_ptr, scales_ptr, zeros_ptr, gidx_ptr, bias_ptr, y_ptr, ws_ptr, count_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_ym,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SWAP_AB: tl.constexpr, MAGIC: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # Grouped ordering: programs that share weight columns run close together (L2 reuse at large M).
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N

    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_start = pid_k * k_per_split
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        codes = _load_codes(qw_ptr, k0, offs_k, offs_n, mask_k, mask_n, K, stride_qk, stride_qn, BITS, BLOCK_K,
                            BLOCK_N)
        w = _dequant(codes, scales_ptr, zeros_ptr, gidx_ptr, k0, offs_k, offs_n, mask_k, mask_n, stride_sg,
                     x.dtype, BITS, GROUP_SIZE, MAGIC)
        acc = _mma(acc, x, w, SWAP_AB)
    if SWAP_AB:
        acc = tl.trans(acc)

    _store_tile(acc, bias_ptr, y_ptr, ws_ptr, count_ptr, pid, offs_m, offs_n, mask_m, mask_n, stride_ym, N,
                pid_k, HAS_BIAS, SPLIT_K)


def _config(m: int, n: int, k: int, sms: int) -> dict:
    """Block shapes by M regime, from `scripts/bench_kernels.py --sweep` on an H100 over the Llama-2-7B
    shapes, 4-bit g128 (docs/results/kernels.md)."""
    if m <= 32:
        # Decode: the weight read is all the work. The sweeps' best at M 8-32 on all four shapes: the
        # swapped product with fp16 magic dequantization (3-17% faster than the plain one at every
        # shape), BLOCK_N 128 x BLOCK_K 64, the K loop split 8 ways (4-8x more programs than SMs keep
        # more loads in flight).
        split_k = 8
        while split_k > 1 and k // (64 * split_k) < 2:  # at least two K steps per split
            split_k //= 2
        return dict(BLOCK_M=16 if m <= 16 else 32, BLOCK_N=128, BLOCK_K=64, SPLIT_K=split_k, GROUP_M=8,
                    num_warps=4, num_stages=3, SWAP_AB=1, MAGIC=1)
    if m <= 64:
        block_m, block_n, block_k, warps = 64, 64, 128, 4
    else:
        block_m, block_n, block_k, warps = 128, 64, 64, 8
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    # Split K until each SM has ~4 programs (small M: the weight read is all the work, and more
    # loads in flight hide HBM latency).
    split_k = 1
    while tiles * split_k < 4 * sms and k // (block_k * split_k * 2) >= 2 and split_k < 8:
        split_k *= 2
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, GROUP_M=8,
                num_warps=warps, num_stages=3)


# Kernel variants a config switches on (docs/results/kernels.md measures each): SWAP_AB computes
# y^T = W x^T, MAGIC dequantizes fp16 without int-to-float conversions.
_VARIANT = dict(SWAP_AB=0, MAGIC=0)


def quant_matmul_triton(x: torch.Tensor, p: PreparedQuant, config: dict | None = None,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """x: [M, K] fp16/bf16 (CUDA); p: prepared layer on the same device -> y [M, N] in x's dtype
    (written into ``out`` when given). ``config`` forces a kernel and its block shapes."""
    if x.dim() != 2 or x.shape[1] != p.in_features:
        raise ValueError(f"x must be [M, {p.in_features}], got {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16) or p.scales.dtype != x.dtype:
        raise ValueError(f"x ({x.dtype}) and scales ({p.scales.dtype}) must be the same fp16/bf16 dtype")
    if p.qweight.dtype != torch.int32 or p.g_idx.dtype != torch.int32:
        raise ValueError("qweight and g_idx must be int32")
    m, k = x.shape
    n = p.out_features
    sms = dispatch.sm_count(x.device.index or 0)
    cfg = {**_VARIANT, **(config if config is not None else _config(m, n, k, sms))}
    if x.dtype != torch.float16:
        cfg["MAGIC"] = 0  # the 1024.0 mantissa trick is fp16's; bf16 converts
    group_size = p.group_size
    if group_size > 0:
        cfg["BLOCK_K"] = min(cfg["BLOCK_K"], group_size)
    split_k = cfg["SPLIT_K"]
    y = out if out is not None else torch.empty((m, n), device=x.device, dtype=x.dtype)
    if y.stride(1) != 1:
        raise ValueError("out must be contiguous along N")
    bias = p.bias if p.bias is not None else p.scales  # any pointer; unused without HAS_BIAS
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    ws, counts = split_k_state(x.device, m * n, tiles) if split_k > 1 else (y, p.g_idx)  # unused at split 1
    _quant_matmul_kernel[(tiles, split_k)](
        x, p.qweight, p.scales, p.zeros, p.g_idx, bias, y, ws, counts,
        m, n, k,
        x.stride(0), x.stride(1), p.qweight.stride(0), p.qweight.stride(1), p.scales.stride(0),
        y.stride(0),
        BITS=p.bits, GROUP_SIZE=max(group_size, 0), HAS_BIAS=p.bias is not None, **cfg)
    return y


@triton.jit
def _dequantize_kernel(qw_ptr, scales_ptr, zeros_ptr, gidx_ptr, w_ptr, N, K, stride_qk, stride_qn, stride_sg,
                       stride_wk, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, MAGIC: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    k0 = tl.program_id(0) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_k = offs_k < K
    mask_n = offs_n < N
    codes = _load_codes(qw_ptr, k0, offs_k, offs_n, mask_k, mask_n, K, stride_qk, stride_qn, BITS, BLOCK_K, BLOCK_N)
    w = _dequant(codes, scales_ptr, zeros_ptr, gidx_ptr, k0, offs_k, offs_n, mask_k, mask_n, stride_sg,
                 w_ptr.dtype.element_ty, BITS, GROUP_SIZE, MAGIC)
    tl.store(w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :], w, mask=mask_k[:, None] & mask_n[None, :])


def dequantize_triton(p: PreparedQuant) -> torch.Tensor:
    """W^T [K, N] in the scales' dtype, with the same rounding as the GEMM kernel's dequantization."""
    k, n = p.in_features, p.out_features
    w = torch.empty((k, n), device=p.qweight.device, dtype=p.scales.dtype)
    block_k = 64 if p.group_size <= 0 else min(64, p.group_size)  # one group row per tile in natural order
    _dequantize_kernel[(triton.cdiv(k, block_k), triton.cdiv(n, 128))](
        p.qweight, p.scales, p.zeros, p.g_idx, w, n, k, p.qweight.stride(0), p.qweight.stride(1),
        p.scales.stride(0), w.stride(0), BITS=p.bits, GROUP_SIZE=max(p.group_size, 0),
        MAGIC=int(p.scales.dtype == torch.float16), BLOCK_K=block_k, BLOCK_N=128, num_warps=4)
    return w


def quant_matmul_dequant(x: torch.Tensor, p: PreparedQuant) -> torch.Tensor:
    """Large M: dequantize the whole weight once (reads the packed bytes, writes K x N halves), then a
    cuBLAS GEMM, which at M in the hundreds and more runs near the tensor cores' peak where the fused
    kernel does not (docs/results/kernels.md: 2.7x slower than cuBLAS fp16 at M = 2048)."""
    y = x @ dequantize_triton(p)
    return y if p.bias is None else y + p.bias
