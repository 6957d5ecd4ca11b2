"""The CUDA small-M GEMM against the fp32 reference on fresh random inputs (GPU with nvcc only).

Bound: ||y - y_ref|| / ||y_ref|| < 1e-2, as for the other quant_matmul backends (fp16 dequantization
and output rounding, fp32 accumulation: ~1e-3 in practice)."""

import pytest
import torch

from inlaid.kernels.quant_matmul import prepare, quant_matmul, quant_matmul_ref

from .test_cuda_gemm import LAYOUTS
from .test_quant_matmul import random_layer
from .test_quant_matmul_gpu import TOL, rel


def _available() -> bool:
    if not torch.cuda.is_available():
        return False
    from inlaid.kernels import cuda_gemm

    return cuda_gemm.available(0)


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _available(), reason="needs a CUDA sm_80+ GPU and nvcc")]


@pytest.fixture(autouse=True)
def _enabled(monkeypatch):
    monkeypatch.setenv("INLAID_CUDA_GEMM", "1")


# (nw, unroll, split, kernel): every kernel, tile count and unroll, odd and even splits
CONFIGS = [None, (1, 2, 1, 0), (2, 4, 1, 0), (1, 4, 3, 0), (2, 2, 8, 0),
           (1, 1, 1, 4), (1, 2, 3, 4), (2, 1, 8, 4), (2, 2, 1, 4), (4, 1, 3, 4),
           (1, 2, 1, 90), (2, 1, 3, 90), (2, 2, 8, 90), (4, 1, 2, 90),
           (1, 1, 1, 91), (1, 2, 3, 91), (2, 1, 2, 91)]


def _skip_unbuilt(config):
    from inlaid.kernels import cuda_gemm

    if config is not None and config[3] in (cuda_gemm.WGMMA, cuda_gemm.WGMMA8) and not cuda_gemm.has_wgmma(0):
        pytest.skip("the wgmma kernels are built for sm_90 only")


@pytest.mark.parametrize("group_size,act_order,sym", LAYOUTS)
@pytest.mark.parametrize("m", [1, 5, 8, 17, 32, 33, 64])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "default" if c is None else "nw{}u{}s{}k{}".format(*c))
def test_cuda_gemm_matches_reference(group_size, act_order, sym, m, config):
    from inlaid.kernels.cuda_gemm import quant_matmul_cuda

    if config is not None and config[0] == 4 and m > 32:
        pytest.skip("four tiles per warp are not built above M = 32")
    _skip_unbuilt(config)
    packed, _, _ = random_layer(1024, 768, 4, group_size, sym, act_order, bias=(m % 2 == 1), seed=m)
    p = prepare(packed, "cuda", torch.float16)
    assert p.backend_state.get("cuda") is not None  # built at load time
    x = torch.randn(m, 1024, device="cuda", dtype=torch.float16)
    ref = quant_matmul_ref(x.float(), prepare(packed, "cuda", torch.float32))
    out = torch.full((m, 768), float("nan"), device="cuda", dtype=torch.float16)
    got = quant_matmul_cuda(x, p, config=config, out=out)
    assert not torch.isnan(got).any()
    assert rel(got, ref) < TOL


@pytest.mark.parametrize("k,split", [(320, 4), (384, 8), (320, 3)])
def test_uneven_and_empty_split_ranges(k, split):
    """Splits that do not divide the K/64 super tiles: the last ranges are short or empty (those
    blocks still arrive at the counter), and an uneven last step is masked without a branch."""
    from inlaid.kernels.cuda_gemm import quant_matmul_cuda

    packed, _, _ = random_layer(k, 384, 4, 64, False, False, bias=True, seed=k + split)
    p = prepare(packed, "cuda", torch.float16)
    ref_p = prepare(packed, "cuda", torch.float32)
    from inlaid.kernels.cuda_gemm import has_wgmma

    kernels = ((2, 0), (4, 0), (1, 4), (2, 4)) + (((2, 90), (1, 91), (2, 91)) if has_wgmma(0) else ())
    for unroll, kernel in kernels:
        x = torch.randn(19, k, device="cuda", dtype=torch.float16)
        out = torch.full((19, 384), float("nan"), device="cuda", dtype=torch.float16)
        got = quant_matmul_cuda(x, p, config=(1, unroll, split, kernel), out=out)
        assert rel(got, quant_matmul_ref(x.float(), ref_p)) < TOL


def test_misaligned_x_and_bad_out_are_handled():
    from inlaid.kernels.cuda_gemm import quant_matmul_cuda

    packed, _, _ = random_layer(1024, 256, 4, 128, True, False, bias=False, seed=3)
    p = prepare(packed, "cuda", torch.float16)
    base = torch.randn(4, 1025, device="cuda", dtype=torch.float16)
    x = base[:1, 1:]  # contiguous, 2 bytes past a 16-byte boundary
    assert x.is_contiguous() and x.data_ptr() % 16
    assert rel(quant_matmul_cuda(x, p), quant_matmul_ref(x.float(), prepare(packed, "cuda", torch.float32))) < TOL
    with pytest.raises(ValueError, match="out must be"):
        quant_matmul_cuda(x, p, out=torch.empty(2, 256, device="cuda", dtype=torch.float16))


def test_dispatch_uses_it_for_decode_sizes(monkeypatch):
    """By default a prepared layer holds the layout and quant_matmul runs the kernel at M 1-32."""
    from inlaid.kernels import cuda_gemm, dispatch

    packed, _, _ = random_layer(1024, 256, 4, 128, True, False, bias=False, seed=0)
    p = prepare(packed, "cuda", torch.float16)
    x = torch.randn(16, 1024, device="cuda", dtype=torch.float16)
    assert dispatch.choose("quant_matmul", x.device, bits=4, m=16, group_size=128, cuda_gemm=True) == "cuda"
    calls = []
    real = cuda_gemm.quant_matmul_cuda
    monkeypatch.setattr(cuda_gemm, "quant_matmul_cuda", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert rel(quant_matmul(x, p), quant_matmul_ref(x.float(), prepare(packed, "cuda", torch.float32))) < TOL
    assert calls == [1]


def test_new_weights_refresh_the_layout_under_a_captured_graph():
    """Live task addition copies re-quantized weights into a layer's tensors; the CUDA layout is
    rebuilt in place, so a graph captured before the swap computes with the new weights."""
    from inlaid.kernels.cuda_gemm import quant_matmul_cuda
    from inlaid.kernels.quant_matmul import refresh_backend_state

    old, _, _ = random_layer(1024, 384, 4, 128, False, False, bias=False, seed=1)
    new, _, _ = random_layer(1024, 384, 4, 128, False, False, bias=False, seed=2)
    p, p_new = prepare(old, "cuda", torch.float16), prepare(new, "cuda", torch.float16)
    x = torch.randn(16, 1024, device="cuda", dtype=torch.float16)
    out = torch.empty(16, 384, device="cuda", dtype=torch.float16)
    quant_matmul_cuda(x, p, out=out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        quant_matmul_cuda(x, p, out=out)
    for name in ("qweight", "scales", "zeros", "g_idx", "qzeros"):
        getattr(p, name).copy_(getattr(p_new, name))
    retired = refresh_backend_state(p)
    assert "cuda" in p.backend_state and not any("cuda" in r for r in retired)
    graph.replay()
    assert rel(out, quant_matmul_ref(x.float(), prepare(new, "cuda", torch.float32))) < TOL


def test_a_config_that_is_not_built_is_an_error_not_a_wrong_result():
    from inlaid.kernels.cuda_gemm import quant_matmul_cuda

    packed, _, _ = random_layer(1024, 256, 4, 128, True, False, bias=False, seed=4)
    p = prepare(packed, "cuda", torch.float16)
    x = torch.randn(8, 1024, device="cuda", dtype=torch.float16)
    for bad in ((3, 2, 1, 0), (1, 3, 1, 0), (1, 2, 0, 0), (1, 4, 1, 4), (1, 1, 1, 3), (1, 1, 1, 90)):
        with pytest.raises(RuntimeError, match="launch failed"):
            quant_matmul_cuda(x, p, config=bad)
