"""One table decides which backend runs an op; every choice is logged once.

Rules are read top to bottom; the first whose conditions hold wins. The M thresholds come from the
kernel benchmark (``scripts/bench_kernels.py``, results in docs/results/kernels.md). Users force a
backend with the ``backend=`` argument of an op or ``INLAID_BACKEND_<OP>=<backend>``, e.g.
``INLAID_BACKEND_QUANT_MATMUL=ref|triton|cuda|exllama|dequant`` or ``INLAID_BACKEND_LORA_OVERLAP=serial``
(``cuda``: the 4-bit small-M tensor-core GEMM of ``inlaid.kernels.cuda_gemm``; ``dequant``:
dequantize the weight, then cuBLAS).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os

import torch

log = logging.getLogger(__name__)

HALF = (torch.float16, torch.bfloat16)

# (op, backend, condition on facts) — facts: cuda, bits, m, dtype (the activations'; our GPU kernels
# take fp16 and bf16, exllamav2 fp16 only, so fp32 runs the reference), group_size, has_triton, has_exllama,
# cuda_gemm (the CUDA GEMM builds here, is not disabled, and holds this layer in its layout), sm
# (compute capability as 10 * major + minor)
TABLE = (
    # H100, commit ebe2a57 (docs/results/kernels.md): our CUDA GEMM, at its default launch config,
    # beats the Triton kernel at every M 1-32 on the Llama-2-7B shapes taken together (per layer
    # 84.8 vs 108.4 us at M = 16, 116.7 vs 125.7 at M = 32) and matches exllamav2 at M = 1 (66.2 vs
    # 68.2 us per layer; exllamav2 is faster on two of the four shapes by 4-8%). exllamav2 stays
    # the M <= 2 choice where the CUDA GEMM cannot run (no nvcc, or a layer its layout cannot take).
    ("quant_matmul", "cuda", lambda f: f["cuda"] and f["cuda_gemm"] and f["m"] <= 32),
    ("quant_matmul", "exllama", lambda f: f["cuda"] and f["has_exllama"] and f["bits"] == 4
     and f["m"] <= 2 and f["dtype"] == torch.float16),
    # From M = 256 dequantizing the weight once and calling cuBLAS beats the fused kernel on every
    # Llama-2-7B shape (1.1-1.5x at M = 256, 2.0-2.3x at M = 2048): prefill.
    ("quant_matmul", "dequant", lambda f: f["cuda"] and f["has_triton"] and f["m"] >= 256
     and f["dtype"] in HALF),
    ("quant_matmul", "triton", lambda f: f["cuda"] and f["has_triton"] and f["dtype"] in HALF),
    ("quant_matmul", "ref", lambda f: True),
    ("lora", "triton", lambda f: f["cuda"] and f["has_triton"]),
    ("lora", "ref", lambda f: True),
    # the LoRA shrink on a side stream, concurrent with the base GEMM (inlaid.kernels.qlinear)
    ("lora_overlap", "stream", lambda f: f["cuda"]),
    ("lora_overlap", "serial", lambda f: True),
    # gate/up's LoRA expand inside the SiLU-and-mul kernel, one program per token: for decode-sized
    # steps (with many tokens per adapter, the tiled expand reads each B once per tile instead)
    ("silu_lora", "fused", lambda f: f["cuda"] and f["has_triton"] and f["m"] <= 64),
    ("silu_lora", "separate", lambda f: True),
    # q/k/v's LoRA expand inside the RoPE + KV-write kernel, one program per (token, head), for
    # decode-sized steps (the same trade as silu_lora)
    ("rope_lora", "fused", lambda f: f["cuda"] and f["has_triton"] and f["m"] <= 64),
    ("rope_lora", "separate", lambda f: True),
    # RoPE + KV write (with q/k/v's expand where rope_lora fuses it) inside the mma decode attention
    # kernel, for all-decode steps: one dependent launch a layer instead of two
    ("rope_attention", "fused", lambda f: f["cuda"] and f["has_triton"]),
    ("rope_attention", "separate", lambda f: True),
    # o's and down's LoRA expand inside the residual add + RMSNorm after them, programs per
    # (token, column block), for decode-sized steps (the same trade as silu_lora)
    ("norm_lora", "fused", lambda f: f["cuda"] and f["has_triton"] and f["m"] <= 64),
    ("norm_lora", "separate", lambda f: True),
    # attention over the paged KV cache: the decode kernel and the varlen prefill kernel
    ("paged_attention", "triton", lambda f: f["cuda"] and f["has_triton"]),
    ("paged_attention", "ref", lambda f: True),
    # which Triton decode kernel: "mma" (one program per KV head, its query heads as the rows of
    # tensor-core dots, K/V loads software-pipelined by Triton) or "fma" (one program per query
    # head, CUDA-core dot products). H100 (docs/results/bench_attention_8d21b75.log), Llama-2-7B
    # heads, tile 64, 4 warps: mma takes 15% off at batch 32 with 192 tokens of context (49.7 vs
    # 58.6 us), 16% at 1,024 (193.5 vs 230.3), and more at batch 1-8; it is nowhere slower.
    ("decode_attention", "mma", lambda f: True),
    ("decode_attention", "fma", lambda f: True),
    # fused residual add + RMSNorm, RoPE + KV-cache write, SiLU-and-mul (inlaid.kernels.triton.norm_rope)
    ("norm_rope", "triton", lambda f: f["cuda"] and f["has_triton"]),
    ("norm_rope", "ref", lambda f: True),
    # programmatic dependent launch of our kernels (inlaid.kernels.pdl): Hopper and later
    ("pdl", "on", lambda f: f["cuda"] and f["sm"] >= 90),
    ("pdl", "off", lambda f: True),
)


@functools.lru_cache(maxsize=None)
def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


@functools.lru_cache(maxsize=None)
def sm_count(index: int) -> int:
    """SMs of CUDA device ``index``: the launch rules (GEMM splits, attention waves) ask per call."""
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _log_once(op: str, backend: str, reason: str) -> None:
    log.info("%s: using the %s backend (%s)", op, backend, reason)


def choose(op: str, device: torch.device, **facts) -> str:
    forced = os.environ.get(f"INLAID_BACKEND_{op.upper()}")
    if forced:
        _log_once(op, forced, "forced by environment")
        return forced
    f = {"cuda": device.type == "cuda", "has_triton": has_module("triton"),
         "has_exllama": has_module("exllamav2"), "bits": None, "m": 0, "dtype": None, "group_size": -1,
         "cuda_gemm": False, "sm": 0, **facts}
    for name, backend, rule in TABLE:
        if name == op and rule(f):
            _log_once(op, backend, f"device={device.type}")
            return backend
    raise ValueError(f"no backend for op {op!r}")
