"""Adapter manager: every registered adapter lives in host memory; ``max_loras`` device slots hold
the ones a step uses, swapped in least-recently-used order.

Registration reads and validates the PEFT directory once (shape against the base, rank against
``max_lora_rank``) and keeps the weights in host memory in the compute dtype — pinned on CUDA so a
slot load is an async copy. Per-projection scalings (``alpha_pattern``, rsLoRA) are folded into B at
registration: a slot then needs one scaling (1.0) however the projections differ, and the fused q/k/v
and gate/up slices of one adapter may have different ranks (``rank_pattern``; see ``LoraSlots.load``).

The scheduler never plans more adapters in a step than there are slots (``max_loras``), so
:meth:`activate` always finds room: slots of adapters the step does not use are the victims.

Prefetch: between steps the engine names the adapters of the requests that will be admitted next
(:meth:`prefetch`); those not resident are loaded into free slots, or into the least recently used
slots of adapters that no running request holds. On CUDA the copies run on a side stream and
overlap the next step's compute; a step that uses a prefetched slot (or a load that overwrites
one) first makes its stream wait for that copy's event. So a request's first step finds its
adapter resident instead of loading it on the critical path.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from inlaid.errors import AdapterError
from inlaid.engine.model import FUSED, CausalLM
from inlaid.model.lora import LoraAdapter, load_adapter, validate_adapter

_Pair = tuple[torch.Tensor, torch.Tensor]


@dataclass
class _Stacked:
    pairs: list[_Pair | None]  # per slice: A [layers, r, in], B [layers, out, r] (zeros: no LoRA there)
    ranks: torch.Tensor  # int32 [layers]: each layer's rank (largest of its slices)


@dataclass(frozen=True)
class PreparedAdapter:
    """An adapter read, checked and copied for the host side of the slots, not yet registered."""

    adapter: LoraAdapter  # metadata only: its weights are dropped once ``host`` holds them
    host: dict[str, _Stacked]


MAX_ADAPTER_NAME = 256


def check_adapter_name(name: object) -> None:
    """An adapter's name is what clients send as ``model``: refuse names that cannot be typed back
    reliably (edge whitespace, control characters) or are absurdly long."""
    if not isinstance(name, str) or not name or len(name) > MAX_ADAPTER_NAME or name != name.strip() \
            or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise AdapterError(f"adapter name {str(name)[:80]!r}: use 1-{MAX_ADAPTER_NAME} printable characters, "
                           "without leading or trailing whitespace")


class AdapterManager:
    def __init__(self, model: CausalLM, max_loras: int, max_lora_rank: int):
        self.model = model
        self.max_loras, self.max_lora_rank = max_loras, max_lora_rank
        self._host: dict[str, dict[str, _Stacked]] = {}  # name -> per fused group
        self._info: dict[str, LoraAdapter] = {}
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # LRU order: first = least recent
        self._free_slots = list(range(max_loras))
        self.num_loads = 0  # slot loads (adapter swaps) since start, prefetches included
        self.num_prefetches = 0  # loads done ahead of the step that needs them
        self._pending: dict[int, torch.cuda.Event] = {}  # slot -> its prefetch copy's event (CUDA)
        self._copy_stream = torch.cuda.Stream(model.device) if model.device.type == "cuda" else None

    # --- registry -------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._host)

    def __contains__(self, name: str) -> bool:
        return name in self._host

    def info(self, name: str) -> LoraAdapter:
        return self._info[name]

    def register(self, name: str, source: Path | str | PreparedAdapter) -> LoraAdapter:
        """Keep an adapter (read from ``source`` and checked, or already :meth:`prepare`-d); replaces
        one of the same name (its slot is dropped)."""
        prepared = source if isinstance(source, PreparedAdapter) else self.prepare(name, source)
        self._install([name], prepared)
        return prepared.adapter

    def prepare(self, name: str, source: Path | str | LoraAdapter) -> PreparedAdapter:
        """The slow part of registering: read ``source`` (a directory), check it against this
        engine and build its host copy. Touches no registry state, only what never changes after
        start-up, so the server runs it off the engine thread and requests keep being served."""
        check_adapter_name(name)
        adapter = source if isinstance(source, LoraAdapter) else load_adapter(Path(source), name)
        self.check(name, adapter)
        prepared = PreparedAdapter(adapter, self._host_weights(adapter))
        adapter.drop_weights()  # the host copy is what serves; keep only the metadata
        return prepared

    def check(self, name: str, adapter: LoraAdapter) -> None:
        """Raise AdapterError unless ``adapter`` can serve on this engine: what registering checks,
        without registering (reads only what never changes after start-up)."""
        if self.max_loras < 1:
            raise AdapterError(f"adapter {name!r}: the engine was started with max_loras=0")
        validate_adapter(adapter, self.model.config)
        if adapter.max_rank > self.max_lora_rank:
            raise AdapterError(f"adapter {name!r}: rank {adapter.max_rank} exceeds max_lora_rank "
                               f"{self.max_lora_rank} (raise --max-lora-rank)")

    def register_weights(self, names: list[str], adapter: LoraAdapter) -> None:
        """Register an adapter already in memory under one or more names. The names share one host
        copy (the dummy models' many adapters); each still gets its own device slot when used."""
        self._install(names, self.prepare(names[0], adapter))

    def _install(self, names: list[str], prepared: PreparedAdapter) -> None:
        for name in names:
            check_adapter_name(name)
            self._host[name], self._info[name] = prepared.host, prepared.adapter
            self._drop_slot(name)

    def unregister(self, name: str) -> None:
        if name not in self._host:
            raise AdapterError(f"adapter {name!r} is not registered")
        del self._host[name], self._info[name]
        self._drop_slot(name)

    def _host_weights(self, adapter: LoraAdapter) -> dict[str, _Stacked]:
        """Per fused group: each slice's A and B stacked over layers (what ``LoraBank.load`` copies in
        one go) and each layer's rank, in the compute dtype, pinned on CUDA."""
        pin = self.model.device.type == "cuda"
        dtype = self.model.dtype
        per_layer = [adapter.for_layer(i) for i in range(self.model.shape.num_layers)]
        host = {}
        for group, projs in FUSED.items():
            pairs: list[_Pair | None] = []
            ranks = torch.zeros(len(per_layer), dtype=torch.int32)
            for proj in projs:
                present = [(i, layer[proj]) for i, layer in enumerate(per_layer) if proj in layer]
                if not present:
                    pairs.append(None)
                    continue
                rank = max(w.a.shape[0] for _, w in present)
                out_f, in_f = present[0][1].b.shape[0], present[0][1].a.shape[1]
                a = torch.zeros(len(per_layer), rank, in_f, dtype=dtype)
                b = torch.zeros(len(per_layer), out_f, rank, dtype=dtype)
                for i, w in present:
                    r = w.a.shape[0]
                    a[i, :r] = w.a.to(dtype)
                    b[i, :, :r] = (w.b.double() * w.scaling).to(dtype)  # scaling folded in; see module doc
                    ranks[i] = max(int(ranks[i]), r)
                pairs.append((a.pin_memory(), b.pin_memory()) if pin else (a, b))
            host[group] = _Stacked(pairs, ranks.pin_memory() if pin else ranks)
        return host

    # --- device slots ---------------------------------------------------------------------------
    def _drop_slot(self, name: str) -> None:
        slot = self._slot_of.pop(name, None)
        if slot is not None:
            self._free_slots.append(slot)

    def slot_of(self, name: str) -> int | None:
        return self._slot_of.get(name)

    def activate(self, names: set[str]) -> dict[str, int]:
        """Make every adapter in ``names`` resident; returns name -> slot."""
        unknown = [n for n in names if n not in self._host]
        if unknown:
            raise AdapterError(f"adapter(s) not registered: {', '.join(sorted(unknown))}")
        if len(names) > self.max_loras:
            raise AdapterError(f"a step needs {len(names)} adapters, the engine has {self.max_loras} "
                               "slots (the scheduler's max_loras must not exceed the engine's)")
        for name in names:
            if name in self._slot_of:
                self._slot_of.move_to_end(name)
        for name in sorted(n for n in names if n not in self._slot_of):
            self._load(name, self._take_slot(names))
        slots = {n: self._slot_of[n] for n in names}
        for slot in slots.values():
            self._wait(slot)
        return slots

    def prefetch(self, names: list[str], keep: set[str]) -> int:
        """Load the adapters in ``names`` (most urgent first) that are not resident, while there is a
        free slot or one whose adapter is not in ``keep`` (the adapters of running requests, which
        the next step needs). Returns how many were loaded."""
        loaded = 0
        protected = set(keep)
        for name in names:
            if name in protected or name not in self._host:
                continue
            protected.add(name)
            if name in self._slot_of:
                continue
            if not self._free_slots and all(n in protected for n in self._slot_of):
                break
            slot = self._take_slot(protected)
            self._load(name, slot, ahead=True)
            loaded += 1
        return loaded

    def _take_slot(self, needed) -> int:
        """A free slot, else the least recently used one whose adapter is not in ``needed``."""
        if not self._free_slots:
            victim = next(n for n in self._slot_of if n not in needed)
            self._drop_slot(victim)
        return self._free_slots.pop()

    def _wait(self, slot: int) -> None:
        event = self._pending.pop(slot, None)
        if event is not None:
            torch.cuda.current_stream(self.model.device).wait_event(event)

    def _load(self, name: str, slot: int, ahead: bool = False) -> None:
        self._wait(slot)  # an earlier prefetch into this slot must land before it is overwritten
        stream = self._copy_stream if ahead else None
        if stream is None:
            self._copy(name, slot)
        else:
            # The slot's last readers ran on the compute stream; the copy waits for them.
            stream.wait_stream(torch.cuda.current_stream(self.model.device))
            with torch.cuda.stream(stream):
                self._copy(name, slot)
                self._pending[slot] = torch.cuda.Event()
                self._pending[slot].record(stream)
        self._slot_of[name] = slot
        self.num_loads += 1
        self.num_prefetches += ahead

    def _copy(self, name: str, slot: int) -> None:
        for group, bank in self.model.lora_banks.items():
            stacked = self._host[name][group]
            bank.load(slot, stacked.pairs, stacked.ranks)
