"""Fused RMSNorm and rotary embedding for the decode step.

In a decode step every op touches a few KB, so each torch op costs a kernel launch's fixed time on
the GPU: RMSNorm in torch is ~7 kernels (upcast, square, mean, add, rsqrt, scale, downcast, weight)
and RoPE ~5 per tensor. One kernel each. The math is the torch path's (``inlaid.engine.model``):
statistics in fp32, the normalised row rounded to the activation dtype before the weight multiply,
rotate-half RoPE — so the two paths agree to rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, n_cols, eps, stride_x, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    normed = (x * inv).to(out_ptr.dtype.element_ty)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_o + offs, normed * w, mask=mask)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, H] -> [T, H]; H up to 16384 in one block per row."""
    out = torch.empty_like(x)
    n = x.shape[-1]
    block = triton.next_power_of_2(n)
    _rms_norm_kernel[(x.shape[0],)](x, weight, out, n, eps, x.stride(0), out.stride(0), BLOCK=block,
                                     num_warps=4 if block <= 4096 else 8)
    return out


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, stride_t, stride_h, stride_c, HALF: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    offs = tl.arange(0, HALF)
    base = x_ptr + t * stride_t + h * stride_h
    x1 = tl.load(base + offs).to(tl.float32)
    x2 = tl.load(base + HALF + offs).to(tl.float32)
    # cos/sin repeat their first half (transformers' emb = cat(freqs, freqs)): read each half
    # where the torch path does, so a scaled (e.g. llama3) table is used the same way
    c1 = tl.load(cos_ptr + t * stride_c + offs).to(tl.float32)
    c2 = tl.load(cos_ptr + t * stride_c + HALF + offs).to(tl.float32)
    s1 = tl.load(sin_ptr + t * stride_c + offs).to(tl.float32)
    s2 = tl.load(sin_ptr + t * stride_c + HALF + offs).to(tl.float32)
    tl.store(base + offs, (x1 * c1 - x2 * s1).to(x_ptr.dtype.element_ty))
    tl.store(base + HALF + offs, (x2 * c2 + x1 * s2).to(x_ptr.dtype.element_ty))


def rope_triton_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """In place: x [T, heads, D] (last dim contiguous) rotated by cos/sin [T, D]; returns x."""
    tokens, heads, dim = x.shape
    if x.stride(2) != 1 or cos.stride(1) != 1 or dim & (dim - 1):
        raise ValueError("rope needs a contiguous power-of-2 head dim")
    _rope_kernel[(tokens, heads)](x, cos, sin, x.stride(0), x.stride(1), cos.stride(0), HALF=dim // 2,
                                  num_warps=1)
    return x
