"""``quant_matmul``: x[M, K] @ W^T for W stored in the GPTQ v1 layout (2/3/4/8 bits, any g_idx).

The reference dequantizes with :func:`inlaid.quant.primitives.dequantize_linear` (the same function
the checkpoint tests use) and multiplies in fp32. Fast backends take a :class:`PreparedQuant`, the
load-time form of one layer: qweight stays packed (it is the bulk of the bytes), zero points are
unpacked to the compute dtype once, and g_idx is kept as given (act-order needs no permutation).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from inlaid.kernels import dispatch
from inlaid.quant.primitives import LinearShape, PackedLinear, dequantize_weight, unpack_zeros


@dataclass
class PreparedQuant(LinearShape):
    """Device-resident tensors a fast kernel reads (built once per layer at load time)."""

    qweight: torch.Tensor  # int32 [K*bits/32, N]
    scales: torch.Tensor  # fp16/bf16 [G, N]
    zeros: torch.Tensor  # same dtype [G, N], real zero points (stored v1 value + 1)
    g_idx: torch.Tensor  # int32 [K]
    bits: int
    bias: torch.Tensor | None
    group_size: int  # natural-order group size; -1 when g_idx is not k // size (act-order)
    qzeros: torch.Tensor  # int32 [G, N*bits/32], v1 packed (what exllamav2 reads)
    # Per-backend load-time state (e.g. exllamav2's q-matrix handle), built on first use.
    backend_state: dict = field(default_factory=dict)


def natural_group_size(g_idx: torch.Tensor, groups: int) -> int:
    size = -(-g_idx.numel() // groups)
    natural = torch.arange(g_idx.numel(), device=g_idx.device) // size
    return size if torch.equal(g_idx.long(), natural) else -1


def prepare(p: PackedLinear, device, dtype=torch.float16) -> PreparedQuant:
    """Move one packed layer to ``device`` in the form every backend reads (once, at load time)."""
    return PreparedQuant(
        qweight=p.qweight.to(device).contiguous(),
        scales=p.scales.to(device=device, dtype=dtype).contiguous(),
        zeros=unpack_zeros(p.qzeros, p.bits).to(device=device, dtype=dtype).contiguous(),
        g_idx=p.g_idx.to(device=device, dtype=torch.int32).contiguous(),
        bits=p.bits,
        bias=None if p.bias is None else p.bias.to(device=device, dtype=dtype),
        group_size=natural_group_size(p.g_idx, p.scales.shape[0]),
        qzeros=p.qzeros.to(device).contiguous())


def quant_matmul_ref(x: torch.Tensor, p: PreparedQuant) -> torch.Tensor:
    """Reference: dequantize every weight, then matmul in fp32 (float64 for float64 x); returns
    x's dtype."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = dequantize_weight(p.qweight, p.scales, p.zeros, p.g_idx, p.bits).to(acc)
    out = x.to(acc) @ w.t()
    if p.bias is not None:
        out = out + p.bias.to(device=x.device, dtype=acc)
    return out.to(x.dtype)


def quant_matmul(x: torch.Tensor, p: PreparedQuant, backend: str | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) with the backend the dispatch table picks (or the one forced)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    choice = backend or dispatch.choose("quant_matmul", x2.device, bits=p.bits, m=x2.shape[0],
                                        group_size=p.group_size)
    if choice == "triton":
        from inlaid.kernels.triton.quant_matmul import quant_matmul_triton

        out = quant_matmul_triton(x2, p)
    elif choice == "dequant":
        from inlaid.kernels.triton.quant_matmul import quant_matmul_dequant

        out = quant_matmul_dequant(x2, p)
    elif choice == "exllama":
        from inlaid.kernels.exllama import exllama_matmul

        out = exllama_matmul(x2, p)
    elif choice == "ref":
        out = quant_matmul_ref(x2, p)
    else:
        raise ValueError(f"unknown quant_matmul backend {choice!r}")
    return out.reshape(*lead, out.shape[-1])
