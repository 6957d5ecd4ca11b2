import pytest
import torch

from inlaid.quant.primitives import (compute_qparams, dequantize_linear, group_index, pack_linear,
                                     pack_rows, rtn_quantize, unpack_rows, unpack_zeros)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_round_trip(bits):
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (96, 7), generator=gen)
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (96 * bits // 32, 7)
    assert torch.equal(unpack_rows(packed, bits), codes)


def _as_u32(t):
    return [int(v) & 0xFFFFFFFF for v in t.flatten().tolist()]


def test_4bit_layout_little_end_first():
    codes = torch.arange(8).repeat(4).reshape(32, 1)  # 0..7, 0..7, ...
    words = _as_u32(pack_rows(codes, 4))
    assert words[0] == 0x76543210


def test_3bit_layout_hand_made():
    # Code k = 7 only at position 10: bits 30,31 of word 0 and bit 0 of word 1 (split field).
    codes = torch.zeros(32, 1, dtype=torch.long)
    codes[10] = 7
    assert _as_u32(pack_rows(codes, 3)) == [0xC0000000, 0x00000001, 0x00000000]
    # Position 21: bit 31 of word 1 and bits 0,1 of word 2.
    codes = torch.zeros(32, 1, dtype=torch.long)
    codes[21] = 7
    assert _as_u32(pack_rows(codes, 3)) == [0, 0x80000000, 0x00000003]
    # Positions 0..9 fill word 0 three bits each; 11..20 sit at bits 1..30 of word 1.
    codes = torch.zeros(32, 1, dtype=torch.long)
    codes[0], codes[9], codes[11], codes[22], codes[31] = 1, 5, 3, 6, 4
    assert _as_u32(pack_rows(codes, 3)) == [1 | (5 << 27), 3 << 1, (6 << 2) | (4 << 29)]


def test_qparams_symmetric_zero_and_fp16_scale():
    w = torch.tensor([[-1.0, 0.5, 0.25], [0.0, 0.0, 0.0]])
    scale, zero = compute_qparams(w, 4, sym=True)
    assert zero.tolist() == [8.0, 8.0]
    assert torch.equal(scale, scale.half().float())


def test_asym_zero_point_never_zero():
    # An all-positive row would get zero point 0, which GPTQ v1 (stored zero - 1) cannot hold.
    w = torch.rand(4, 64) + 0.5
    _, zero = compute_qparams(w, 4, sym=False)
    assert zero.min() >= 1


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [-1, 32])
def test_rtn_pack_dequantize_matches(bits, sym, group_size):
    w = torch.randn(64, 128)
    deq, codes, scales, zeros, g_idx = rtn_quantize(w, bits, group_size, sym)
    p = pack_linear(codes, scales, zeros, g_idx, bits)
    assert p.qzeros.shape == (scales.shape[0], 64 * bits // 32)
    assert torch.equal(unpack_zeros(p.qzeros, bits), zeros.to(torch.int64))
    assert torch.equal(dequantize_linear(p), deq)
    # RTN error is bounded by half a step per element.
    step = scales.t()[:, g_idx.long()]
    assert ((w - deq).abs() <= step / 2 + 1e-6).float().mean() > 0.99


def test_dequantize_against_float64_formula():
    """W[o, i] = s[g, o] * (q[i, o] - z[g, o]) with g = g_idx[i], for a shuffled (act-order) g_idx."""
    gen = torch.Generator().manual_seed(3)
    out_f, in_f, bits = 32, 64, 3
    g_idx = group_index(in_f, 32)[torch.randperm(in_f, generator=gen)]
    codes = torch.randint(0, 8, (out_f, in_f), generator=gen)
    scales = (torch.rand(2, out_f, generator=gen) + 0.01).half().float()
    zeros = torch.randint(1, 8, (2, out_f), generator=gen).float()
    p = pack_linear(codes, scales, zeros, g_idx, bits)
    expect = torch.empty(out_f, in_f, dtype=torch.float64)
    for o in range(out_f):
        for i in range(in_f):
            g = int(g_idx[i])
            expect[o, i] = float(scales[g, o]) * (int(codes[o, i]) - float(zeros[g, o]))
    assert torch.allclose(dequantize_linear(p).double(), expect, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_concat_packed_equals_stacked_weights(bits):
    from inlaid.quant.primitives import concat_packed, dequantize_linear, group_index, pack_linear

    gen = torch.Generator().manual_seed(bits)
    parts, dense = [], []
    for out_features, bias in ((64, True), (32, False), (32, True)):
        codes = torch.randint(0, 2 ** bits, (out_features, 96), generator=gen)
        scales = torch.rand(3, out_features, generator=gen) + 0.1
        zeros = torch.randint(1, 2 ** bits, (3, out_features), generator=gen)
        b = torch.randn(out_features, generator=gen) if bias else None
        p = pack_linear(codes, scales, zeros, group_index(96, 32), bits, b)
        parts.append(p)
        dense.append(dequantize_linear(p))
    fused = concat_packed(parts)
    assert torch.equal(dequantize_linear(fused), torch.cat(dense))
    assert torch.equal(fused.bias[64:96], torch.zeros(32, dtype=torch.float16))
    assert torch.equal(fused.bias[:64], parts[0].bias)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packed_linear_refuses_tensors_packed_at_other_bits(bits):
    """A config that records the wrong bits gives a line naming both widths, not a shape error from
    unpacking: the packed tensors' shapes say which width they hold."""
    import dataclasses

    from inlaid.errors import CheckpointError
    from inlaid.quant.primitives import packed_shape_mismatch

    _, codes, scales, zeros, g_idx = rtn_quantize(torch.randn(64, 96), bits, 32, sym=False)
    p = pack_linear(codes, scales, zeros, g_idx, bits)
    shapes = {k: tuple(getattr(p, k).shape) for k in ("qweight", "qzeros", "scales", "g_idx")}
    assert packed_shape_mismatch(bits, shapes, group_size=32) is None
    assert "groups of 64" in packed_shape_mismatch(bits, shapes, group_size=64)
    for other in {2, 3, 4, 8} - {bits}:
        with pytest.raises(CheckpointError, match=rf"qweight is \[{96 * bits // 32}, 64\] \({bits}-bit codes\), "
                                                  rf"but {other}-bit codes take \[{96 * other // 32}, 64\]"):
            dataclasses.replace(p, bits=other)
