"""Quantize / dequantize / pack in the GPTQ v1 layout. This module is the reference for the kernels.

Layout (AutoGPTQ "gptq" v1, read by transformers/GPTQModel, vLLM and exllamav2), for a linear layer
with weight W[out, in]:
- ``qweight`` int32 [in * bits / 32, out]: integer codes packed along the input dimension;
- ``qzeros``  int32 [groups, out * bits / 32]: zero points minus one, packed along the output dim;
- ``scales``  fp16  [groups, out];
- ``g_idx``   int32 [in]: the group of every input column (non-monotonic under act-order).
``W[o, i] = scales[g, o] * (q[i, o] - (stored_zero[g, o] + 1))`` with ``g = g_idx[i]``.

Packing treats 32 consecutive codes as one little-endian bit stream of 32*bits bits split into
``bits`` words: code k occupies stream bits [k*bits, (k+1)*bits). For 2/4/8 bits no code straddles a
word; for 3 bits codes 10 and 21 straddle words 0/1 and 1/2, exactly the AutoGPTQ 3-bit layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from inlaid.errors import CheckpointError

# fp16 cannot hold a smaller positive scale; a zero scale would make the grid degenerate.
_MIN_SCALE = 2.0**-24
PACKED_FIELDS = ("qweight", "qzeros", "scales", "g_idx")  # a packed layer's tensors, bias aside


def max_code(bits: int) -> int:
    return (1 << bits) - 1


def compute_qparams(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero) for ``w[rows, cols]`` in the GPTQ reference min/max rule.

    The scale is rounded to fp16 here because fp16 is what the checkpoint stores: quantizing on the
    stored grid makes the saved model reproduce the solver's weights exactly. Zero points are kept in
    [1, maxq] because v1 stores ``zero - 1`` (a zero of 0 would wrap around).
    """
    maxq = max_code(bits)
    w = w.float()
    xmin = torch.clamp(w.min(dim=1).values, max=0.0)
    xmax = torch.clamp(w.max(dim=1).values, min=0.0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    both_zero = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both_zero, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(both_zero, torch.full_like(xmax, 1.0), xmax)
    scale = ((xmax - xmin) / maxq).clamp(min=_MIN_SCALE).half().float()
    if sym:
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        zero = torch.round(-xmin / scale).clamp(1, maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of ``w`` (broadcast against scale/zero), clamped to [0, maxq]."""
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, max_code(bits))


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes [n, m] along dim 0 into int32 words [n * bits / 32, m]."""
    n, m = codes.shape
    if n % 32:
        raise ValueError(f"pack_rows needs a multiple of 32 rows, got {n}")
    values = codes.to(torch.int64).reshape(n // 32, 32, m)
    words = torch.zeros(n // 32, bits, m, dtype=torch.int64, device=codes.device)
    for k in range(32):
        offset = k * bits
        word, shift = divmod(offset, 32)
        words[:, word] |= values[:, k] << shift
        if shift + bits > 32:
            words[:, word + 1] |= values[:, k] >> (32 - shift)
    words &= 0xFFFFFFFF
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.reshape(n // 32 * bits, m).to(torch.int32)


def unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: int32 [n * bits / 32, m] -> int64 codes [n, m]."""
    nw, m = words.shape
    if nw % bits:
        raise ValueError(f"unpack_rows: {nw} words is not a multiple of {bits}")
    w = (words.to(torch.int64) & 0xFFFFFFFF).reshape(nw // bits, bits, m)
    mask = max_code(bits)
    out = torch.empty(nw // bits, 32, m, dtype=torch.int64, device=words.device)
    for k in range(32):
        offset = k * bits
        word, shift = divmod(offset, 32)
        v = w[:, word] >> shift
        if shift + bits > 32:
            v = v | (w[:, word + 1] << (32 - shift))
        out[:, k] = v & mask
    return out.reshape(nw // bits * 32, m)


class LinearShape:
    """in/out features of a layer stored in the GPTQ layout (g_idx [in], scales [groups, out])."""

    g_idx: torch.Tensor
    scales: torch.Tensor

    @property
    def in_features(self) -> int:
        return self.g_idx.numel()

    @property
    def out_features(self) -> int:
        return self.scales.shape[1]


def packed_shape_mismatch(bits: int, shapes: dict[str, tuple[int, ...]],
                          group_size: int | None = None) -> str | None:
    """Why GPTQ v1 tensors of these ``shapes`` (qweight, qzeros, scales, g_idx) cannot hold
    ``bits``-bit codes in groups of ``group_size`` (None: any grouping), or None when they can.
    Shapes only, so a checkpoint is checked from its header before any tensor is read."""
    scales, g_idx = tuple(shapes["scales"]), tuple(shapes["g_idx"])
    if len(scales) != 2 or len(g_idx) != 1:
        return f"scales is {list(scales)} and g_idx {list(g_idx)}, not [groups, out] and [in]"
    (groups, out_f), (in_f,) = scales, g_idx
    if in_f % 32 or out_f % 32:
        return f"{out_f}x{in_f} is not a GPTQ layer (both sizes must be multiples of 32)"
    expected = {"qweight": (in_f * bits // 32, out_f), "qzeros": (groups, out_f * bits // 32)}
    if group_size is not None:
        expected["scales"] = (1 if group_size == -1 else -(-in_f // group_size), out_f)
    for field, want in expected.items():
        got = tuple(shapes[field])
        if got != want:
            stored = _stored_bits(field, got, in_f, out_f)
            held = f" ({stored}-bit codes)" if stored in (2, 3, 4, 8) and stored != bits else ""
            grouping = {None: "", -1: " in one group"}.get(group_size, f" in groups of {group_size}")
            return f"{field} is {list(got)}{held}, but {bits}-bit codes{grouping} take {list(want)}"
    return None


def _stored_bits(field: str, shape: tuple[int, ...], in_f: int, out_f: int) -> int | None:
    """The bit width a packed tensor's shape implies, to name it in a mismatch."""
    if len(shape) != 2 or field not in ("qweight", "qzeros"):
        return None
    words, codes = (shape[0], in_f) if field == "qweight" else (shape[1], out_f)
    return words * 32 // codes if words * 32 % codes == 0 else None


@dataclass
class PackedLinear(LinearShape):
    """One quantized linear layer in the GPTQ v1 layout (tensors as stored in the checkpoint)."""

    qweight: torch.Tensor  # int32 [in*bits/32, out]
    qzeros: torch.Tensor  # int32 [groups, out*bits/32]
    scales: torch.Tensor  # fp16 [groups, out]
    g_idx: torch.Tensor  # int32 [in]
    bits: int
    bias: torch.Tensor | None = None  # fp16 [out]

    def __post_init__(self) -> None:
        # Tensors that disagree with ``bits`` (a hand-edited config.json) would otherwise fail deep
        # inside unpacking or a kernel with a shape error that names neither.
        problem = packed_shape_mismatch(self.bits, {k: tuple(getattr(self, k).shape) for k in PACKED_FIELDS})
        if problem:
            raise CheckpointError(f"quantized weights do not match their bits ({self.bits}): {problem}")

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.qweight": self.qweight, f"{prefix}.qzeros": self.qzeros,
               f"{prefix}.scales": self.scales, f"{prefix}.g_idx": self.g_idx}
        if self.bias is not None:
            out[f"{prefix}.bias"] = self.bias
        return out


def pack_linear(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
                bits: int, bias: torch.Tensor | None = None) -> PackedLinear:
    """Pack codes [out, in] (HF weight orientation), per-group scales/zeros [groups, out]."""
    qweight = pack_rows(codes.t().contiguous(), bits)
    qzeros = pack_rows((zeros.to(torch.int64) - 1).t().contiguous(), bits).t().contiguous()
    return PackedLinear(qweight=qweight, qzeros=qzeros, scales=scales.half().contiguous(),
                        g_idx=g_idx.to(torch.int32).contiguous(), bits=bits,
                        bias=None if bias is None else bias.half())


def concat_packed(parts: list[PackedLinear]) -> PackedLinear:
    """Stack layers that read the same input (q/k/v, gate/up) into one along the output dim, so a
    serving step runs one GEMM instead of three. They must share g_idx: true for layers quantized
    from one shared Hessian (act-order permutes all of them alike)."""
    first = parts[0]
    if any(p.bits != first.bits or not torch.equal(p.g_idx, first.g_idx) for p in parts[1:]):
        raise ValueError("only layers with the same bits and g_idx can be fused")
    zeros = torch.cat([unpack_zeros(p.qzeros, p.bits) for p in parts], dim=1)
    biases = [p.bias for p in parts]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([b if b is not None else torch.zeros(p.out_features, dtype=torch.float16)
                          for p, b in zip(parts, biases)])
    return PackedLinear(
        qweight=torch.cat([p.qweight for p in parts], dim=1),
        qzeros=pack_rows((zeros.to(torch.int64) - 1).t().contiguous(), first.bits).t().contiguous(),
        scales=torch.cat([p.scales for p in parts], dim=1), g_idx=first.g_idx, bits=first.bits,
        bias=bias)


def unpack_zeros(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Stored v1 zero points -> real zero points [groups, out]."""
    return unpack_rows(qzeros.t().contiguous(), bits).t() + 1


def dequantize_weight(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      g_idx: torch.Tensor, bits: int) -> torch.Tensor:
    """fp32 weight [out, in] from packed codes and *real* (unpacked) zero points [groups, out]."""
    codes = unpack_rows(qweight, bits).float()  # [in, out]
    g = g_idx.long()
    w = scales.float()[g] * (codes - zeros.float()[g])
    return w.t().contiguous()


def dequantize_linear(p: PackedLinear) -> torch.Tensor:
    """The weight [out, in] in fp32 that a packed layer represents (the reference for every kernel)."""
    return dequantize_weight(p.qweight, p.scales, unpack_zeros(p.qzeros, p.bits), p.g_idx, p.bits)


def group_index(in_features: int, group_size: int) -> torch.Tensor:
    """Natural-order group of each input column (group_size -1 = one group)."""
    size = in_features if group_size == -1 else group_size
    return torch.arange(in_features, dtype=torch.int32) // size


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int, sym: bool):
    """Round-to-nearest baseline: (dequantized weight, codes, scales, zeros, g_idx)."""
    out_f, in_f = weight.shape
    g_idx = group_index(in_f, group_size)
    size = in_f if group_size == -1 else group_size
    w = weight.float()
    scales, zeros, codes = [], [], torch.empty_like(w)
    for start in range(0, in_f, size):
        s, z = compute_qparams(w[:, start:start + size], bits, sym)
        codes[:, start:start + size] = quantize_codes(w[:, start:start + size], s[:, None], z[:, None], bits)
        scales.append(s)
        zeros.append(z)
    scales_t, zeros_t = torch.stack(scales), torch.stack(zeros)
    deq = dequantize_codes(codes, scales_t.t()[:, g_idx.long()], zeros_t.t()[:, g_idx.long()])
    return deq, codes.to(torch.int64), scales_t, zeros_t, g_idx
