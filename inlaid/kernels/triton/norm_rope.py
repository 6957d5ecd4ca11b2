"""Fused small ops of a decoder layer: residual add + RMSNorm, RoPE + KV-cache write, SiLU-and-mul.

In a decode step every op touches a few KB, so each op costs a kernel launch's fixed time on the
GPU, and inside a CUDA graph still a ~1 µs gap between dependent kernels: RMSNorm in torch is ~7
kernels (upcast, square, mean, add, rsqrt, scale, downcast, weight), RoPE ~5 per tensor, the cache
write one ``index_copy_`` per tensor, SiLU-and-mul two. One kernel each here:

- :func:`add_rms_norm_triton`: ``h = h + delta`` (the residual add, rounded to the activation dtype
  as torch rounds it) and ``norm(h)`` in one pass — 2 launches per layer instead of 4;
  :func:`add_rms_norm_lora_triton` also adds the LoRA update of the projection that made ``delta``
  (o or down: the expand) for decode-sized steps.
- :func:`rope_write_kv_triton`: rotates q in place, rotates k and writes it and v into their cache
  slots — 1 launch instead of 4; :func:`rope_write_kv_lora_triton` also adds q/k/v's LoRA update
  (the expand) for decode-sized steps.
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
from inlaid.kernels.triton.pdl import trigger as pdl_trigger
from inlaid.kernels.triton.pdl import wait as pdl_wait
from inlaid.kernels.triton.rank_mask import rank_mask
from inlaid.kernels.triton.scratch import persistent


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
def _add_rms_norm_lora_kernel(h_ptr, d_ptr, hout_ptr, w_ptr, out_ptr, buf_ptr, b_ptr, slot_ptr, ranks_ptr,
                              count_ptr, n_cols, num_loras, eps, stride_h, stride_d, stride_ho, stride_o,
                              stride_bt, stride_bl, stride_bn, BLOCK: tl.constexpr, BLOCK_R: tl.constexpr,
                              MAX_R: tl.constexpr, ROW: tl.constexpr, PDL: tl.constexpr):
    pdl_trigger(PDL)
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_cols
    # before the wait (see _silu_mul_lora_kernel): the token's adapter and its B rows
    slot, rank = _adapter_of(slot_ptr, ranks_ptr, row, num_loras)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    b = tl.load(b_ptr + slot * stride_bl + offs[:, None] * stride_bn + offs_r[None, :],
                mask=mask[:, None] & rank_mask(offs_r, rank, MAX_R)[None, :], other=0.0).to(tl.float32)
    pdl_wait(PDL)
    hb = tl.load(buf_ptr + row * stride_bt + offs_r, mask=mask_r, other=0.0)
    dtype = hout_ptr.dtype.element_ty
    # the projection's output rounds once, base + update (as lora_expand leaves it), then the
    # residual add rounds (as h + delta does)
    d = tl.load(d_ptr + row * stride_d + offs, mask=mask, other=0.0).to(tl.float32)
    d = (d + tl.sum(b * hb[None, :], axis=1)).to(dtype).to(tl.float32)
    x = (tl.load(h_ptr + row * stride_h + offs, mask=mask, other=0.0).to(tl.float32) + d).to(dtype)
    tl.store(hout_ptr + row * stride_ho + offs, x, mask=mask)
    # The norm needs the whole row: the last of the row's programs to finish normalises it. The
    # barrier orders every thread's stores before the release of the arrival count; that program's
    # acquire then makes the other programs' rows visible (read through L2: .cg).
    tl.debug_barrier()
    arrived = tl.atomic_add(count_ptr + row, 1, sem="acq_rel", scope="gpu")
    if arrived == tl.num_programs(1) - 1:
        tl.debug_barrier()
        full = tl.arange(0, ROW)
        fmask = full < n_cols
        xr = tl.load(hout_ptr + row * stride_ho + full, mask=fmask, other=0.0, cache_modifier=".cg")
        xr = xr.to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(xr * xr, axis=0) / n_cols + eps)  # as _rms_norm_kernel
        normed = (xr * inv).to(out_ptr.dtype.element_ty)
        w = tl.load(w_ptr + full, mask=fmask, other=0.0)
        tl.store(out_ptr + row * stride_o + full, normed * w, mask=fmask)
        tl.store(count_ptr + row, 0)  # ready for the next launch


def add_rms_norm_lora_triton(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                             buf: torch.Tensor, lora_b: torch.Tensor, slot_of_token: torch.Tensor,
                             ranks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(h + delta'), h + delta') where delta' is ``delta`` [T, H], the base output of a
    one-slice projection (o or down), plus its LoRA update, expanded here from the shrink's
    ``buf`` fp32 [1, T, R] and B ``lora_b`` [L, H, R] (``slot_of_token`` int32 [>= T], L for none;
    ``ranks`` int32 [L]). ``delta`` itself is left as it is.

    For decode-sized T: programs per (token, 256-column block) each read their block of the
    token's B rows, so the separate expand launch and its read-modify-write of ``delta`` go away.
    The row's last program to finish normalises the whole row, with the plain kernel's reduction
    (the same block shape), so rows equal ``add_rms_norm_triton`` after the expand."""
    tokens, hidden = h.shape
    num_loras, _, max_rank = lora_b.shape
    if (delta.shape != h.shape or delta.dtype != h.dtype or h.stride(1) != 1 or delta.stride(1) != 1
            or buf.shape != (1, tokens, max_rank) or buf.dtype != torch.float32 or buf.stride(2) != 1
            or lora_b.shape[1] != hidden or lora_b.stride(2) != 1 or lora_b.dtype != h.dtype
            or slot_of_token.dtype != torch.int32 or slot_of_token.shape[0] < tokens
            or ranks.shape != (num_loras,) or ranks.dtype != torch.int32):
        raise ValueError("h and delta [T, H] with contiguous rows, buf fp32 [1, T, R], B [L, H, R] in "
                         "h's dtype, int32 slot_of_token [>= T] and ranks [L] expected")
    new_h, out = torch.empty_like(h), torch.empty_like(h)
    block = 256
    if tokens:
        row = triton.next_power_of_2(hidden)
        _add_rms_norm_lora_kernel[(tokens, triton.cdiv(hidden, block))](
            h, delta, new_h, weight, out, buf, lora_b, slot_of_token, ranks,
            persistent("norm_rows", h.device, tokens, torch.int32), hidden, num_loras, eps, h.stride(0),
            delta.stride(0), new_h.stride(0), out.stride(0), buf.stride(1), lora_b.stride(0),
            lora_b.stride(1),
            BLOCK=block, BLOCK_R=max(16, triton.next_power_of_2(max_rank)), MAX_R=max_rank, ROW=row,
            num_warps=4 if row <= 4096 else 8, **pdl.triton_args(h.device))
    return out, new_h


@triton.jit
def _rope_halves(x1, x2, c1, c2, s1, s2):
    """Rotate-half RoPE of fp32 rows given as their two halves (cos/sin halves broadcast)."""
    return x1 * c1 - x2 * s1, x2 * c2 + x1 * s2


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
    lo, hi = _rope_halves(x1, x2, c1[None, :], c2[None, :], s1[None, :], s2[None, :])
    return lo, hi, ptr, mask


@triton.jit
def _cos_sin(cos_ptr, sin_ptr, t, stride_c, HALF: tl.constexpr):
    """Token t's cos/sin halves in fp32. cos/sin repeat their first half (transformers' emb =
    cat(freqs, freqs)): each half is read where the torch path reads it, so a scaled (e.g. llama3)
    table is used the same way."""
    offs = tl.arange(0, HALF)
    c1 = tl.load(cos_ptr + t * stride_c + offs).to(tl.float32)
    c2 = tl.load(cos_ptr + t * stride_c + HALF + offs).to(tl.float32)
    s1 = tl.load(sin_ptr + t * stride_c + offs).to(tl.float32)
    s2 = tl.load(sin_ptr + t * stride_c + HALF + offs).to(tl.float32)
    return c1, c2, s1, s2


@triton.jit
def _rope_kv_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, slot_ptr, heads, kv_heads,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_c,
                    stride_cs, stride_ch, HALF: tl.constexpr, BLOCK_HQ: tl.constexpr,
                    BLOCK_HK: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
    t = tl.program_id(0)
    offs = tl.arange(0, HALF)
    c1, c2, s1, s2 = _cos_sin(cos_ptr, sin_ptr, t, stride_c, HALF)
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


def _check_rope(q, k, v, cos, sin, k_cache, v_cache, slot_mapping) -> None:
    tokens, _, dim = q.shape
    if dim & (dim - 1) or any(t.stride(-1) != 1 for t in (q, k, v, cos, sin, k_cache)):
        raise ValueError("rope needs a contiguous power-of-2 head dim")
    if (k.shape != v.shape or k.shape[0] != tokens or k_cache.shape != v_cache.shape
            or k_cache.stride() != v_cache.stride() or k_cache.shape[1:] != k.shape[1:]
            or slot_mapping.shape != (tokens,) or cos.stride() != sin.stride()
            or cos.shape != (tokens, dim) or sin.shape != cos.shape
            or len({q.dtype, k.dtype, v.dtype, k_cache.dtype, v_cache.dtype}) != 1):
        raise ValueError("q/k/v (one dtype), the caches (the same dtype), cos/sin [T, D] and the "
                         "slot mapping do not fit together")


def rope_write_kv_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         slot_mapping: torch.Tensor) -> torch.Tensor:
    """Rotate q [T, heads, D] in place and return it; write rope(k) and v [T, kv_heads, D] into
    k_cache/v_cache [slots, kv_heads, D] at ``slot_mapping`` [T]. q/k/v may be strided views (slices
    of the fused qkv output) with a contiguous head dim; cos/sin [T, D]."""
    _check_rope(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)
    tokens, heads, dim = q.shape
    kv_heads = k.shape[1]
    if tokens:
        _rope_kv_kernel[(tokens,)](
            q, k, v, cos, sin, k_cache, v_cache, slot_mapping, heads, kv_heads,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
            k_cache.stride(0), k_cache.stride(1), HALF=dim // 2,
            BLOCK_HQ=triton.next_power_of_2(heads), BLOCK_HK=triton.next_power_of_2(kv_heads),
            num_warps=4 if heads * dim >= 2048 else 1, **pdl.triton_args(q.device))
    return q


@triton.jit
def _adapter_of(slot_ptr, ranks_ptr, t, num_loras):
    """Token t's adapter slot (int64; 0 when it has none) and rank. Without an adapter the rank
    is 0, so every LoRA load masked by it is off: no branch, no bytes."""
    slot = tl.load(slot_ptr + t)
    has = slot < num_loras
    slot = tl.where(has, slot, 0).to(tl.int64)
    return slot, tl.where(has, tl.load(ranks_ptr + slot), 0)


@triton.jit
def _lora_head(buf_ptr, b_ptr, col0, rank, stride_bn, HALF: tl.constexpr, BLOCK_R: tl.constexpr,
               MAX_R: tl.constexpr):
    """One token's LoRA update of one head, columns [col0, col0 + 2 HALF): its shrink row (fp32,
    at ``buf_ptr``) times its slot's B rows (at ``b_ptr``, ``stride_bn`` apart), as two fp32
    halves. Rank 0 (no adapter) masks every load: zeros, no bytes."""
    offs = tl.arange(0, HALF)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    h = tl.load(buf_ptr + offs_r, mask=mask_r, other=0.0)
    rows = b_ptr + (col0 + offs)[:, None] * stride_bn + offs_r[None, :]
    cols = rank_mask(offs_r, rank, MAX_R)[None, :]
    b1 = tl.load(rows, mask=cols, other=0.0).to(tl.float32)
    b2 = tl.load(rows + HALF * stride_bn, mask=cols, other=0.0).to(tl.float32)
    return tl.sum(b1 * h[None, :], axis=1), tl.sum(b2 * h[None, :], axis=1)


@triton.jit
def _plus_lora(ptr, d1, d2, HALF: tl.constexpr):
    """A head row at ``ptr`` plus its update, rounded once to the activation dtype as lora_expand
    leaves the projection's output, back in fp32 halves."""
    offs = tl.arange(0, HALF)
    dtype = ptr.dtype.element_ty
    x1 = (tl.load(ptr + offs).to(tl.float32) + d1).to(dtype).to(tl.float32)
    x2 = (tl.load(ptr + HALF + offs).to(tl.float32) + d2).to(dtype).to(tl.float32)
    return x1, x2


@triton.jit
def _rope_kv_lora_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, slot_ptr, buf_ptr,
                         bq_ptr, bk_ptr, bv_ptr, lora_slot_ptr, ranks_ptr, heads, num_loras,
                         stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_c,
                         stride_cs, stride_ch, stride_bs, stride_bt, stride_bql, stride_bkl, stride_bn,
                         HALF: tl.constexpr, BLOCK_R: tl.constexpr, MAX_R: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
    t = tl.program_id(0)
    unit = tl.program_id(1)  # a query head, or (from ``heads`` on) a KV head's K and V rows
    offs = tl.arange(0, HALF)
    c1, c2, s1, s2 = _cos_sin(cos_ptr, sin_ptr, t, stride_c, HALF)
    lora_slot, rank = _adapter_of(lora_slot_ptr, ranks_ptr, t, num_loras)
    row = buf_ptr + t * stride_bt
    dtype = q_ptr.dtype.element_ty
    if unit < heads:
        d1, d2 = _lora_head(row, bq_ptr + lora_slot * stride_bql, unit * 2 * HALF, rank, stride_bn,
                            HALF, BLOCK_R, MAX_R)
        ptr = q_ptr + t * stride_qt + unit * stride_qh
        x1, x2 = _plus_lora(ptr, d1, d2, HALF)
        lo, hi = _rope_halves(x1, x2, c1, c2, s1, s2)
        tl.store(ptr + offs, lo.to(dtype))
        tl.store(ptr + HALF + offs, hi.to(dtype))
    else:
        kvh = unit - heads
        col0 = kvh * 2 * HALF
        dst = tl.load(slot_ptr + t).to(tl.int64) * stride_cs + kvh * stride_ch + offs
        d1, d2 = _lora_head(row + stride_bs, bk_ptr + lora_slot * stride_bkl, col0, rank, stride_bn,
                            HALF, BLOCK_R, MAX_R)
        x1, x2 = _plus_lora(k_ptr + t * stride_kt + kvh * stride_kh, d1, d2, HALF)
        lo, hi = _rope_halves(x1, x2, c1, c2, s1, s2)
        tl.store(kc_ptr + dst, lo.to(dtype))
        tl.store(kc_ptr + dst + HALF, hi.to(dtype))
        d1, d2 = _lora_head(row + 2 * stride_bs, bv_ptr + lora_slot * stride_bkl, col0, rank,
                            stride_bn, HALF, BLOCK_R, MAX_R)
        x1, x2 = _plus_lora(v_ptr + t * stride_vt + kvh * stride_vh, d1, d2, HALF)
        tl.store(vc_ptr + dst, x1.to(dtype))
        tl.store(vc_ptr + dst + HALF, x2.to(dtype))


def check_rope_lora(q: torch.Tensor, k: torch.Tensor, buf: torch.Tensor, lora_b: list[torch.Tensor],
                    slot_of_token: torch.Tensor, ranks: torch.Tensor) -> None:
    """The LoRA inputs of the fused q/k/v expand fit q [T, heads, D] and k [T, kv_heads, D]."""
    tokens, heads, dim = q.shape
    kv_heads = k.shape[1]
    num_loras, _, max_rank = lora_b[0].shape
    if (len(lora_b) != 3 or buf.shape != (3, tokens, max_rank) or buf.dtype != torch.float32
            or buf.stride(2) != 1 or lora_b[0].shape != (num_loras, heads * dim, max_rank)
            or any(b.shape != (num_loras, kv_heads * dim, max_rank) for b in lora_b[1:])
            or lora_b[1].stride() != lora_b[2].stride()
            or any(b.stride(1) != max_rank or b.stride(2) != 1 or b.dtype != q.dtype for b in lora_b)
            or slot_of_token.dtype != torch.int32 or slot_of_token.shape[0] < tokens
            or ranks.shape != (num_loras,) or ranks.dtype != torch.int32):
        raise ValueError("buf fp32 [3, T, R], B [L, heads * D, R] and two [L, kv_heads * D, R] with "
                         "rows contiguous in q's dtype, int32 slot_of_token [>= T] and ranks [L] expected")


def rope_write_kv_lora_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                              sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              slot_mapping: torch.Tensor, buf: torch.Tensor, lora_b: list[torch.Tensor],
                              slot_of_token: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """:func:`rope_write_kv_triton` of q/k/v plus their LoRA update, expanded here from the fused
    q/k/v projection's shrink output ``buf`` fp32 [3, T, R] and the three slices' B ``lora_b``
    ([L, heads * D, R], then two [L, kv_heads * D, R]; ``slot_of_token`` int32 [>= T], L for
    none; ``ranks`` int32 [L]). q is rotated in place with its update; k and v get theirs only
    where they are written, in the caches (nothing reads the projection's k/v columns after this).

    For decode-sized T, like the fused SiLU: one program per (token, query head) and per (token,
    KV head) reads its head's B rows, so the separate expand launch and its read-modify-write of
    the projection's output go away."""
    _check_rope(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)
    check_rope_lora(q, k, buf, lora_b, slot_of_token, ranks)
    tokens, heads, dim = q.shape
    kv_heads = k.shape[1]
    num_loras, _, max_rank = lora_b[0].shape
    if tokens:
        _rope_kv_lora_kernel[(tokens, heads + kv_heads)](
            q, k, v, cos, sin, k_cache, v_cache, slot_mapping, buf, lora_b[0], lora_b[1], lora_b[2],
            slot_of_token, ranks, heads, num_loras,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
            k_cache.stride(0), k_cache.stride(1), buf.stride(0), buf.stride(1), lora_b[0].stride(0),
            lora_b[1].stride(0), max_rank, HALF=dim // 2,
            BLOCK_R=max(16, triton.next_power_of_2(max_rank)), MAX_R=max_rank, num_warps=2,
            **pdl.triton_args(q.device))
    return q


@triton.jit
def _silu_times(gate, up, dtype: tl.constexpr):
    """silu(gate) * up in ``dtype`` from fp32 gate/up holding ``dtype`` values: silu rounds to the
    activation dtype before the product, as silu(gate) * up does in torch."""
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype)
    return (act.to(tl.float32) * up).to(dtype)


@triton.jit
def _gate_up(x_ptr, row, stride_x, n_cols, BLOCK: tl.constexpr):
    """This program's column block of one token's gate and up halves (fp32), with its columns and
    their mask."""
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_cols
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n_cols + offs, mask=mask, other=0.0).to(tl.float32)
    return gate, up, offs, mask


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, n_cols, stride_x, stride_o, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
    row = tl.program_id(0)
    gate, up, offs, mask = _gate_up(x_ptr, row, stride_x, n_cols, BLOCK)
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
                          BLOCK: tl.constexpr, BLOCK_R: tl.constexpr, MAX_R: tl.constexpr, PDL: tl.constexpr):
    pdl_trigger(PDL)
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_cols
    # Before the wait, what no kernel of the forward pass writes (inlaid.kernels.pdl): the token's
    # adapter slot and rank (step inputs) and its B rows, so the slot -> rank -> B chain of loads
    # runs while the GEMM ahead does. On an H100, side by side: matched step 4.76-4.77 -> 4.67 ms
    # (docs/results/serving.md). With 2-byte B loads (before rank_mask) the same move was 5% slower.
    slot, rank = _adapter_of(slot_ptr, ranks_ptr, row, num_loras)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    b_off = slot * stride_bl + offs[:, None] * stride_bn + offs_r[None, :]
    b_mask = mask[:, None] & rank_mask(offs_r, rank, MAX_R)[None, :]
    b_gate = tl.load(bg_ptr + b_off, mask=b_mask, other=0.0).to(tl.float32)
    b_up = tl.load(bu_ptr + b_off, mask=b_mask, other=0.0).to(tl.float32)
    pdl_wait(PDL)
    gate, up, _, _ = _gate_up(x_ptr, row, stride_x, n_cols, BLOCK)
    h_gate = tl.load(buf_ptr + row * stride_bt + offs_r, mask=mask_r, other=0.0)
    h_up = tl.load(buf_ptr + stride_bs + row * stride_bt + offs_r, mask=mask_r, other=0.0)
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
            MAX_R=max_rank, num_warps=4, **pdl.triton_args(gate_up.device))
    return out
