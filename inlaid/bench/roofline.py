"""The HBM roofline of a decode step: the bytes it must read over the memory bandwidth.

A decode step is memory-bound: every weight is read once for the whole batch, and each sequence
reads its own KV cache. Bytes, from the model config (d = bytes of the compute dtype, 2 for fp16):

- each projection (out × in) of each layer: dense ``out·in·d``; GPTQ b-bit with group g
  ``out·in·b/8`` (qweight) + ``(in/g)·out·d`` (scales) + ``(in/g)·out·b/8`` (qzeros); g_idx and
  activations are left out;
- lm_head ``vocab·hidden·d`` (never quantized), the step's embedding rows ``tokens·hidden·d``, and
  the RMSNorm weights ``(2·layers + 1)·hidden·d``;
- each distinct adapter of the step, at its rank r: ``r·Σ_proj(in + out)·layers·d``;
- KV: ``context·2·layers·kv_heads·head_dim·d`` where context sums, over the step's sequences, the
  positions each attends to (its cache plus the new token).

Roofline time = bytes / bandwidth, 2.99 TB/s by default (a measured device-to-device copy on the
H100, as in ``scripts/bench_lora.py``). Fraction of roofline = roofline time / measured step time,
summed over the pure decode steps of a run: 1.0 means the step ran at the memory bandwidth.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

from inlaid.bench.metrics import StepRecord
from inlaid.model.arch import projection_shapes

HBM_BYTES_PER_S = 2.99e12


@dataclass(frozen=True)
class ModelBytes:
    """What one step reads regardless of its batch, and the per-token / per-rank rates."""

    weight_bytes: int  # projections + lm_head + norms
    embedding_row_bytes: int  # one token's embedding row
    kv_bytes_per_token: int  # K and V of one position over all layers
    adapter_bytes_per_rank: int  # A and B of all projections and layers, per unit of rank

    def step_bytes(self, num_tokens: int, num_context_tokens: int, adapter_ranks: Iterable[int]) -> int:
        return (self.weight_bytes + num_tokens * self.embedding_row_bytes
                + num_context_tokens * self.kv_bytes_per_token
                + sum(adapter_ranks) * self.adapter_bytes_per_rank)


def linear_bytes(out_features: int, in_features: int, bits: int | None, group_size: int | None,
                 dtype_bytes: int) -> int:
    """Bytes of one projection as the kernel reads it: dense, or GPTQ qweight + scales + qzeros."""
    if bits is None:
        return out_features * in_features * dtype_bytes
    group = in_features if group_size is None or group_size <= 0 else group_size
    groups = -(-in_features // group)
    return (out_features * in_features * bits // 8 + groups * out_features * dtype_bytes
            + groups * out_features * bits // 8)


def model_bytes(config, bits: int | None = None, group_size: int | None = 128, dtype_bytes: int = 2) -> ModelBytes:
    """:class:`ModelBytes` of an HF Llama-family config; ``bits=None`` is a dense base."""
    layers, hidden = config.num_hidden_layers, config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    shapes = projection_shapes(config).values()
    per_layer = sum(linear_bytes(out_f, in_f, bits, group_size, dtype_bytes) for out_f, in_f in shapes)
    weights = (layers * per_layer + config.vocab_size * hidden * dtype_bytes
               + (2 * layers + 1) * hidden * dtype_bytes)
    return ModelBytes(
        weight_bytes=weights, embedding_row_bytes=hidden * dtype_bytes,
        kv_bytes_per_token=2 * layers * kv_heads * head_dim * dtype_bytes,
        adapter_bytes_per_rank=layers * sum(out_f + in_f for out_f, in_f in shapes) * dtype_bytes)


@dataclass(frozen=True)
class RooflineSummary:
    bandwidth_bytes_per_s: float
    weight_bytes: int
    num_decode_steps: int
    mean_step_bytes: float | None
    mean_roofline_s: float | None  # bytes / bandwidth
    mean_measured_s: float | None
    fraction: float | None  # Σ roofline time / Σ measured time over decode steps

    def to_dict(self) -> dict:
        return asdict(self)


def decode_roofline(steps: Sequence[StepRecord], bytes_of: ModelBytes, rank_of: Callable[[str], int],
                    bandwidth: float = HBM_BYTES_PER_S) -> RooflineSummary:
    """Roofline of the run's pure decode steps (``rank_of`` maps an adapter name to its rank)."""
    decode = [s for s in steps if s.kind == "decode" and s.duration_s > 0]
    if not decode:
        return RooflineSummary(bandwidth, bytes_of.weight_bytes, 0, None, None, None, None)
    step_bytes = [bytes_of.step_bytes(s.num_decode_tokens, s.num_context_tokens,
                                      (rank_of(a) for a in set(s.adapters))) for s in decode]
    measured = sum(s.duration_s for s in decode)
    roofline = sum(step_bytes) / bandwidth
    n = len(decode)
    return RooflineSummary(bandwidth, bytes_of.weight_bytes, n, sum(step_bytes) / n, roofline / n,
                           measured / n, roofline / measured)
