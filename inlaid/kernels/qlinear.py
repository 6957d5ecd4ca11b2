"""A linear layer with heterogeneous multi-LoRA: y = x W^T (+ bias) + per-token LoRA, where W is
quantized (:class:`PreparedQuant`) or dense (:class:`DenseLinear`: fp16 bases, and the CPU path,
which dequantizes once at load instead of on every step).

One module serves a fused projection (q/k/v or gate/up) as several output slices, each with its
own adapter A/B in fixed GPU slots. The base product goes through ``quant_matmul`` and the adapters
through ``lora_shrink``/``lora_expand``, all chosen by the dispatch table. (A fused single-pass
version that writes y once is future work: measure it against this composition first.)

On CUDA the shrink runs on a side stream, concurrently with the base GEMM: both read only x, and at
decode sizes neither fills the GPU (the small-M GEMM is latency-bound with a few warps per SM, the
shrink is a few MB of adapter reads), so the shrink's time hides under the GEMM's. The expand, which
adds into the GEMM's output, waits for both. Captured in a CUDA graph, the fork and join become two
parallel branches. The ``lora_overlap`` dispatch row turns it off (``INLAID_BACKEND_LORA_OVERLAP=serial``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import nn

from inlaid.kernels import dispatch
from inlaid.kernels.lora import LoraBatchMeta, default_offsets, lora_expand, lora_shrink
from inlaid.kernels.quant_matmul import PreparedQuant, quant_matmul


class DenseLinear:
    """A dense weight [out, in] (+ bias), the base of an fp16 model."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight, self.bias = weight, bias

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]


def base_matmul(x: torch.Tensor, base: PreparedQuant | DenseLinear) -> torch.Tensor:
    if isinstance(base, DenseLinear):
        return torch.nn.functional.linear(x, base.weight, base.bias)
    return quant_matmul(x, base)


class LoraSlots:
    """Adapter weights of one (possibly fused) projection of one layer, in ``max_loras`` slots: views
    into a :class:`LoraBank` (``LoraBank(1, ...).layer(0)`` for a standalone layer)."""

    def __init__(self, slice_widths: Sequence[int], lora_a: list[torch.Tensor], lora_b: list[torch.Tensor],
                 ranks: torch.Tensor, scalings: torch.Tensor):
        self.slice_widths = list(slice_widths)
        self.offsets = default_offsets(self.slice_widths)
        self.lora_a, self.lora_b = lora_a, lora_b  # per slice: [max_loras, max_rank, in], [max_loras, out, max_rank]
        self.ranks, self.scalings = ranks, scalings  # [max_loras]

    @property
    def max_rank(self) -> int:
        return self.lora_a[0].shape[1]

    def load(self, slot: int, pairs: Sequence[tuple[torch.Tensor, torch.Tensor] | None],
             scaling: float) -> None:
        """Put one adapter into ``slot``: per slice (A [r_s, in], B [out_s, r_s]) or None (no LoRA on
        it). Slices of unequal rank (PEFT ``rank_pattern``) run at the largest: the zero rows and
        columns past a slice's own rank add exactly nothing. Everything past the rank is zeroed so a
        later, smaller adapter leaves nothing behind."""
        _fill_slot([a[slot][None] for a in self.lora_a], [b[slot][None] for b in self.lora_b],
                   [None if pair is None else (pair[0][None], pair[1][None]) for pair in pairs])
        self.ranks[slot] = max((pair[0].shape[0] for pair in pairs if pair is not None), default=0)
        self.scalings[slot] = scaling


def _fill_slot(a_dsts: list[torch.Tensor], b_dsts: list[torch.Tensor],
               pairs: Sequence[tuple[torch.Tensor, torch.Tensor] | None]) -> None:
    """Copy per slice A [L, r, in] / B [L, out, r] into one slot's A [L, max_rank, in] / B [L, out,
    max_rank] (L layers, or 1), zeroing what lies past r (None: the whole slice). Copies are async
    from pinned host memory (the engine keeps it alive)."""
    for a_dst, b_dst, pair in zip(a_dsts, b_dsts, pairs):
        rank = 0 if pair is None else pair[0].shape[1]
        if rank > a_dst.shape[1]:
            raise ValueError(f"rank {rank} exceeds max_rank {a_dst.shape[1]}")
        if pair is not None:
            a_dst[:, :rank].copy_(pair[0], non_blocking=True)
            b_dst[:, :, :rank].copy_(pair[1], non_blocking=True)
        if rank < a_dst.shape[1]:
            a_dst[:, rank:].zero_()
            b_dst[:, :, rank:].zero_()


class LoraBank:
    """The slots of one (fused) projection in every layer, one tensor per slice: layer i's
    :class:`LoraSlots` are views (``layer(i)``), and loading an adapter into a slot is a few copies
    for all layers at once (``load``) instead of ~36 small ops per layer: at 32 layers, ~1,150
    launches and copies per adapter, milliseconds of host time, every time a request brings an
    adapter that is not resident."""

    def __init__(self, num_layers: int, in_features: int, slice_widths: Sequence[int], max_loras: int,
                 max_rank: int, device="cpu", dtype=torch.float16):
        self.slice_widths = list(slice_widths)
        self.lora_a = [torch.zeros(num_layers, max_loras, max_rank, in_features, device=device, dtype=dtype)
                       for _ in slice_widths]
        self.lora_b = [torch.zeros(num_layers, max_loras, width, max_rank, device=device, dtype=dtype)
                       for width in slice_widths]
        self.ranks = torch.zeros(num_layers, max_loras, dtype=torch.int32, device=device)
        self.scalings = torch.zeros(num_layers, max_loras, dtype=torch.float32, device=device)

    def layer(self, i: int) -> LoraSlots:
        return LoraSlots(self.slice_widths, [a[i] for a in self.lora_a], [b[i] for b in self.lora_b],
                         self.ranks[i], self.scalings[i])

    def load(self, slot: int, pairs: Sequence[tuple[torch.Tensor, torch.Tensor] | None],
             ranks: torch.Tensor) -> None:
        """One adapter into ``slot`` of every layer: per slice (A [layers, r_s, in], B [layers, out_s,
        r_s]) stacked over layers (zeros where a layer has no LoRA on it) or None, and the rank of
        each layer ([layers] int32: the largest of its slices; the zero rows and columns past a
        slice's own rank add exactly nothing). Scalings are 1 (folded into B). Copies are async from
        pinned host memory; everything past the rank is zeroed."""
        _fill_slot([a[:, slot] for a in self.lora_a], [b[:, slot] for b in self.lora_b], pairs)
        self.ranks[:, slot].copy_(ranks, non_blocking=True)
        self.scalings[:, slot].fill_(1.0)


class QuantLinear(nn.Module):
    def __init__(self, quant: PreparedQuant | DenseLinear, lora: LoraSlots | None = None):
        super().__init__()
        if lora is not None and sum(lora.slice_widths) != quant.out_features:
            raise ValueError(f"LoRA slices {lora.slice_widths} do not cover {quant.out_features} outputs")
        self.quant = quant
        self.lora = lora

    def forward(self, x: torch.Tensor, meta: LoraBatchMeta | None = None) -> torch.Tensor:
        """x [T, in]; ``meta`` groups the T tokens by adapter slot (None: base only)."""
        y, buf = self.base_and_shrink(x, meta)
        if buf is not None:
            lora = self.lora
            lora_expand(buf, lora.lora_b, meta, lora.ranks, y, lora.offsets)
        return y

    def base_and_shrink(self, x: torch.Tensor, meta: LoraBatchMeta | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(base product, the shrink's buffer or None without LoRA): ``forward`` before its expand,
        for a consumer that adds the LoRA update itself (the fused expand + SiLU-and-mul)."""
        lora = self.lora
        if lora is None or meta is None:
            return base_matmul(x, self.quant), None
        if not (x.is_cuda and dispatch.choose("lora_overlap", x.device) == "stream"):
            y = base_matmul(x, self.quant)
            return y, lora_shrink(x, lora.lora_a, meta, lora.ranks, lora.scalings)
        main, side = torch.cuda.current_stream(x.device), _side_stream(x.device)
        # allocated on the main stream, which frees it after the expand: no cross-stream reuse
        buf = torch.empty(len(lora.lora_a), x.shape[0], lora.max_rank, dtype=torch.float32,
                          device=x.device)
        side.wait_stream(main)  # x is ready
        with torch.cuda.stream(side):
            lora_shrink(x, lora.lora_a, meta, lora.ranks, lora.scalings, out=buf)
        y = base_matmul(x, self.quant)
        main.wait_stream(side)
        return y, buf


@functools.lru_cache(maxsize=None)
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)
