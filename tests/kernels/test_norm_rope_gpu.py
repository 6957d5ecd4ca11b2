"""Fused Triton RMSNorm and RoPE against the torch path of the model (GPU only).

Fresh random inputs in fp16 and bf16; RoPE on a strided view (q/k are slices of the fused qkv
output) with a real transformers cos/sin table. Bounds: RMSNorm max |diff| <= 2 ulp of the output
dtype at its magnitude (both paths reduce in fp32, then round); RoPE <= 4 eps x max |value| (the
torch path rounds after each of its three ops, the kernel once)."""

import importlib.util

import pytest
import torch

from inlaid.engine.model import apply_rope, rms_norm

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hidden", [576, 4096, 5120])
def test_rms_norm_matches_torch(dtype, hidden):
    from inlaid.kernels.triton.norm_rope import rms_norm_triton

    gen = torch.Generator().manual_seed(hidden)
    x = (torch.randn(37, hidden, generator=gen) * 3).to(dtype).cuda()
    w = torch.randn(hidden, generator=gen).to(dtype).cuda()
    got, want = rms_norm_triton(x, w, 1e-5), rms_norm(x, w, 1e-5)
    ulp = torch.finfo(dtype).eps * want.float().abs().clamp(min=1)
    assert ((got.float() - want.float()).abs() <= 2 * ulp).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rope_matches_torch_on_strided_views(dtype):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from inlaid.kernels.triton.norm_rope import rope_triton_

    heads, kv_heads, dim = 8, 2, 128
    config = LlamaConfig(hidden_size=heads * dim, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=131072,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    rope = LlamaRotaryEmbedding(config).cuda()
    positions = torch.randint(0, 100_000, (29,)).cuda()
    cos, sin = (t[0] for t in rope(torch.empty(0, device="cuda", dtype=dtype), positions[None]))
    qkv = torch.randn(29, (heads + 2 * kv_heads) * dim, generator=torch.Generator().manual_seed(1))
    qkv = qkv.to(dtype).cuda()
    q = qkv[:, :heads * dim].reshape(-1, heads, dim)
    k = qkv[:, heads * dim:(heads + kv_heads) * dim].reshape(-1, kv_heads, dim)
    want_q, want_k = apply_rope(q.clone(), cos, sin), apply_rope(k.clone(), cos, sin)
    v_before = qkv[:, (heads + kv_heads) * dim:].clone()
    rope_triton_(q, cos, sin)
    rope_triton_(k, cos, sin)
    for got, want in ((q, want_q), (k, want_k)):
        bound = 4 * torch.finfo(dtype).eps * want.float().abs().max().item()
        assert (got.float() - want.float()).abs().max().item() <= bound
    assert torch.equal(qkv[:, (heads + kv_heads) * dim:], v_before)  # v untouched
