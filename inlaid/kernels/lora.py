"""Multi-LoRA shrink/expand (SGMV): many adapters in one batch, tokens grouped by adapter slot.

Layout. Adapters live in ``max_loras`` GPU slots. A layer has 1 to 3 output slices (o_proj: 1; fused
q/k/v: 3 of unequal widths under GQA; gate/up: 2). Per slice s:

- ``lora_a[s]``: [max_loras, max_rank, in_features], fp16/bf16
- ``lora_b[s]``: [max_loras, out_s, max_rank], same dtype
- ``ranks``: int32 [max_loras], real rank per slot (A rows at or past it are never read, nor B
  columns past its multiple of 8, so time scales with real ranks; B columns between the rank and
  that multiple must be finite: they meet zeros, ``inlaid.kernels.triton.rank_mask``);
  ``scalings``: float32 [max_loras].

Per step, ``token_slot`` int32 [T] names each token's slot (−1: no adapter). :class:`LoraBatchMeta`
groups tokens by slot into preallocated buffers: on the host from a list (``prepare_host``, what the
engine does: one copy, no kernel), or on the device from a tensor without host synchronisation
(``prepare``: torch ops a CUDA graph can capture).

``lora_shrink`` returns ``buf`` [num_slices, T, max_rank] in fp32 (float64 for float64 inputs):
``buf[s, t, :r] = scaling[slot] * x[t] @ lora_a[s][slot, :r].T`` with r = ranks[slot]; every other
entry (tokens without an adapter, columns ≥ r) is 0. ``lora_expand`` adds
``buf[s, t, :r] @ lora_b[s][slot, :, :r].T`` into ``y[t, off_s:off_s + out_s]`` in place; rows of
tokens without an adapter are left bit-identical.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from inlaid.kernels import dispatch
from inlaid.kernels.transfer import to_device

MAX_SLICES = 3  # fused q/k/v; the Triton kernels take one pointer per slice


class LoraBatchMeta:
    """Per-step grouping of tokens by adapter slot, in buffers sized once by (max_tokens, max_loras).

    After ``prepare(token_slot)`` (group g = g-th active slot, in ascending slot order):

    - ``sorted_token_ids`` int32 [max_tokens]: token ids grouped by slot, ascending within a group
      (stable); tokens without an adapter, and ids T..max_tokens-1, come last.
    - ``active_slots`` int32 [max_loras]: slot of group g, −1 past the last group.
    - ``num_tokens`` int32 [max_loras]: tokens in group g (0 past the last group).
    - ``token_start`` int32 [max_loras]: where group g starts in ``sorted_token_ids`` (0 past the last).
    - ``num_tokens_total``: T of the last ``prepare`` (a host int, fixed by the input's shape).
    - ``slot_of_token`` int32 [max_tokens]: token t's slot, ``max_loras`` for none (and past T): for
      kernels that take one token per program.

    The kernels walk token tiles: each group cut into tiles of ``block_m`` tokens, listed group after
    group. ``tile_slot`` (−1 past the last tile), ``tile_start`` (into ``sorted_token_ids``) and
    ``tile_rows`` (1..block_m; 0 past the last), int32 [max_tiles]. A grid over ``tile_bound(T)``
    tiles covers any grouping: sum over groups of ceil(count / block_m) <= min(T, ceil(T / block_m)
    + min(max_loras, T)). (A grid over token tiles x groups would launch the product instead: most of
    it programs that only find out they have nothing to do.)

    All of them are views of one int32 buffer, so that :meth:`prepare_host` fills them with one
    host-to-device copy. The engine groups each step's tokens that way: the host knows every
    token's slot anyway, and grouping them on the device took dozens of small dependent kernels
    (two sorts, two searchsorted, masks and gathers) at the head of every decode step.
    """

    def __init__(self, max_tokens: int, max_loras: int, device: torch.device | str = "cpu",
                 block_m: int = 16):
        if max_tokens < 1 or max_loras < 1 or block_m < 1 or block_m & (block_m - 1):
            raise ValueError(f"max_tokens, max_loras >= 1 and block_m a power of 2 needed, got "
                             f"{max_tokens}, {max_loras}, {block_m}")
        self.max_tokens, self.max_loras, self.block_m = max_tokens, max_loras, block_m
        max_tiles = self.tile_bound(max_tokens)
        self._sizes = (max_tokens, max_tokens, max_loras, max_loras, max_loras, max_tiles, max_tiles, max_tiles)
        self._packed = torch.zeros(sum(self._sizes), dtype=torch.int32, device=device)
        self.device = self._packed.device  # "cuda" resolved to "cuda:0": compares equal to x's
        (self.sorted_token_ids, self.slot_of_token, self.active_slots, self.num_tokens, self.token_start,
         self.tile_slot, self.tile_start, self.tile_rows) = self._packed.split(self._sizes)
        self.active_slots.fill_(-1)
        self.tile_slot.fill_(-1)
        self.num_tokens_total = 0
        # Group boundaries: searchsorted of 0..max_loras in the sorted keys (absent key = max_loras).
        self._bounds_query = torch.arange(max_loras + 1, dtype=torch.int32, device=self.device)
        self._tile_index = torch.arange(max_tiles, dtype=torch.int64, device=self.device)

    def tile_bound(self, num_tokens: int) -> int:
        """Most tiles any grouping of ``num_tokens`` tokens can need (each tile holds >= 1 token)."""
        return min(num_tokens, -(-num_tokens // self.block_m) + min(self.max_loras, num_tokens))

    def prepare(self, token_slot: torch.Tensor) -> LoraBatchMeta:
        """Fill the buffers in place from ``token_slot`` int [T], T <= max_tokens. Torch ops only:
        no ``.item()``, no data-dependent shapes, so it can be captured in a CUDA graph. Slot ids
        outside [0, max_loras) count as −1 (checking them would need a host sync)."""
        num = token_slot.shape[0]
        if token_slot.dim() != 1 or num > self.max_tokens:
            raise ValueError(f"token_slot must be 1-D with at most {self.max_tokens} entries, "
                             f"got shape {tuple(token_slot.shape)}")
        if token_slot.dtype.is_floating_point or token_slot.device != self.device:
            raise ValueError(f"token_slot must be an integer tensor on {self.device}")
        absent = self.max_loras  # sorts after every real slot
        key = self.slot_of_token
        key.fill_(absent)
        key[:num].copy_(token_slot)
        key.masked_fill_((key < 0) | (key >= self.max_loras), absent)
        sorted_key, order = torch.sort(key, stable=True)
        self.sorted_token_ids.copy_(order)
        bounds = torch.searchsorted(sorted_key, self._bounds_query)
        counts, starts = bounds[1:] - bounds[:-1], bounds[:-1]
        # Compact active slots to the front, keeping ascending slot order (stable sort on "inactive").
        is_active = counts > 0
        slot_order = torch.sort((~is_active).to(torch.int32), stable=True).indices
        active = is_active[slot_order]
        self.active_slots.copy_(torch.where(active, slot_order, -1))
        self.num_tokens.copy_(counts[slot_order])
        self.token_start.copy_(torch.where(active, starts[slot_order], 0))
        self.num_tokens_total = num
        self._fill_tiles(counts[slot_order])
        return self

    def prepare_host(self, token_slot: Sequence[int]) -> LoraBatchMeta:
        """:meth:`prepare` of ``token_slot`` given on the host: the same buffer contents, computed
        here and written with one copy that does not wait for the GPU (``transfer.to_device``:
        queued behind the work that may still read the last step's values)."""
        to_device(self.host_values(token_slot), torch.int32, self.device, out=self._packed)
        self.num_tokens_total = len(token_slot)
        return self

    def host_values(self, token_slot: Sequence[int]) -> np.ndarray:
        """The packed buffer as :meth:`prepare` leaves it for ``token_slot`` (numpy int32)."""
        num, loras, block_m = len(token_slot), self.max_loras, self.block_m
        if num > self.max_tokens:
            raise ValueError(f"token_slot must have at most {self.max_tokens} entries, got {num}")
        key = np.full(self.max_tokens, loras, dtype=np.int64)  # absent: sorts after every real slot
        given = np.asarray(token_slot, dtype=np.int64).reshape(num)
        key[:num] = np.where((given >= 0) & (given < loras), given, loras)
        counts = np.bincount(key, minlength=loras + 1)[:loras]
        starts = np.cumsum(counts) - counts
        active = np.flatnonzero(counts)  # ascending slots, the groups' order
        groups = np.zeros((3, loras), dtype=np.int64)  # active_slots, num_tokens, token_start
        groups[0].fill(-1)
        groups[:, :active.size] = active, counts[active], starts[active]
        tiles = np.zeros((3, self._sizes[-1]), dtype=np.int64)  # tile_slot, tile_start, tile_rows
        tiles[0].fill(-1)
        per_group = -(-counts[active] // block_m)
        group = np.repeat(np.arange(active.size), per_group)  # each tile's group, in order
        first_row = (np.arange(group.size) - (np.cumsum(per_group) - per_group)[group]) * block_m
        tiles[:, :group.size] = (active[group], starts[active][group] + first_row,
                                 np.minimum(counts[active][group] - first_row, block_m))
        return np.concatenate([np.argsort(key, kind="stable"), key, groups.ravel(), tiles.ravel()]).astype(np.int32)

    def _fill_tiles(self, counts: torch.Tensor) -> None:
        """Tile i belongs to the group whose running tile count first exceeds i."""
        tiles = (counts + self.block_m - 1) // self.block_m  # per group, 0 for inactive ones
        tile_end = torch.cumsum(tiles, 0)
        group = torch.searchsorted(tile_end, self._tile_index, right=True)
        valid = group < self.max_loras
        group.clamp_(max=self.max_loras - 1)
        first_row = (self._tile_index - (tile_end[group] - tiles[group])) * self.block_m
        self.tile_slot.copy_(torch.where(valid, self.active_slots[group], -1))
        self.tile_start.copy_(torch.where(valid, self.token_start[group] + first_row, 0))
        rows = torch.clamp(counts[group] - first_row, max=self.block_m)
        self.tile_rows.copy_(torch.where(valid, rows, 0))

    def groups(self) -> list[tuple[int, torch.Tensor]]:
        """(slot, token ids as int64) per active group. Syncs with the host: for references and tests."""
        out = []
        for slot, count, start in zip(self.active_slots.tolist(), self.num_tokens.tolist(),
                                      self.token_start.tolist()):
            if slot < 0:
                break
            out.append((slot, self.sorted_token_ids[start:start + count].long()))
        return out


def check_step(meta: LoraBatchMeta, ranks: torch.Tensor, num_tokens: int, num_loras: int,
               device: torch.device, scalings: torch.Tensor | None = None) -> None:
    """Shape/dtype/device checks shared by the launchers (no values read: no host sync)."""
    if meta.device != device or meta.max_loras != num_loras or meta.num_tokens_total != num_tokens:
        raise ValueError(f"meta (device {meta.device}, max_loras {meta.max_loras}, prepared for "
                         f"{meta.num_tokens_total} tokens) does not match the inputs (device {device}, "
                         f"{num_loras} slots, {num_tokens} tokens)")
    for name, t, dtype in (("ranks", ranks, torch.int32), ("scalings", scalings, torch.float32)):
        if t is not None and (t.shape != (num_loras,) or t.dtype != dtype or t.device != device
                              or not t.is_contiguous()):
            raise ValueError(f"{name} must be contiguous {dtype} [{num_loras}] on {device}, got {t.dtype} "
                             f"{tuple(t.shape)} on {t.device}")


def default_offsets(widths: Sequence[int]) -> list[int]:
    """Slices packed back to back from column 0."""
    offsets, at = [], 0
    for width in widths:
        offsets.append(at)
        at += width
    return offsets


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def lora_shrink_ref(x: torch.Tensor, lora_a: Sequence[torch.Tensor], meta: LoraBatchMeta,
                    ranks: torch.Tensor, scalings: torch.Tensor,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Torch reference of :func:`lora_shrink` (a loop over active slots; CPU or GPU). The slot's
    scaling is applied here, in shrink, so expand is a plain product."""
    num_slices, (_, max_rank, _) = len(lora_a), lora_a[0].shape
    acc = _acc_dtype(x)
    if out is None:
        out = torch.empty(num_slices, x.shape[0], max_rank, dtype=acc, device=x.device)
    out.zero_()
    rank_of, scale_of = ranks.tolist(), scalings.tolist()
    for slot, ids in meta.groups():
        r = rank_of[slot]
        xs = x[ids].to(acc)
        for s, a in enumerate(lora_a):
            out[s, ids, :r] = scale_of[slot] * (xs @ a[slot, :r].to(acc).T)
    return out


def lora_expand_ref(buf: torch.Tensor, lora_b: Sequence[torch.Tensor], meta: LoraBatchMeta,
                    ranks: torch.Tensor, y: torch.Tensor,
                    slice_offsets: Sequence[int] | None = None) -> torch.Tensor:
    """Torch reference of :func:`lora_expand`: adds into ``y`` in place (sum in the buf's precision,
    one rounding to y's dtype, as the kernel does) and returns it."""
    offsets = default_offsets([b.shape[1] for b in lora_b]) if slice_offsets is None else slice_offsets
    rank_of = ranks.tolist()
    for slot, ids in meta.groups():
        r = rank_of[slot]
        for s, (b, off) in enumerate(zip(lora_b, offsets)):
            cols = slice(off, off + b.shape[1])
            delta = buf[s, ids, :r] @ b[slot, :, :r].to(buf.dtype).T
            y[ids, cols] = (y[ids, cols].to(buf.dtype) + delta).to(y.dtype)
    return y


def lora_apply_ref(x: torch.Tensor, y: torch.Tensor, lora_a: Sequence[torch.Tensor],
                   lora_b: Sequence[torch.Tensor], token_slot: torch.Tensor, ranks: torch.Tensor,
                   scalings: torch.Tensor, slice_offsets: Sequence[int] | None = None) -> torch.Tensor:
    """Oracle: a per-token loop in x's dtype (use float64), independent of the grouping metadata.
    Returns a new tensor ``y + delta``; ``y`` is not modified."""
    offsets = default_offsets([b.shape[1] for b in lora_b]) if slice_offsets is None else slice_offsets
    out = y.clone()
    for t, slot in enumerate(token_slot.tolist()):
        if slot < 0:
            continue
        r, scale = int(ranks[slot]), float(scalings[slot])
        for a, b, off in zip(lora_a, lora_b, offsets):
            hidden = scale * (a[slot, :r].to(x.dtype) @ x[t])
            out[t, off:off + b.shape[1]] += (b[slot, :, :r].to(x.dtype) @ hidden).to(y.dtype)
    return out


def lora_backend(x: torch.Tensor, backend: str | None = None) -> str:
    """The forced backend, else the dispatch table's choice (Triton kernels take fp16/bf16 only):
    what the kernels that read LoRA weights run on for activations like ``x``."""
    if backend is None:
        backend = dispatch.choose("lora", x.device)
        if x.dtype not in (torch.float16, torch.bfloat16):
            backend = "ref"
    if backend not in ("ref", "triton"):
        raise ValueError(f"unknown lora backend {backend!r} (expected 'ref' or 'triton')")
    return backend


def lora_shrink(x: torch.Tensor, lora_a: Sequence[torch.Tensor], meta: LoraBatchMeta,
                ranks: torch.Tensor, scalings: torch.Tensor, *, out: torch.Tensor | None = None,
                backend: str | None = None) -> torch.Tensor:
    """buf[s, t, :r] = scaling[slot] * x[t] @ lora_a[s][slot, :r].T, zeros elsewhere.

    x [T, in]; lora_a: one [max_loras, max_rank, in] per slice; returns (or fills ``out``)
    [num_slices, T, max_rank] fp32. The scaling is applied here, not in expand."""
    if lora_backend(x, backend) == "triton":
        from inlaid.kernels.triton.lora_shrink import lora_shrink_triton
        return lora_shrink_triton(x, lora_a, meta, ranks, scalings, out=out)
    return lora_shrink_ref(x, lora_a, meta, ranks, scalings, out=out)


def lora_expand(buf: torch.Tensor, lora_b: Sequence[torch.Tensor], meta: LoraBatchMeta,
                ranks: torch.Tensor, y: torch.Tensor, slice_offsets: Sequence[int] | None = None, *,
                backend: str | None = None) -> torch.Tensor:
    """y[t, off_s:off_s + out_s] += buf[s, t, :r] @ lora_b[s][slot, :, :r].T in place; returns y.

    buf [num_slices, T, max_rank] from :func:`lora_shrink`; lora_b: one [max_loras, out_s, max_rank]
    per slice; y [T, >= max(off_s + out_s)]; slice_offsets default to back-to-back from 0."""
    if lora_backend(y, backend) == "triton":
        from inlaid.kernels.triton.lora_expand import lora_expand_triton
        return lora_expand_triton(buf, lora_b, meta, ranks, y, slice_offsets)
    return lora_expand_ref(buf, lora_b, meta, ranks, y, slice_offsets)
