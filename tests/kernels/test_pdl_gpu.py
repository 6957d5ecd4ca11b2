"""Programmatic dependent launch on the GPU (sm_90+ with nvcc): a chain of dependent kernels, each
reading what the one before it wrote a moment earlier, gives bit for bit what it gives without PDL,
eagerly and replayed from a CUDA graph with fresh inputs.

If a kernel read its input before its ``griddepcontrol.wait`` (the contract in
``inlaid.kernels.pdl``), it would start while its producer still runs and read a stale buffer: the
chain's kernels are all deterministic (the GEMM's split-K sum included), so any such read shows as a
difference here."""

import pytest
import torch

from inlaid.kernels.quant_matmul import prepare

from .test_quant_matmul import random_layer


def _hopper_with_gemm() -> bool:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability(0) < (9, 0):
        return False
    from inlaid.kernels import cuda_gemm

    return cuda_gemm.available(0) and cuda_gemm.enabled()


pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not _hopper_with_gemm(), reason="needs an sm_90+ GPU, Triton and nvcc")]

HIDDEN, INTER, M = 1024, 768, 32


def _layers():
    gate_up, _, _ = random_layer(HIDDEN, 2 * INTER, 4, 128, False, False, bias=False, seed=11)
    down, _, _ = random_layer(INTER, HIDDEN, 4, 128, False, False, bias=False, seed=12)
    return prepare(gate_up, "cuda", torch.float16), prepare(down, "cuda", torch.float16)


def _chain(h, delta, weight, gate_up, down):
    """norm (Triton) -> GEMM split 4 (CUDA) -> SiLU-and-mul (Triton) -> GEMM split 3 (CUDA) -> norm."""
    from inlaid.kernels.cuda_gemm import quant_matmul_cuda
    from inlaid.kernels.triton.norm_rope import add_rms_norm_triton, silu_mul_triton

    x, h2 = add_rms_norm_triton(h, delta, weight, 1e-5)
    act = silu_mul_triton(quant_matmul_cuda(x, gate_up, config=(1, 2, 4, 0)))
    out = quant_matmul_cuda(act, down, config=(1, 2, 3, 0))
    return add_rms_norm_triton(h2, out, weight, 1e-5)


def _inputs(seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(M, HIDDEN, device="cuda", dtype=torch.float16, generator=g) for _ in range(2)]


def test_chain_is_bit_identical_with_and_without_pdl(monkeypatch):
    from inlaid.kernels import pdl

    gate_up, down = _layers()
    weight = torch.rand(HIDDEN, device="cuda", dtype=torch.float16) + 0.5
    assert pdl.enabled(torch.device("cuda"))
    for seed in range(4):
        h, delta = _inputs(seed)
        with_pdl = _chain(h, delta, weight, gate_up, down)
        monkeypatch.setenv("INLAID_BACKEND_PDL", "off")
        without = _chain(h, delta, weight, gate_up, down)
        monkeypatch.delenv("INLAID_BACKEND_PDL")
        for a, b in zip(with_pdl, without):
            assert torch.isfinite(a).all()
            assert torch.equal(a, b)


def test_captured_chain_replays_fresh_inputs_like_eager_without_pdl(monkeypatch):
    gate_up, down = _layers()
    weight = torch.rand(HIDDEN, device="cuda", dtype=torch.float16) + 0.5
    h, delta = _inputs(100)
    _chain(h, delta, weight, gate_up, down)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = _chain(h, delta, weight, gate_up, down)
    monkeypatch.setenv("INLAID_BACKEND_PDL", "off")
    for seed in range(101, 105):
        fresh = _inputs(seed)
        h.copy_(fresh[0])
        delta.copy_(fresh[1])
        graph.replay()
        expected = _chain(h, delta, weight, gate_up, down)
        for a, b in zip(outs, expected):
            assert torch.equal(a, b)


def _triton_chain(h, delta, wide_weight, weight):
    """Triton kernels back to back, each letting the next launch before its own wait: K3 reads what
    K1 wrote and K4 what K2 wrote, two launches back, while K2 and K3 may still be waiting."""
    from inlaid.kernels.triton.norm_rope import add_rms_norm_triton, silu_mul_triton

    x, h2 = add_rms_norm_triton(h, delta, wide_weight, 1e-5)  # K1: [M, 2 HIDDEN]
    act = silu_mul_triton(x)  # K2
    act2 = silu_mul_triton(h2)  # K3: K1's residual
    return add_rms_norm_triton(act, act2, weight, 1e-5)  # K4: K2's output and K3's


def test_triton_chain_reading_two_launches_back_matches_without_pdl(monkeypatch):
    g = torch.Generator(device="cuda").manual_seed(7)
    wide_weight = torch.rand(2 * HIDDEN, device="cuda", dtype=torch.float16, generator=g) + 0.5
    weight = torch.rand(HIDDEN, device="cuda", dtype=torch.float16, generator=g) + 0.5

    def inputs():
        return [torch.randn(M, 2 * HIDDEN, device="cuda", dtype=torch.float16, generator=g) for _ in range(2)]

    h, delta = inputs()
    _triton_chain(h, delta, wide_weight, weight)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _triton_chain(h, delta, wide_weight, weight)
    for _ in range(4):
        fresh = inputs()
        h.copy_(fresh[0])
        delta.copy_(fresh[1])
        eager = _triton_chain(h, delta, wide_weight, weight)
        graph.replay()
        monkeypatch.setenv("INLAID_BACKEND_PDL", "off")
        expected = _triton_chain(h, delta, wide_weight, weight)
        monkeypatch.delenv("INLAID_BACKEND_PDL")
        for a, b, c in zip(eager, captured, expected):
            assert torch.isfinite(c).all()
            assert torch.equal(a, c) and torch.equal(b, c)
