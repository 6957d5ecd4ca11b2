"""Roofline bytes worked out by hand on a small config, and the fraction over decode steps only."""

from types import SimpleNamespace

import pytest

from inlaid.bench.metrics import StepRecord
from inlaid.bench.roofline import ModelBytes, decode_roofline, linear_bytes, model_bytes

# hidden 256, 4 heads of 64, 2 KV heads, intermediate 512, vocab 1000, 2 layers
CONFIG = SimpleNamespace(num_hidden_layers=2, hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=512, vocab_size=1000)


def test_linear_bytes_dense_and_gptq():
    assert linear_bytes(512, 256, None, None, 2) == 512 * 256 * 2
    # 4-bit, group 128: qweight 512*256/2, scales 2 groups * 512 * 2 B, qzeros 2 * 512 / 2
    assert linear_bytes(512, 256, 4, 128, 2) == 65536 + 2048 + 512
    assert linear_bytes(512, 64, 4, 128, 2) == 512 * 64 // 2 + 512 * 2 + 512 // 2  # one group when in < 128
    assert linear_bytes(512, 256, 4, -1, 2) == 65536 + 1024 + 256  # per-row (group = in)


def test_model_bytes_by_hand():
    fp16 = model_bytes(CONFIG, None, None, 2)
    # per layer: q 256x256, k 128x256, v 128x256, o 256x256, gate/up 512x256, down 256x512
    params_per_layer = 256 * 256 * 2 + 128 * 256 * 2 + 512 * 256 * 3
    assert fp16.weight_bytes == 2 * params_per_layer * 2 + 1000 * 256 * 2 + 5 * 256 * 2
    assert fp16.kv_bytes_per_token == 2 * 2 * 2 * 64 * 2
    in_plus_out = (256 + 256) * 2 + (256 + 128) * 2 + (256 + 512) * 3
    assert fp16.adapter_bytes_per_rank == 2 * in_plus_out * 2
    assert fp16.embedding_row_bytes == 512
    q4 = model_bytes(CONFIG, 4, 128, 2)
    shapes = [(256, 256), (128, 256), (128, 256), (256, 256), (512, 256), (512, 256), (256, 512)]
    dense_rest = 1000 * 256 * 2 + 5 * 256 * 2  # lm_head and norms stay fp16
    assert q4.weight_bytes == 2 * sum(linear_bytes(o, i, 4, 128, 2) for o, i in shapes) + dense_rest


def test_step_bytes_and_fraction_over_decode_steps_only():
    bytes_of = ModelBytes(weight_bytes=1000, embedding_row_bytes=1, kv_bytes_per_token=10, adapter_bytes_per_rank=2)
    steps = [StepRecord(1.0, 64, 0, ("a",), 0, 64),  # prefill: not counted
             StepRecord(0.5, 0, 2, ("a", "a"), 0, 30),  # 1000 + 2 + 300 + 16*2 (one distinct adapter)
             StepRecord(0.5, 0, 2, ("a", "b"), 0, 32)]  # 1000 + 2 + 320 + (16 + 8)*2
    ranks = {"a": 16, "b": 8}
    summary = decode_roofline(steps, bytes_of, ranks.__getitem__, bandwidth=1000.0)
    assert summary.num_decode_steps == 2
    assert summary.mean_step_bytes == pytest.approx((1334 + 1370) / 2)
    assert summary.fraction == pytest.approx((1334 + 1370) / 1000 / 1.0)
    assert decode_roofline(steps[:1], bytes_of, ranks.__getitem__).fraction is None
