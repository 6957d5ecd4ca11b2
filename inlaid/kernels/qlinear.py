"""A quantized linear layer with heterogeneous multi-LoRA: y = x W_q^T (+ bias) + per-token LoRA.

One module serves a fused projection (q/k/v or gate/up) as several output slices, each with its
own adapter A/B in fixed GPU slots. The base product goes through ``quant_matmul`` and the adapters
through ``lora_shrink``/``lora_expand``, all chosen by the dispatch table. (A fused single-pass
version that writes y once is future work: measure it against this composition first.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from inlaid.kernels.lora import LoraBatchMeta, default_offsets, lora_expand, lora_shrink
from inlaid.kernels.quant_matmul import PreparedQuant, quant_matmul


class LoraSlots:
    """Adapter weights of one (possibly fused) projection, in ``max_loras`` slots."""

    def __init__(self, in_features: int, slice_widths: Sequence[int], max_loras: int, max_rank: int,
                 device="cpu", dtype=torch.float16):
        self.slice_widths = list(slice_widths)
        self.offsets = default_offsets(self.slice_widths)
        self.lora_a = [torch.zeros(max_loras, max_rank, in_features, device=device, dtype=dtype)
                       for _ in slice_widths]
        self.lora_b = [torch.zeros(max_loras, width, max_rank, device=device, dtype=dtype)
                       for width in slice_widths]
        self.ranks = torch.zeros(max_loras, dtype=torch.int32, device=device)
        self.scalings = torch.zeros(max_loras, dtype=torch.float32, device=device)

    @property
    def max_rank(self) -> int:
        return self.lora_a[0].shape[1]

    def load(self, slot: int, pairs: Sequence[tuple[torch.Tensor, torch.Tensor] | None],
             scaling: float) -> None:
        """Put one adapter into ``slot``: per slice (A [r, in], B [out_s, r]) or None (no LoRA on it).
        Rows past the rank are zeroed so a later, smaller adapter leaves nothing behind."""
        ranks = {a.shape[0] for pair in pairs if pair is not None for a in pair[:1]}
        if len(ranks) > 1:
            raise ValueError(f"slices of one adapter must share a rank, got {sorted(ranks)}")
        rank = ranks.pop() if ranks else 0
        if rank > self.max_rank:
            raise ValueError(f"rank {rank} exceeds max_rank {self.max_rank}")
        for s, pair in enumerate(pairs):
            self.lora_a[s][slot].zero_()
            self.lora_b[s][slot].zero_()
            if pair is not None:
                a, b = pair
                self.lora_a[s][slot, :rank].copy_(a)
                self.lora_b[s][slot, :, :rank].copy_(b)
        self.ranks[slot] = rank
        self.scalings[slot] = scaling


class QuantLinear(nn.Module):
    def __init__(self, quant: PreparedQuant, lora: LoraSlots | None = None):
        super().__init__()
        if lora is not None and sum(lora.slice_widths) != quant.out_features:
            raise ValueError(f"LoRA slices {lora.slice_widths} do not cover {quant.out_features} outputs")
        self.quant = quant
        self.lora = lora

    def forward(self, x: torch.Tensor, meta: LoraBatchMeta | None = None) -> torch.Tensor:
        """x [T, in]; ``meta`` groups the T tokens by adapter slot (None: base only)."""
        y = quant_matmul(x, self.quant)
        if self.lora is not None and meta is not None:
            lora = self.lora
            buf = lora_shrink(x, lora.lora_a, meta, lora.ranks, lora.scalings)
            lora_expand(buf, lora.lora_b, meta, lora.ranks, y, lora.offsets)
        return y
