"""The fused Triton ops of a decoder layer against the torch path of the model (GPU only).

Fresh random inputs in fp16 and bf16; RoPE on strided views (q/k/v are slices of the fused qkv
output) with a real transformers cos/sin table (llama3 scaling). Bounds:
- the residual add: bit-identical to torch's ``h + delta`` (both add in fp32 and round once);
- RMSNorm: max |diff| <= 2 ulp of the output dtype at its magnitude (both reduce in fp32, then round);
- RoPE: <= 4 eps x max |value| (the torch path rounds after each of its three ops, the kernel once);
  v is copied into the cache bit-exactly and no other cache slot is touched;
- SiLU-and-mul: <= 2 ulp at the output's magnitude (both round silu, then the product; exp differs).
"""

import importlib.util

import pytest
import torch

from inlaid.engine.attention import write_kv
from inlaid.engine.model import apply_rope, rms_norm

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")]

DTYPES = [torch.float16, torch.bfloat16]


def _ulp_close(got: torch.Tensor, want: torch.Tensor, ulps: float) -> bool:
    ulp = torch.finfo(want.dtype).eps * want.float().abs().clamp(min=1)
    return bool(((got.float() - want.float()).abs() <= ulps * ulp).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [576, 4096, 5120])
def test_rms_norm_matches_torch(dtype, hidden):
    from inlaid.kernels.triton.norm_rope import rms_norm_triton

    gen = torch.Generator().manual_seed(hidden)
    x = (torch.randn(37, hidden, generator=gen) * 3).to(dtype).cuda()
    w = torch.randn(hidden, generator=gen).to(dtype).cuda()
    assert _ulp_close(rms_norm_triton(x, w, 1e-5), rms_norm(x, w, 1e-5), 2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [576, 4096])
def test_add_rms_norm_matches_torch(dtype, hidden):
    from inlaid.kernels.triton.norm_rope import add_rms_norm_triton

    gen = torch.Generator().manual_seed(hidden + 1)
    h = (torch.randn(33, hidden, generator=gen) * 3).to(dtype).cuda()
    delta = torch.randn(33, hidden, generator=gen).to(dtype).cuda()
    w = torch.randn(hidden, generator=gen).to(dtype).cuda()
    h_before = h.clone()
    x, new_h = add_rms_norm_triton(h, delta, w, 1e-5)
    assert torch.equal(new_h, h + delta)
    assert torch.equal(h, h_before)  # out of place
    assert _ulp_close(x, rms_norm(h + delta, w, 1e-5), 2)


def _cos_sin(positions: torch.Tensor, heads: int, kv_heads: int, dim: int, dtype):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=heads * dim, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=131072,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    rope = LlamaRotaryEmbedding(config).cuda()
    return (t[0] for t in rope(torch.empty(0, device="cuda", dtype=dtype), positions[None]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,dim", [(8, 2, 128), (9, 3, 64), (32, 32, 128)])
def test_rope_write_kv_matches_torch(dtype, heads, kv_heads, dim):
    from inlaid.kernels.triton.norm_rope import rope_write_kv_triton

    tokens, num_slots = 29, 64
    gen = torch.Generator().manual_seed(heads * dim)
    cos, sin = _cos_sin(torch.randint(0, 100_000, (tokens,), generator=gen).cuda(), heads, kv_heads, dim,
                        dtype)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen).to(dtype).cuda()
    q = qkv[:, :heads * dim].reshape(-1, heads, dim)
    k = qkv[:, heads * dim:(heads + kv_heads) * dim].reshape(-1, kv_heads, dim)
    v = qkv[:, (heads + kv_heads) * dim:].reshape(-1, kv_heads, dim)
    slots = torch.randperm(num_slots, generator=gen)[:tokens].cuda()
    caches = [torch.randn(num_slots, kv_heads, dim, generator=gen).to(dtype).cuda() for _ in range(2)]
    want_k_cache, want_v_cache = (c.clone() for c in caches)
    want_q = apply_rope(q.clone(), cos, sin)
    write_kv(want_k_cache, want_v_cache, apply_rope(k.clone(), cos, sin), v.clone(), slots)
    k_before, v_before = k.clone(), v.clone()

    got_q = rope_write_kv_triton(q, k, v, cos, sin, caches[0], caches[1], slots)
    assert got_q.data_ptr() == q.data_ptr()  # in place
    for got, want in ((q, want_q), (caches[0], want_k_cache)):
        bound = 4 * torch.finfo(dtype).eps * want.float().abs().max().item()
        assert (got.float() - want.float()).abs().max().item() <= bound
    assert torch.equal(caches[1], want_v_cache)
    untouched = torch.ones(num_slots, dtype=torch.bool)
    untouched[slots.cpu()] = False
    assert torch.equal(caches[0][untouched.cuda()], want_k_cache[untouched.cuda()])
    assert torch.equal(k, k_before) and torch.equal(v, v_before)  # k/v themselves are not modified


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [1536, 11008])
def test_silu_mul_matches_torch(dtype, inter):
    from inlaid.kernels.triton.norm_rope import silu_mul_triton

    gen = torch.Generator().manual_seed(inter)
    gate_up = (torch.randn(17, 2 * inter, generator=gen) * 4).to(dtype).cuda()
    gate, up = gate_up.chunk(2, dim=-1)
    assert _ulp_close(silu_mul_triton(gate_up), torch.nn.functional.silu(gate) * up, 2)
