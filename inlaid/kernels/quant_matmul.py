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


class SplitKState:
    """Per device: the fp32 workspace and the per-tile arrival counters of split-K GEMMs.

    Both are allocated zeroed once and grown, never cleared. The Triton kernel's state (below) is
    all zero between calls (each call's last programs restore that); the CUDA GEMM keeps its own,
    whose workspace needs no zeros (inlaid/kernels/cuda_gemm.py). Grown buffers replace the old
    ones, which stay referenced: a CUDA graph captured earlier keeps their addresses. Calls on one
    device must not overlap in time (one stream, as in the engine; CUDA-graph capture included)."""

    def __init__(self) -> None:
        self.buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.retired: list[torch.Tensor] = []

    def get(self, device: torch.device, numel: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = device.index or 0
        ws, counts = self.buffers.get(key, (None, None))
        if ws is None or ws.numel() < numel or counts.numel() < tiles:
            if ws is not None:
                self.retired += [ws, counts]
            ws = torch.zeros(max(numel, 1 << 20), device=device, dtype=torch.float32)
            counts = torch.zeros(max(tiles, 4096), device=device, dtype=torch.int32)
            self.buffers[key] = (ws, counts)
        return ws, counts


_SPLIT_K = SplitKState()


def split_k_state(device: torch.device, numel: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The device's (fp32 workspace of >= numel, int32 counters of >= tiles), all zero."""
    return _SPLIT_K.get(device, numel, tiles)


def natural_group_size(g_idx: torch.Tensor, groups: int) -> int:
    size = -(-g_idx.numel() // groups)
    natural = torch.arange(g_idx.numel(), device=g_idx.device) // size
    return size if torch.equal(g_idx.long(), natural) else -1


def prepare(p: PackedLinear, device, dtype=torch.float16) -> PreparedQuant:
    """Move one packed layer to ``device`` in the form every backend reads (once, at load time).

    Where the CUDA small-M GEMM is enabled and runs, its re-laid-out copy of the weights is built here
    too: at load time, so the memory it takes is counted before the KV cache is sized, and no layout
    work (which syncs) falls inside a CUDA-graph capture. It costs as much memory as qweight itself."""
    prepared = PreparedQuant(
        qweight=p.qweight.to(device).contiguous(),
        scales=p.scales.to(device=device, dtype=dtype).contiguous(),
        zeros=unpack_zeros(p.qzeros, p.bits).to(device=device, dtype=dtype).contiguous(),
        g_idx=p.g_idx.to(device=device, dtype=torch.int32).contiguous(),
        bits=p.bits,
        bias=None if p.bias is None else p.bias.to(device=device, dtype=dtype),
        group_size=natural_group_size(p.g_idx, p.scales.shape[0]),
        qzeros=p.qzeros.to(device).contiguous())
    if prepared.qweight.device.type == "cuda":
        from inlaid.kernels import cuda_gemm

        if (cuda_gemm.enabled() and cuda_gemm.layout_problem(prepared) is None
                and cuda_gemm.available(prepared.qweight.device.index or 0)):
            prepared.backend_state["cuda"] = cuda_gemm.shuffle(prepared)
    return prepared


def quant_matmul_ref(x: torch.Tensor, p: PreparedQuant) -> torch.Tensor:
    """Reference: dequantize every weight, then matmul in fp32 (float64 for float64 x); returns
    x's dtype."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = dequantize_weight(p.qweight, p.scales, p.zeros, p.g_idx, p.bits).to(acc)
    out = x.to(acc) @ w.t()
    if p.bias is not None:
        out = out + p.bias.to(device=x.device, dtype=acc)
    return out.to(x.dtype)


def refresh_backend_state(p: PreparedQuant) -> list[dict]:
    """After new weights were copied into ``p``'s tensors: rebuild the CUDA GEMM's layout in place
    (CUDA graphs captured earlier keep reading the same addresses) and drop other backend state.
    Returns what was dropped: graphs captured earlier may still point into it, so the caller keeps
    it alive until they are re-captured."""
    from inlaid.kernels import cuda_gemm

    old = p.backend_state.pop("cuda", None)
    retired = [dict(p.backend_state)] if p.backend_state else []
    p.backend_state.clear()
    if old is None:
        return retired
    if cuda_gemm.layout_problem(p) is not None:
        return retired + [{"cuda": old}]
    new = cuda_gemm.shuffle(p)
    if (old.perm is None) != (new.perm is None):  # act-order came or went: new tensors
        p.backend_state["cuda"] = new
        return retired + [{"cuda": old}]
    for name in ("qw", "sz", "gidx16", "perm"):
        if getattr(old, name) is not None:
            getattr(old, name).copy_(getattr(new, name))
    p.backend_state["cuda"] = old
    return retired


def _cuda_gemm_ok(p: PreparedQuant) -> bool:
    """Whether the CUDA small-M GEMM holds this layer in its layout (built by ``prepare``)."""
    return p.backend_state.get("cuda") is not None


def quant_matmul(x: torch.Tensor, p: PreparedQuant, backend: str | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) with the backend the dispatch table picks (or the one forced)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    choice = backend or dispatch.choose("quant_matmul", x2.device, bits=p.bits, m=x2.shape[0],
                                        dtype=x2.dtype, group_size=p.group_size,
                                        cuda_gemm=_cuda_gemm_ok(p))
    if choice == "triton":
        from inlaid.kernels.triton.quant_matmul import quant_matmul_triton

        out = quant_matmul_triton(x2, p)
    elif choice == "dequant":
        from inlaid.kernels.triton.quant_matmul import quant_matmul_dequant

        out = quant_matmul_dequant(x2, p)
    elif choice == "cuda":
        from inlaid.kernels.cuda_gemm import quant_matmul_cuda

        out = quant_matmul_cuda(x2, p)
    elif choice == "exllama":
        from inlaid.kernels.exllama import exllama_matmul

        out = exllama_matmul(x2, p)
    elif choice == "ref":
        out = quant_matmul_ref(x2, p)
    else:
        raise ValueError(f"unknown quant_matmul backend {choice!r}")
    return out.reshape(*lead, out.shape[-1])
