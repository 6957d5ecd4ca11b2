"""quant_matmul reference against float64 math, and the dispatch table (CPU)."""

import functools

import pytest
import torch

from inlaid.kernels import dispatch
from inlaid.kernels.quant_matmul import prepare, quant_matmul, quant_matmul_ref
from inlaid.quant.primitives import group_index, pack_linear


def random_layer(k, n, bits, group_size, sym, act_order, bias, seed):
    """Random codes/scales/zeros packed into the GPTQ layout, and the same weight in float64."""
    gen = torch.Generator().manual_seed(seed)
    g_idx = group_index(k, group_size)
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    groups = int(g_idx.max()) + 1
    codes = torch.randint(0, 2**bits, (n, k), generator=gen)
    scales = (torch.rand(groups, n, generator=gen) * 0.02 + 1e-3).half().float()
    if sym:
        zeros = torch.full((groups, n), float(2 ** (bits - 1)))
    else:
        zeros = torch.randint(1, 2**bits, (groups, n), generator=gen).float()
    b = torch.randn(n, generator=gen).half().float() if bias else None
    packed = pack_linear(codes, scales, zeros, g_idx, bits, b)
    g = g_idx.long()
    w64 = scales.double().t()[:, g] * (codes.double() - zeros.double().t()[:, g])
    return packed, w64, b


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size,act_order", [(-1, False), (32, False), (128, False), (32, True)])
@pytest.mark.parametrize("sym", [True, False])
def test_reference_matches_float64(bits, group_size, act_order, sym):
    packed, w64, b = random_layer(256, 96, bits, group_size, sym, act_order, bias=not sym, seed=bits)
    p = prepare(packed, "cpu", torch.float32)
    x = torch.randn(5, 256)
    expect = x.double() @ w64.t() + (0 if b is None else b.double())
    got = quant_matmul_ref(x, p)
    # fp32 accumulation over K=256 terms: relative error ~1e-7, bounded here at 1e-6.
    assert ((got.double() - expect).norm() / expect.norm()).item() < 1e-6
    assert torch.equal(quant_matmul(x.reshape(1, 5, 256), p).reshape(5, 96), got)


def test_prepared_group_size_detects_act_order():
    natural, _, _ = random_layer(256, 32, 4, 64, True, False, False, 0)
    shuffled, _, _ = random_layer(256, 32, 4, 64, True, True, False, 0)
    assert prepare(natural, "cpu").group_size == 64
    assert prepare(shuffled, "cpu").group_size == -1


def test_dispatch_table(monkeypatch):
    cpu = torch.device("cpu")
    # fp16 activations unless a call names another dtype
    monkeypatch.setattr(dispatch, "choose", functools.partial(dispatch.choose, dtype=torch.float16))
    assert dispatch.choose("quant_matmul", cpu, bits=4, m=1, group_size=128) == "ref"
    assert dispatch.choose("lora", cpu) == "ref"
    monkeypatch.setattr(dispatch, "has_module", lambda name: True)
    cuda = torch.device("cuda")
    assert dispatch.choose("quant_matmul", cuda, bits=3, m=1, group_size=128) == "triton"
    assert dispatch.choose("quant_matmul", cuda, bits=4, m=4096, group_size=128) == "dequant"
    assert dispatch.choose("quant_matmul", cuda, bits=4, m=255, group_size=128) == "triton"
    assert dispatch.choose("quant_matmul", cuda, bits=4, m=2, group_size=128) == "exllama"
    # exllamav2 computes in fp16 only (bf16 goes to the Triton kernel), our GPU kernels in fp16 and
    # bf16: fp32 activations run the reference
    assert dispatch.choose("quant_matmul", cuda, bits=4, m=2, dtype=torch.bfloat16, group_size=128) == "triton"
    for m in (2, 64, 4096):
        assert dispatch.choose("quant_matmul", cuda, bits=4, m=m, dtype=torch.float32, group_size=128) == "ref"
    assert dispatch.choose("quant_matmul", cuda, bits=4, m=4, group_size=128) == "triton"
    # the CUDA GEMM from M = 1 to 32, only where the layer holds its layout (built by prepare)
    for m in (1, 2, 3, 8, 16, 32):
        assert dispatch.choose("quant_matmul", cuda, bits=4, m=m, group_size=128, cuda_gemm=True) == "cuda"
    assert dispatch.choose("quant_matmul", cuda, bits=4, m=33, group_size=128, cuda_gemm=True) == "triton"
    # the decode step's fused LoRA paths: the shrink beside the GEMM on CUDA, gate/up's expand
    # inside SiLU-and-mul up to M = 64; neither on the CPU
    assert dispatch.choose("lora_overlap", cuda) == "stream"
    assert dispatch.choose("lora_overlap", cpu) == "serial"
    assert [dispatch.choose("silu_lora", cuda, m=m) for m in (1, 64, 65)] == ["fused", "fused", "separate"]
    assert dispatch.choose("silu_lora", cpu, m=1) == "separate"
    assert [dispatch.choose("rope_lora", cuda, m=m) for m in (1, 64, 65)] == ["fused", "fused", "separate"]
    assert dispatch.choose("rope_lora", cpu, m=1) == "separate"
    assert dispatch.choose("decode_attention", cuda) == "mma"  # which Triton decode kernel
    # programmatic dependent launch from sm_90 (Hopper) on, never on the CPU
    assert [dispatch.choose("pdl", cuda, sm=sm) for sm in (80, 89, 90, 100)] == ["off", "off", "on", "on"]
    assert dispatch.choose("pdl", cpu, sm=90) == "off"
    monkeypatch.setenv("INLAID_BACKEND_DECODE_ATTENTION", "fma")
    assert dispatch.choose("decode_attention", cuda) == "fma"
    monkeypatch.setenv("INLAID_BACKEND_QUANT_MATMUL", "ref")
    assert dispatch.choose("quant_matmul", cuda, bits=4, m=1, group_size=128) == "ref"
    monkeypatch.setenv("INLAID_BACKEND_LORA_OVERLAP", "serial")
    assert dispatch.choose("lora_overlap", cuda) == "serial"


def test_refresh_backend_state_retires_what_graphs_may_still_read():
    """After a weight swap, backend state built from the old weights is handed back (to be kept alive
    until CUDA graphs are re-captured) and the layer starts clean; a layer without any has nothing to
    retire."""
    from inlaid.kernels.quant_matmul import refresh_backend_state

    p = prepare(random_layer(256, 64, 4, 128, True, False, False, 0)[0], "cpu")
    handle = object()
    p.backend_state["exllama"] = handle
    assert refresh_backend_state(p) == [{"exllama": handle}] and p.backend_state == {}
    assert refresh_backend_state(p) == []
