"""Triton paged decode attention against the torch SDPA path over gathered K/V (GPU only).

Fresh random caches, shuffled block tables, loop tiles of one and of several blocks, GQA and MHA,
sliding windows, context lengths from 1 to several blocks, and zero-length padding rows (which must
come out as zeros), for both kernel variants and for the mma kernel's contexts split over 1-8
programs. Bound: fp16 inputs, fp32 softmax in both paths:
max |diff| < 2e-3. The mma variant rounds the softmax weights to the cache's dtype before P @ V
(as FlashAttention does): with bf16 caches the bound is 2e-2. With fp32 caches both variants keep
fp32 products (the mma variant's dots are IEEE, not TF32): 1e-4, as for the prefill kernel."""

import importlib.util

import pytest
import torch

from inlaid.engine.attention import build_batch, paged_attention

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")]


BOUND = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float32: 1e-4}


@pytest.mark.parametrize("heads,kv_heads,dim,block", [(32, 32, 128, 16), (8, 2, 64, 16), (4, 1, 64, 8)])
@pytest.mark.parametrize("window", [None, 24])
@pytest.mark.parametrize("tile", [16, 64, 128])
@pytest.mark.parametrize("variant,dtype", [("fma", torch.float16), ("mma", torch.float16),
                                           ("mma", torch.bfloat16), ("fma", torch.float32),
                                           ("mma", torch.float32)])
def test_paged_decode_matches_sdpa(heads, kv_heads, dim, block, window, tile, variant, dtype):
    _check_against_sdpa(heads, kv_heads, dim, block, window, tile, variant, dtype, splits=None)


@pytest.mark.parametrize("heads,kv_heads,dim,block", [(32, 32, 128, 16), (8, 2, 64, 16), (4, 1, 64, 8)])
@pytest.mark.parametrize("window", [None, 24])
@pytest.mark.parametrize("tile", [16, 64])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("splits", [1, 2, 8])
def test_split_contexts_match_sdpa(heads, kv_heads, dim, block, window, tile, dtype, splits):
    """The mma kernel with each context split over several programs (more splits than some
    contexts have tiles: those programs hold no token), merged in-kernel by the last to finish.
    Run twice: the arrival counters must be back at zero after a launch."""
    from inlaid.kernels.triton.scratch import persistent

    for _ in range(2):
        _check_against_sdpa(heads, kv_heads, dim, block, window, tile, "mma", dtype, splits=splits)
    counts = persistent("decode_attention_counts", torch.device("cuda"), 1, torch.int32)
    assert not counts.any()


def _check_against_sdpa(heads, kv_heads, dim, block, window, tile, variant, dtype, splits):
    from inlaid.kernels.triton.paged_attention import paged_decode_attention

    gen = torch.Generator().manual_seed(heads + dim + (window or 0))
    lens = [1, 7, block, block + 1, 200, 63]
    num_blocks = sum(-(-n // block) for n in lens) + 5
    k = torch.randn(num_blocks * block, kv_heads, dim, generator=gen).to(dtype).cuda()
    v = torch.randn(num_blocks * block, kv_heads, dim, generator=gen).to(dtype).cuda()
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, pieces, used = [], [], 0
    for n in lens:
        count = -(-n // block)
        table = perm[used:used + count]
        used += count
        pieces.append((table, n - 1, 1))
        tables.append(table)
    q = torch.randn(len(lens), heads, dim, generator=gen).to(dtype).cuda()
    scale = dim ** -0.5
    batch = build_batch(pieces, block, "cpu")  # the SDPA path (on GPU tensors below)
    batch.decode_rows, batch.decode_slots = batch.decode_rows.cuda(), batch.decode_slots.cuda()
    batch.decode_lens, batch.slot_mapping = batch.decode_lens.cuda(), batch.slot_mapping.cuda()
    want = paged_attention(q, k, v, batch, scale, window)
    width = max(len(t) for t in tables)
    table_t = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32).cuda()
    lens_t = torch.tensor(lens, dtype=torch.int32).cuda()
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    got = paged_decode_attention(q, k, v, table_t, lens_t, block, scale, window, out=out, tile=tile,
                                 variant=variant, splits=splits)
    assert (got.float() - want.float()).abs().max().item() < BOUND[dtype]
    zero = paged_decode_attention(q, k, v, table_t, torch.zeros_like(lens_t), block, scale, window,
                                  tile=tile, variant=variant, splits=splits)
    assert torch.equal(zero, torch.zeros_like(zero))
