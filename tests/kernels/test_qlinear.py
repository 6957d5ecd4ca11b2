"""QuantLinear (quant_matmul + multi-LoRA) against per-token float64 math (reference backends)."""

import torch

from inlaid.kernels.lora import LoraBatchMeta
from inlaid.kernels.qlinear import LoraBank, QuantLinear
from inlaid.kernels.quant_matmul import prepare

from .test_quant_matmul import random_layer


def test_fused_qkv_with_mixed_adapters_matches_float64():
    widths = (64, 32, 32)  # GQA: q wider than k and v
    k, n = 96, sum(widths)
    packed, w64, bias = random_layer(k, n, 4, 32, True, False, bias=True, seed=5)
    slots = LoraBank(1, k, widths, max_loras=3, max_rank=8, dtype=torch.float64).layer(0)
    gen = torch.Generator().manual_seed(0)
    adapters = {}
    for slot, (rank, scale) in enumerate([(8, 2.0), (2, 0.5), (4, 1.0)]):
        pairs = [(torch.randn(rank, k, generator=gen, dtype=torch.float64),
                  torch.randn(width, rank, generator=gen, dtype=torch.float64)) for width in widths]
        if slot == 2:
            pairs[1] = None  # this adapter has no LoRA on k_proj
        slots.load(slot, pairs, scale)
        adapters[slot] = (pairs, scale)
    slots.load(0, adapters[0][0], adapters[0][1])  # reloading a slot leaves nothing behind
    layer = QuantLinear(prepare(packed, "cpu", torch.float64), slots)
    token_slot = torch.tensor([2, -1, 0, 1, 0, -1, 2], dtype=torch.int32)
    x = torch.randn(len(token_slot), k, generator=gen, dtype=torch.float64)
    meta = LoraBatchMeta(16, 3).prepare(token_slot)
    got = layer(x, meta)
    expect = x @ w64.t() + bias.double()
    for t, slot in enumerate(token_slot.tolist()):
        if slot < 0:
            continue
        pairs, scale = adapters[slot]
        off = 0
        for width, pair in zip(widths, pairs):
            if pair is not None:
                a, b = pair
                expect[t, off:off + width] += scale * (b @ (a @ x[t]))
            off += width
    assert torch.allclose(got, expect, rtol=1e-9, atol=1e-9)
    assert torch.allclose(layer(x), x @ w64.t() + bias.double(), rtol=1e-9, atol=1e-9)
