"""exllamav2 backend for 4-bit quant_matmul (GPU only, lazy import).

Facts of exllamav2 0.3.2 this relies on (read from its ext.py and exllamav2_ext/ext_qmatrix.cpp):
- ``make_q_matrix(q_weight, q_perm, q_invperm, q_scale, q_scale_max, q_groups, q_group_map,
  gptq_qzeros, gptq_scales, gptq_g_idx, bias, temp_dq, max_dq_rows)`` builds a handle; the GPTQ path
  is 4-bit only, reads v1 zero points, and infers a power-of-two group size;
- it rewrites q_weight in place and keeps raw pointers to every tensor: we pass clones and keep them
  alive as long as the handle (in ``PreparedQuant.backend_state``);
- g_idx is read on the host (CPU int32); q_perm / q_invperm are int16 CUDA buffers it fills itself;
- absent tensors are a (1, 1) tensor on the "meta" device;
- ``gemm_half_q_half(x, handle, out, force_cuda)``: above 32 rows it dequantizes into temp_dq and
  calls cuBLAS unless force_cuda is set. fp16 only.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types

import torch

from inlaid.kernels.quant_matmul import PreparedQuant

_EXT = None


def load_extension():
    """The compiled exllamav2 extension (JIT-built on first import, ~2.5 min with MAX_JOBS=16)."""
    global _EXT
    if _EXT is not None:
        return _EXT
    os.environ.setdefault("MAX_JOBS", "16")
    try:
        from exllamav2.ext import exllamav2_ext
    except ImportError as err:
        if err.name == "exllamav2":
            raise
        # The package __init__ imports model/vision code (Pillow, ...) that ext.py does not need:
        # load ext.py under a bare package object instead.
        spec = importlib.util.find_spec("exllamav2")
        pkg = types.ModuleType("exllamav2")
        pkg.__path__, pkg.__spec__ = list(spec.submodule_search_locations), spec
        sys.modules["exllamav2"] = pkg
        exllamav2_ext = importlib.import_module("exllamav2.ext").exllamav2_ext
    _EXT = exllamav2_ext
    return _EXT


_SCRATCH: dict[torch.device, torch.Tensor] = {}


def _scratch(device: torch.device, numel: int) -> torch.Tensor:
    """One fp16 dequantization scratch per device, shared by every q-matrix (exllamav2 writes it
    only inside a GEMM, and GEMMs on one stream never overlap). Per-matrix scratch would cost
    2 bytes per weight: more than the 4-bit weights themselves. Grows by replacement; matrices
    made earlier keep (and reference) the smaller buffer they point into."""
    buf = _SCRATCH.get(device)
    if buf is None or buf.numel() < numel:
        buf = _SCRATCH[device] = torch.empty(numel, dtype=torch.float16, device=device)
    return buf


class ExllamaMatrix:
    """An exllamav2 q-matrix and the buffers it points into."""

    def __init__(self, p: PreparedQuant):
        if p.bits != 4:
            raise ValueError("exllamav2's GPTQ kernel is 4-bit only")
        ext = load_extension()
        none = torch.empty((1, 1), device="meta")
        device = p.qweight.device
        height, width = p.in_features, p.out_features
        self.buffers = {
            "qweight": p.qweight.clone(),
            "qzeros": p.qzeros.contiguous(),
            "scales": p.scales.to(torch.float16).contiguous(),
            "q_perm": torch.empty(height, dtype=torch.int16, device=device),
            "q_invperm": torch.empty(height, dtype=torch.int16, device=device),
            "g_idx": p.g_idx.to("cpu", torch.int32).contiguous(),
            "temp_dq": _scratch(device, height * width),
        }
        b = self.buffers
        self.handle = ext.make_q_matrix(b["qweight"], b["q_perm"], b["q_invperm"], none, none, none,
                                        none, b["qzeros"], b["scales"], b["g_idx"], none,
                                        b["temp_dq"], height)
        self.ext = ext
        self.out_features = width

    def matmul(self, x: torch.Tensor, force_cuda: bool = False) -> torch.Tensor:
        out = torch.empty((x.shape[0], self.out_features), dtype=torch.float16, device=x.device)
        self.ext.gemm_half_q_half(x, self.handle, out, force_cuda)
        return out

    def __del__(self):
        try:
            self.ext.free_q_matrix(self.handle)
        except Exception:  # interpreter shutdown: the extension may be gone already
            pass


def exllama_matmul(x: torch.Tensor, p: PreparedQuant, force_cuda: bool = False) -> torch.Tensor:
    if x.dtype != torch.float16:
        raise ValueError("exllamav2 computes in fp16 only")
    matrix = p.backend_state.get("exllama")
    if matrix is None:
        matrix = p.backend_state["exllama"] = ExllamaMatrix(p)
    out = matrix.matmul(x.contiguous(), force_cuda)
    if p.bias is not None:
        out += p.bias.to(out.dtype)
    return out
