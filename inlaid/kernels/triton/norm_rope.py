"""Fused small ops of a decoder layer: residual add + RMSNorm, RoPE + KV-cache write, SiLU-and-mul.

In a decode step every op touches a few KB, so each op costs a kernel launch's fixed time on the
GPU, and inside a CUDA graph still a ~1 µs gap between dependent kernels: RMSNorm in torch is ~7
kernels (upcast, square, mean, add, rsqrt, scale, downcast, weight), RoPE ~5 per tensor, the cache
write one ``index_copy_`` per tensor, SiLU-and-mul two. One kernel each here:

- :func:`add_rms_norm_triton`: ``h = h + delta`` (the residual add, rounded to the activation dtype
  as torch rounds it) and ``norm(h)`` in one pass — 2 launches per layer instead of 4.
- :func:`rope_write_kv_triton`: rotates q in place, rotates k and writes it and v into their cache
  slots — 1 launch instead of 4.
- :func:`silu_mul_triton`: ``silu(gate) * up`` from the fused gate/up output — 1 instead of 2;
  :func:`silu_mul_lora_triton` also adds gate/up's LoRA update (the expand) for decode-sized steps.

The math is the torch path's (``inlaid.engine.model``): statistics in fp32, the normalised row
rounded to the activation dtype before the weight multiply, rotate-half RoPE, SiLU rounded before
the product — so the two paths agree to rounding (tests/kernels/test_norm_rope_gpu.py bounds it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from inlaid.kernels import pdl
from inlaid.kernels.triton.pdl import start as pdl_start


@triton.jit
def _rms_norm_kernel(x_ptr, d_ptr, h_ptr, w_ptr, out_ptr, n_cols, eps, stride_x, stride_d, stride_h,
                     stride_o, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_DELTA:
        # the residual add rounds to the activation dtype (as torch's h + delta does) before the norm
        d = tl.load(d_ptr + row * stride_d + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + d.to(tl.float32)).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + row * stride_h + offs, x, mask=mask)
    x = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    normed = (x * inv).to(out_ptr.dtype.element_ty)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_o + offs, normed * w, mask=mask)


def _norm_launch(x, delta, h, weight, out, eps):
    n = x.shape[-1]
    if x.stride(-1) != 1 or (delta is not None and delta.stride(-1) != 1):
        raise ValueError("rms norm rows must be contiguous")
    if x.shape[0] == 0:
        return
    block = triton.next_power_of_2(n)
    d, hh = (x, x) if delta is None else (delta, h)
    _rms_norm_kernel[(x.shape[0],)](x, d, hh, weight, out, n, eps, x.stride(0), d.stride(0), hh.stride(0),
                                    out.stride(0), HAS_DELTA=delta is not None, BLOCK=block,
                                    num_warps=4 if block <= 4096 else 8, **pdl.triton_args(x.device))


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, H] -> [T, H]; H up to 16384 in one block per row."""
    out = torch.empty_like(x)
    _norm_launch(x, None, None, weight, out, eps)
    return out


def add_rms_norm_triton(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(h + delta), h + delta) for h, delta [T, H]: the residual add and the next norm."""
    if delta.shape != h.shape or delta.dtype != h.dtype:
        raise ValueError(f"delta {delta.dtype} {tuple(delta.shape)} does not match h {h.dtype} "
                         f"{tuple(h.shape)}")
    new_h, out = torch.empty_like(h), torch.empty_like(h)
    _norm_launch(h, delta, new_h, weight, out, eps)
    return out, new_h


@triton.jit
def _rotate(base, heads, c1, c2, s1, s2, stride_h, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rotate-half RoPE of ``heads`` rows of [.., HALF * 2] at ``base``: the two rotated halves,
    the rows' first-half pointers and their mask."""
    offs_h = tl.arange(0, BLOCK_H)
    offs = tl.arange(0, HALF)
    ptr = base + offs_h[:, None] * stride_h + offs[None, :]
    mask = offs_h[:, None] < heads
    x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    return x1 * c1[None, :] - x2 * s1[None, :], x2 * c2[None, :] + x1 * s2[None, :], ptr, mask


@triton.jit
def _rope_kv_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, slot_ptr, heads, kv_heads,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_c,
                    stride_cs, stride_ch, HALF: tl.constexpr, BLOCK_HQ: tl.constexpr,
                    BLOCK_HK: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
    t = tl.program_id(0)
    offs = tl.arange(0, HALF)
    # cos/sin repeat their first half (transformers' emb = cat(freqs, freqs)): read each half
    # where the torch path does, so a scaled (e.g. llama3) table is used the same way
    c1 = tl.load(cos_ptr + t * stride_c + offs).to(tl.float32)
    c2 = tl.load(cos_ptr + t * stride_c + HALF + offs).to(tl.float32)
    s1 = tl.load(sin_ptr + t * stride_c + offs).to(tl.float32)
    s2 = tl.load(sin_ptr + t * stride_c + HALF + offs).to(tl.float32)

    lo, hi, ptr, mask = _rotate(q_ptr + t * stride_qt, heads, c1, c2, s1, s2, stride_qh, HALF, BLOCK_HQ)
    tl.store(ptr, lo.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(ptr + HALF, hi.to(q_ptr.dtype.element_ty), mask=mask)

    slot = tl.load(slot_ptr + t).to(tl.int64)
    lo, hi, _, mask = _rotate(k_ptr + t * stride_kt, kv_heads, c1, c2, s1, s2, stride_kh, HALF, BLOCK_HK)
    offs_h = tl.arange(0, BLOCK_HK)
    dst = kc_ptr + slot * stride_cs + offs_h[:, None] * stride_ch + offs[None, :]
    tl.store(dst, lo.to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, hi.to(kc_ptr.dtype.element_ty), mask=mask)
    src = v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs[None, :]
    dst = vc_ptr + slot * stride_cs + offs_h[:, None] * stride_ch + offs[None, :]
    tl.store(dst, tl.load(src, mask=mask, other=0.0), mask=mask)
    tl.store(dst + HALF, tl.load(src + HALF, mask=mask, other=0.0), mask=mask)


def rope_write_kv_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         slot_mapping: torch.Tensor) -> torch.Tensor:
    """Rotate q [T, heads, D] in place and return it; write rope(k) and v [T, kv_heads, D] into
    k_cache/v_cache [slots, kv_heads, D] at ``slot_mapping`` [T]. q/k/v may be strided views (slices
    of the fused qkv output) with a contiguous head dim; cos/sin [T, D]."""
    tokens, heads, dim = q.shape
    kv_heads = k.shape[1]
    if dim & (dim - 1) or any(t.stride(-1) != 1 for t in (q, k, v, cos, sin, k_cache)):
        raise ValueError("rope needs a contiguous power-of-2 head dim")
    if (k.shape != v.shape or k.shape[0] != tokens or k_cache.shape != v_cache.shape
            or k_cache.stride() != v_cache.stride() or k_cache.shape[1:] != k.shape[1:]
            or slot_mapping.shape != (tokens,) or cos.stride() != sin.stride()
            or cos.shape != (tokens, dim) or sin.shape != cos.shape
            or len({q.dtype, k.dtype, v.dtype, k_cache.dtype, v_cache.dtype}) != 1):
        raise ValueError("q/k/v (one dtype), the caches (the same dtype), cos/sin [T, D] and the "
                         "slot mapping do not fit together")
    if tokens:
        _rope_kv_kernel[(tokens,)](
            q, k, v, cos, sin, k_cache, v_cache, slot_mapping, heads, kv_heads,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
            k_cache.stride(0), k_cache.stride(1), HALF=dim // 2,
            BLOCK_HQ=triton.next_power_of_2(heads), BLOCK_HK=triton.next_power_of_2(kv_heads),
            num_warps=4 if heads * dim >= 2048 else 1, **pdl.triton_args(q.device))
    return q


@triton.jit
def _silu_times(gate, up, dtype: tl.constexpr):
    """silu(gate) * up in ``dtype`` from fp32 gate/up holding ``dtype`` values: silu rounds to the
    activation dtype before the product, as silu(gate) * up does in torch."""
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype)
    return (act.to(tl.float32) * up).to(dtype)


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, n_cols, stride_x, stride_o, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_cols
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n_cols + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, _silu_times(gate, up, out_ptr.dtype.element_ty), mask=mask)


def silu_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2I] (gate columns first, then up) -> silu(gate) * up [T, I]."""
    tokens, width = gate_up.shape
    if width % 2 or gate_up.stride(1) != 1:
        raise ValueError("gate_up must be [T, 2I] with contiguous rows")
    out = torch.empty(tokens, width // 2, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    if tokens:
        _silu_mul_kernel[(tokens, triton.cdiv(width // 2, block))](
            gate_up, out, width // 2, gate_up.stride(0), out.stride(0), BLOCK=block, num_warps=4,
            **pdl.triton_args(gate_up.device))
    return out


@triton.jit
def _silu_mul_lora_kernel(x_ptr, out_ptr, buf_ptr, bg_ptr, bu_ptr, slot_ptr, ranks_ptr, n_cols,
                          num_loras, stride_x, stride_o, stride_bs, stride_bt, stride_bl, stride_bn,
                          BLOCK: tl.constexpr, BLOCK_R: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_cols
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n_cols + offs, mask=mask, other=0.0).to(tl.float32)
    # Without an adapter the rank is 0 and every LoRA load below is masked off: no branch, no bytes.
    slot = tl.load(slot_ptr + row)
    has = slot < num_loras
    slot = tl.where(has, slot, 0).to(tl.int64)
    rank = tl.where(has, tl.load(ranks_ptr + slot), 0)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    h_gate = tl.load(buf_ptr + row * stride_bt + offs_r, mask=mask_r, other=0.0)
    h_up = tl.load(buf_ptr + stride_bs + row * stride_bt + offs_r, mask=mask_r, other=0.0)
    b_off = slot * stride_bl + offs[:, None] * stride_bn + offs_r[None, :]
    b_mask = mask[:, None] & mask_r[None, :]
    b_gate = tl.load(bg_ptr + b_off, mask=b_mask, other=0.0).to(tl.float32)
    b_up = tl.load(bu_ptr + b_off, mask=b_mask, other=0.0).to(tl.float32)
    # the projection's output rounds to the activation dtype once, base + update (as lora_expand
    # leaves it), then the epilogue above
    dtype = out_ptr.dtype.element_ty
    gate = (gate + tl.sum(b_gate * h_gate[None, :], axis=1)).to(dtype).to(tl.float32)
    up = (up + tl.sum(b_up * h_up[None, :], axis=1)).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, _silu_times(gate, up, dtype), mask=mask)


def silu_mul_lora_triton(gate_up: torch.Tensor, buf: torch.Tensor, lora_b: list[torch.Tensor],
                         slot_of_token: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` where gate/up are the fused projection's base output ``gate_up`` [T, 2I]
    (gate in columns [0, I), up in [I, 2I): the slices' default offsets)
    plus its LoRA update, expanded here from the shrink's ``buf`` fp32 [2, T, R] and the two slices'
    B ``lora_b`` [L, I, R] (``slot_of_token`` int32 [>= T], L for none; ``ranks`` int32 [L]).

    For decode-sized T: one program per (token, column block) reads its token's B rows, so the
    separate expand launch and its read-modify-write of gate_up go away; with many tokens per
    adapter (prefill) the tiled expand, which reads B once per tile, is the cheaper one."""
    tokens, width = gate_up.shape
    inter = width // 2
    num_loras, _, max_rank = lora_b[0].shape
    if (width % 2 or gate_up.stride(1) != 1 or len(lora_b) != 2 or buf.shape != (2, tokens, max_rank)
            or buf.dtype != torch.float32 or buf.stride(2) != 1
            or any(b.shape != (num_loras, inter, max_rank) or b.stride() != lora_b[0].stride()
                   or b.stride(2) != 1 or b.dtype != gate_up.dtype for b in lora_b)
            or slot_of_token.dtype != torch.int32 or slot_of_token.shape[0] < tokens
            or ranks.shape != (num_loras,) or ranks.dtype != torch.int32):
        raise ValueError("gate_up [T, 2I], buf fp32 [2, T, R], two B [L, I, R] in gate_up's dtype, "
                         "int32 slot_of_token [>= T] and ranks [L] expected")
    out = torch.empty(tokens, inter, dtype=gate_up.dtype, device=gate_up.device)
    block = 128
    if tokens:
        _silu_mul_lora_kernel[(tokens, triton.cdiv(inter, block))](
            gate_up, out, buf, lora_b[0], lora_b[1], slot_of_token, ranks, inter, num_loras,
            gate_up.stride(0), out.stride(0), buf.stride(0), buf.stride(1), lora_b[0].stride(0),
            lora_b[0].stride(1), BLOCK=block, BLOCK_R=max(16, triton.next_power_of_2(max_rank)),
            num_warps=4, **pdl.triton_args(gate_up.device))
    return out
