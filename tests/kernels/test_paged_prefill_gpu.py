"""Triton varlen paged prefill attention against the torch SDPA path (GPU only).

One step mixing prompts from position 0, chunks that continue a cached prefix (chunked prefill,
recompute), two-token chunks and decodes, over fresh random caches with shuffled block tables; MHA
and GQA, head_dim 64 and 128, block sizes 8 and 16, sliding windows. Bounds (max |diff| against SDPA
in the same dtype): fp16 4e-3 (the kernel rounds the softmax weights to fp16 for the P·V product),
fp32 1e-4 (IEEE dots, no TF32)."""

import importlib.util

import pytest
import torch

from inlaid.engine import attention

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")]

# (start, new tokens): prompts, a chunk after a cached prefix, a 2-token chunk, decodes, a long prompt
PIECES = [(0, 5), (37, 70), (0, 130), (49, 1), (16, 2), (0, 64), (200, 1), (64, 65)]


def run_both(monkeypatch, heads, kv_heads, dim, block, window, dtype, device="cuda"):
    gen = torch.Generator().manual_seed(heads * dim + block + (window or 0))
    num_blocks = sum(-(-(s + n) // block) for s, n in PIECES) + 7
    k = torch.randn(num_blocks * block, kv_heads, dim, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(num_blocks * block, kv_heads, dim, generator=gen).to(device=device, dtype=dtype)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    pieces, used = [], 0
    for start, n in PIECES:
        count = -(-(start + n) // block)
        pieces.append((perm[used:used + count], start, n))
        used += count
    total = sum(n for _, n in PIECES)
    q = torch.randn(total, heads, dim, generator=gen).to(device=device, dtype=dtype)
    scale = dim ** -0.5
    outs, slot_maps = {}, {}
    for use_kernel in (False, True):
        monkeypatch.setattr(attention, "_use_kernel", lambda _device, flag=use_kernel: flag)
        batch = attention.build_batch(pieces, block, device)
        assert (batch.prefill_tables is not None) == use_kernel and bool(batch.chunks) != use_kernel
        slot_maps[use_kernel] = batch.slot_mapping
        outs[use_kernel] = attention.paged_attention(q, k, v, batch, scale, window)
    assert torch.equal(slot_maps[True], slot_maps[False])  # the new tokens' K/V land in the same slots
    return outs[True], outs[False]


@pytest.mark.parametrize("heads,kv_heads,dim,block", [(32, 32, 128, 16), (8, 2, 64, 16), (4, 1, 64, 8)])
@pytest.mark.parametrize("window", [None, 24])
@pytest.mark.parametrize("dtype,bound", [(torch.float16, 4e-3), (torch.float32, 1e-4)])
def test_paged_prefill_matches_sdpa(monkeypatch, heads, kv_heads, dim, block, window, dtype, bound):
    got, ref = run_both(monkeypatch, heads, kv_heads, dim, block, window, dtype)
    assert not torch.isnan(got).any()
    assert (got.float() - ref.float()).abs().max().item() < bound
