"""Adapter manager: every registered adapter lives in host memory; ``max_loras`` device slots hold
the ones a step uses, swapped in least-recently-used order.

Registration reads and validates the PEFT directory once (shape against the base, rank against
``max_lora_rank``) and keeps the weights in host memory in the compute dtype — pinned on CUDA so a
slot load is an async copy. Per-projection scalings (``alpha_pattern``, rsLoRA) are folded into B at
registration: a slot then needs one scaling (1.0) however the projections differ, and the fused q/k/v
and gate/up slices of one adapter may have different ranks (``rank_pattern``; see ``LoraSlots.load``).

The scheduler never plans more adapters in a step than there are slots (``max_loras``), so
:meth:`activate` always finds room: slots of adapters the step does not use are the victims.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch

from inlaid.errors import AdapterError
from inlaid.engine.model import FUSED, CausalLM
from inlaid.model.lora import LoraAdapter, load_adapter, validate_adapter

_Pair = tuple[torch.Tensor, torch.Tensor]


class AdapterManager:
    def __init__(self, model: CausalLM, max_loras: int, max_lora_rank: int):
        self.model = model
        self.max_loras, self.max_lora_rank = max_loras, max_lora_rank
        self._host: dict[str, list[dict[str, list[_Pair | None]]]] = {}  # name -> per layer, per group
        self._info: dict[str, LoraAdapter] = {}
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # LRU order: first = least recent
        self._free_slots = list(range(max_loras))
        self.num_loads = 0  # slot loads (adapter swaps) since start

    # --- registry -------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._host)

    def __contains__(self, name: str) -> bool:
        return name in self._host

    def info(self, name: str) -> LoraAdapter:
        return self._info[name]

    def register(self, name: str, path: Path | str) -> LoraAdapter:
        """Read, validate and keep an adapter; replaces one of the same name (its slot is dropped)."""
        adapter = load_adapter(Path(path), name)
        self.register_weights([name], adapter)
        adapter.weights = {}  # the host copy is what serves; keep only the metadata
        return adapter

    def register_weights(self, names: list[str], adapter: LoraAdapter) -> None:
        """Register an adapter already in memory under one or more names. The names share one host
        copy (the dummy models' many adapters); each still gets its own device slot when used."""
        if self.max_loras < 1:
            raise AdapterError(f"adapter {names[0]!r}: the engine was started with max_loras=0")
        validate_adapter(adapter, self.model.config)
        if adapter.max_rank > self.max_lora_rank:
            raise AdapterError(f"adapter {names[0]!r}: rank {adapter.max_rank} exceeds max_lora_rank "
                               f"{self.max_lora_rank} (raise --max-lora-rank)")
        host = self._host_weights(adapter)
        for name in names:
            self._host[name], self._info[name] = host, adapter
            self._drop_slot(name)

    def unregister(self, name: str) -> None:
        if name not in self._host:
            raise AdapterError(f"adapter {name!r} is not registered")
        del self._host[name], self._info[name]
        self._drop_slot(name)

    def _host_weights(self, adapter: LoraAdapter) -> list[dict[str, list[_Pair | None]]]:
        pin = self.model.device.type == "cuda"
        dtype = self.model.dtype
        layers = []
        for i in range(self.model.shape.num_layers):
            per_layer = adapter.for_layer(i)
            groups = {}
            for group, projs in FUSED.items():
                pairs: list[_Pair | None] = []
                for proj in projs:
                    w = per_layer.get(proj)
                    if w is None:
                        pairs.append(None)
                        continue
                    a = w.a.to(dtype)
                    b = (w.b.double() * w.scaling).to(dtype)  # scaling folded in; see module doc
                    pairs.append((a.pin_memory(), b.pin_memory()) if pin else (a, b))
                groups[group] = pairs
            layers.append(groups)
        return layers

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
            if not self._free_slots:
                victim = next(n for n in self._slot_of if n not in names)
                self._drop_slot(victim)
            slot = self._free_slots.pop()
            self._load(name, slot)
            self._slot_of[name] = slot
        return {n: self._slot_of[n] for n in names}

    def _load(self, name: str, slot: int) -> None:
        for groups, slots in zip(self._host[name], self.model.lora_slots):
            for group, pairs in groups.items():
                slots[group].load(slot, pairs, 1.0)
        self.num_loads += 1
