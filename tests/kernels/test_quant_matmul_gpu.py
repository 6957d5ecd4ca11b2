"""Triton and exllamav2 quant_matmul against the fp32 reference on fresh random inputs (GPU only).

Bound: ||y - y_ref|| / ||y_ref|| < 1e-2 with y_ref = x.float() @ W_fp32^T (fp16/bf16 inputs and
outputs; the kernels accumulate in fp32, so the error is the output rounding, ~1e-3)."""

import importlib.util

import pytest
import torch

from inlaid.kernels.quant_matmul import prepare, quant_matmul_ref

from .test_quant_matmul import random_layer

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")]
TOL = 1e-2


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size,act_order,sym", [(128, False, True), (32, False, False),
                                                       (-1, False, True), (64, True, True)])
@pytest.mark.parametrize("m", [1, 7, 16, 33, 128, 300])
def test_triton_matches_reference(bits, group_size, act_order, sym, m):
    from inlaid.kernels.triton.quant_matmul import quant_matmul_triton

    packed, _, _ = random_layer(512, 384, bits, group_size, sym, act_order, bias=(m == 7), seed=m + bits)
    p = prepare(packed, "cuda", torch.float16)
    x = torch.randn(m, 512, device="cuda", dtype=torch.float16)
    ref = quant_matmul_ref(x.float(), prepare(packed, "cuda", torch.float32))
    out = torch.full((m, 384), float("nan"), device="cuda", dtype=torch.float16)
    got = quant_matmul_triton(x, p, out=out)
    assert not torch.isnan(got).any()
    assert rel(got, ref) < TOL


@pytest.mark.parametrize("variant", [(0, 0), (1, 0), (0, 1), (1, 1)])
@pytest.mark.parametrize("bits,group_size,act_order,dtype", [
    (4, 128, False, torch.float16), (3, 128, False, torch.float16), (8, 128, True, torch.float16),
    (4, 128, True, torch.bfloat16), (2, -1, False, torch.bfloat16)])
@pytest.mark.parametrize("m", [5, 32])
def test_triton_kernel_variants(variant, bits, group_size, act_order, dtype, m):
    """Every SWAP_AB / MAGIC variant with split-K (MAGIC converts for bf16)."""
    from inlaid.kernels.triton.quant_matmul import quant_matmul_triton

    packed, _, _ = random_layer(1024, 320, bits, group_size, False, act_order, bias=True, seed=bits + m)
    p = prepare(packed, "cuda", dtype)
    x = torch.randn(m, 1024, device="cuda", dtype=dtype)
    ref = quant_matmul_ref(x.float(), prepare(packed, "cuda", torch.float32))
    cfg = dict(BLOCK_M=16 if m <= 16 else 32, BLOCK_N=64, BLOCK_K=128, SPLIT_K=2,
               GROUP_M=8, num_warps=4, num_stages=3, **dict(zip(("SWAP_AB", "MAGIC"), variant)))
    out = torch.full((m, 320), float("nan"), device="cuda", dtype=dtype)
    assert rel(quant_matmul_triton(x, p, config=cfg, out=out), ref) < TOL


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size,act_order", [(128, False), (32, False), (-1, False), (64, True)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequantize_is_exact_and_the_dequant_backend_matches(bits, group_size, act_order, dtype):
    """The large-M backend: its dequantized weight equals the reference's fp32 dequantization rounded
    once to the compute dtype, bit for bit; its GEMM (cuBLAS over that weight) meets the usual bound."""
    from inlaid.kernels.quant_matmul import quant_matmul
    from inlaid.kernels.triton.quant_matmul import dequantize_triton
    from inlaid.quant.primitives import dequantize_weight

    packed, _, _ = random_layer(512, 384, bits, group_size, False, act_order, bias=True, seed=bits + 5)
    p = prepare(packed, "cuda", dtype)
    ref_w = dequantize_weight(p.qweight, p.scales, p.zeros, p.g_idx, p.bits).t().to(dtype)
    assert torch.equal(dequantize_triton(p), ref_w)
    x = torch.randn(300, 512, device="cuda", dtype=dtype)
    ref = quant_matmul_ref(x.float(), prepare(packed, "cuda", torch.float32))
    assert rel(quant_matmul(x, p, backend="dequant"), ref) < TOL


@pytest.mark.parametrize("split_k", [1, 4])
def test_triton_bf16_and_split_k(split_k):
    from inlaid.kernels.triton.quant_matmul import quant_matmul_triton

    packed, _, _ = random_layer(1024, 256, 4, 128, True, False, bias=True, seed=1)
    p = prepare(packed, "cuda", torch.bfloat16)
    x = torch.randn(3, 1024, device="cuda", dtype=torch.bfloat16)
    ref = quant_matmul_ref(x.float(), prepare(packed, "cuda", torch.float32))
    cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, SPLIT_K=split_k, GROUP_M=8, num_warps=4,
               num_stages=3)
    assert rel(quant_matmul_triton(x, p, config=cfg), ref) < TOL


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("split_k,m", [(2, 32), (8, 3), (4, 40)])
def test_split_k_reduces_in_one_kernel_and_restores_its_workspace(split_k, m, backend):
    """The last program of each tile writes y and re-zeroes the counters (Triton: and the workspace;
    the CUDA GEMM's own workspace is overwritten by every call): repeated calls, NaN-poisoned outputs
    and CUDA-graph replays with new inputs all match the reference. The CUDA GEMM adds the split
    slices in a fixed order, so its repeated calls are bit-identical."""
    from inlaid.kernels import cuda_gemm
    from inlaid.kernels import quant_matmul as qm
    from inlaid.kernels.triton import quant_matmul as tq

    if backend == "cuda" and not cuda_gemm.available(0):
        pytest.skip("the CUDA GEMM needs sm_80+ and nvcc")
    packed, _, _ = random_layer(1024, 320 if backend == "triton" else 384, 4, 128, True, False, bias=True,
                               seed=split_k)
    n = packed.scales.shape[1]
    p = prepare(packed, "cuda", torch.float16)
    p32 = prepare(packed, "cuda", torch.float32)
    if backend == "triton":
        cfg = dict(BLOCK_M=16 if m <= 16 else 32 if m <= 32 else 64, BLOCK_N=64, BLOCK_K=64, SPLIT_K=split_k,
                   GROUP_M=8, num_warps=4, num_stages=3)

        def call(x, out):
            return tq.quant_matmul_triton(x, p, config=cfg, out=out)
    else:
        def call(x, out):
            return cuda_gemm.quant_matmul_cuda(x, p, config=(1, 2, split_k, 0), out=out)
    for _ in range(3):
        x = torch.randn(m, 1024, device="cuda", dtype=torch.float16)
        out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.float16)
        assert rel(call(x, out), quant_matmul_ref(x.float(), p32)) < TOL
    if backend == "triton":
        ws, counts = qm._SPLIT_K.buffers[0]
        assert not ws.any() and not counts.any()
    else:
        _, counts = cuda_gemm._SPLIT_K.buffers[0]
        assert not counts.any()
        first = call(x, torch.empty(m, n, device="cuda", dtype=torch.float16))
        for _ in range(5):
            assert torch.equal(call(x, torch.empty_like(first)), first)
    x = torch.randn(m, 1024, device="cuda", dtype=torch.float16)
    out = torch.empty(m, n, device="cuda", dtype=torch.float16)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call(x, out)
    for _ in range(3):
        x.copy_(torch.randn(m, 1024, device="cuda", dtype=torch.float16))
        graph.replay()
        assert rel(out, quant_matmul_ref(x.float(), p32)) < TOL


@pytest.mark.skipif(importlib.util.find_spec("exllamav2") is None, reason="needs exllamav2")
@pytest.mark.parametrize("m", [1, 16, 64])
@pytest.mark.parametrize("act_order", [False, True])
def test_exllama_matches_reference(m, act_order):
    from inlaid.kernels.exllama import exllama_matmul

    packed, _, _ = random_layer(1024, 512, 4, 128, True, act_order, bias=True, seed=m)
    p = prepare(packed, "cuda", torch.float16)
    x = torch.randn(m, 1024, device="cuda", dtype=torch.float16)
    ref = quant_matmul_ref(x.float(), prepare(packed, "cuda", torch.float32))
    assert rel(exllama_matmul(x, p), ref) < TOL
    assert rel(exllama_matmul(x, p, force_cuda=True), ref) < TOL
