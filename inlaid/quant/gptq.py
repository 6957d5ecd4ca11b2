"""The GPTQ solver (Frantar et al.), following the IST-DASLab reference algorithm step by step.

It knows one weight matrix and one Hessian, never the model: per-task Hessians and their aggregation
live in :mod:`inlaid.quant.hessian`. Numerics as in the reference: fp32 throughout, TF32 off, dead
input columns zeroed, damping ``damp_percent * mean(diag H)`` (increased tenfold on Cholesky failure),
upper Cholesky factor of H^-1, blocked lazy updates.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from inlaid.quant.primitives import compute_qparams, dequantize_codes, quantize_codes

log = logging.getLogger(__name__)

_MAX_DAMP_RETRIES = 6


@dataclass
class GPTQResult:
    """Solver output, weight orientation [out, in]."""

    weight: torch.Tensor  # fp32 dequantized weight Q
    codes: torch.Tensor  # int64 codes [out, in]
    scales: torch.Tensor  # fp32 (fp16-representable) [groups, out]
    zeros: torch.Tensor  # fp32 integer-valued [groups, out]
    g_idx: torch.Tensor  # int32 [in]
    damp: float  # damping actually applied


@contextlib.contextmanager
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _inverse_cholesky_upper(h: torch.Tensor, damp_percent: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp I)^-1, with more damping when H + damp I is not PD.

    An aggregated Hessian need not be PSD: the element-wise max of PSD matrices can be indefinite.
    The first retry shifts by just past the most negative eigenvalue (a blind tenfold increase would
    over-damp and blur the Hessian; 5% margin for fp32 eigenvalue error); later retries grow tenfold as
    the reference does.
    """
    mean_diag = torch.mean(torch.diag(h)).item()
    damp = damp_percent * mean_diag
    eye = torch.eye(h.shape[0], device=h.device, dtype=h.dtype)
    for attempt in range(_MAX_DAMP_RETRIES):
        lower, info = torch.linalg.cholesky_ex(h + damp * eye)
        if info.item() == 0:
            hinv = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if info.item() == 0:
                return upper, damp
        if attempt == 0:
            min_eig = torch.linalg.eigvalsh(h).min().item()
            new_damp = damp + max(0.0, -min_eig) * 1.05 if min_eig < 0 else damp * 10
        else:
            new_damp = damp * 10
        log.info("Cholesky failed (attempt %d); damping %.3g -> %.3g", attempt + 1, damp, new_damp)
        damp = new_damp
    raise torch.linalg.LinAlgError("Hessian is not positive definite even after damping retries")


@dataclass
class HessianFactor:
    """What the solver needs from H, computed once and shared by every linear that reads the same
    input (q/k/v, gate/up): the dead columns, the act-order permutation and chol(H^-1)^T."""

    hinv: torch.Tensor  # upper Cholesky factor of (H + damp I)^-1, in permuted order
    dead: torch.Tensor  # bool [in]
    perm: torch.Tensor | None  # act-order permutation (None without desc_act)
    damp: float


def factorize(hessian: torch.Tensor, *, damp_percent: float = 0.01, desc_act: bool = False,
              device: torch.device | str | None = None) -> HessianFactor:
    with _no_tf32():
        h = hessian.detach().float().clone().to(device or hessian.device)
        dead = torch.diag(h) == 0
        h[dead, dead] = 1
        perm = None
        if desc_act:
            perm = torch.argsort(torch.diag(h), descending=True)
            h = h[perm][:, perm]
        hinv, damp = _inverse_cholesky_upper(h, damp_percent)
    return HessianFactor(hinv=hinv, dead=dead, perm=perm, damp=damp)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor | None = None, *, bits: int,
                  group_size: int = 128, sym: bool = True, desc_act: bool = False,
                  static_groups: bool = False, damp_percent: float = 0.01, block_size: int = 128,
                  factor: HessianFactor | None = None) -> GPTQResult:
    """Quantize ``weight[out, in]`` minimising ||(W - Q) X||^2 for the Hessian ``H = 2/n X X^T``
    (or its precomputed ``factor``, which must come from the same desc_act and damping)."""
    if factor is None:
        factor = factorize(hessian, damp_percent=damp_percent, desc_act=desc_act, device=weight.device)
    with _no_tf32():
        return _solve(weight, factor, bits, group_size, sym, static_groups, block_size)


def _solve(weight, factor: HessianFactor, bits, group_size, sym, static_groups, block_size):
    w = weight.detach().float().clone()
    columns = w.shape[1]
    gs = columns if group_size == -1 else group_size
    w[:, factor.dead] = 0

    # Static groups fix every group's grid from the unpermuted, un-updated weight (as AutoGPTQ does),
    # so act-order can reorder columns while g_idx stays monotonic.
    static = [compute_qparams(w[:, s:s + gs], bits, sym) for s in range(0, columns, gs)] \
        if static_groups else None

    perm, hinv, damp = factor.perm, factor.hinv, factor.damp
    if perm is not None:
        w = w[:, perm]

    q = torch.zeros_like(w)
    codes = torch.zeros_like(w)
    group_params: list[tuple[torch.Tensor, torch.Tensor]] = []
    scale = zero = None
    if static is None and group_size == -1:
        scale, zero = compute_qparams(w, bits, sym)
        group_params.append((scale, zero))

    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if static is not None:
                original = perm[col].item() if perm is not None else col
                scale, zero = static[original // gs]
            elif group_size != -1 and col % gs == 0:
                # The reference reads W (block-level updates applied, not this block's), on purpose.
                scale, zero = compute_qparams(w[:, col:col + gs], bits, sym)
                group_params.append((scale, zero))
            wc = w1[:, i]
            d = hinv1[i, i]
            code = quantize_codes(wc, scale, zero, bits)
            qc = dequantize_codes(code, scale, zero)
            q[:, col], codes[:, col] = qc, code
            e = (wc - qc) / d
            w1[:, i:] -= e.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    if perm is not None:
        invperm = torch.argsort(perm)
        q, codes = q[:, invperm], codes[:, invperm]

    if static is not None:
        g_idx = torch.arange(columns, dtype=torch.int32, device=w.device) // gs
        scales = torch.stack([s for s, _ in static])
        zeros = torch.stack([z for _, z in static])
    else:
        position = torch.arange(columns, device=w.device) if perm is None else torch.argsort(perm)
        g_idx = (position // gs).to(torch.int32)
        scales = torch.stack([s for s, _ in group_params])
        zeros = torch.stack([z for _, z in group_params])
    return GPTQResult(weight=q, codes=codes.to(torch.int64), scales=scales, zeros=zeros, g_idx=g_idx,
                      damp=damp)
