"""Host cost of loading one adapter into a device slot: tensor ops issued and time per load.

    python scripts/bench_adapter_load.py [--layers 32] [--loads 50]

Every op of a slot load is a kernel launch or a host-to-device copy on the GPU, issued from the
host thread that also runs the engine's steps: a request whose adapter is not resident pays for
them before (or, with prefetch, between) steps. This counts the ATen ops of one load
(``AdapterManager._copy``) with a dispatch-mode counter, which is independent of the device, and
times loads on the CPU with a dummy model of tiny layers (so that the per-op overhead, not the
bytes, is what is timed). Rank 16 on all seven projections.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--loads", type=int, default=50)
    args = parser.parse_args()

    from inlaid.engine.llm_engine import EngineConfig, LLMEngine

    engine = LLMEngine(EngineConfig(model="dummy:tiny", device="cpu", dummy_bits=None,
                                    dummy_layers=args.layers, dummy_adapters=2, dummy_rank=16,
                                    max_loras=2, max_lora_rank=16))
    manager = engine.adapters
    names = manager.names[:2]
    with CountOps() as counter:
        manager._copy(names[0], 0)
    kinds = ", ".join(f"{name} {n}" for name, n in counter.ops.most_common())
    start = time.perf_counter()
    for i in range(args.loads):
        manager._copy(names[i % 2], i % 2)
    ms = (time.perf_counter() - start) / args.loads * 1e3
    print(f"{args.layers} layers: {sum(counter.ops.values())} tensor ops per adapter load ({kinds}); "
          f"{ms:.2f} ms per load on this CPU")


if __name__ == "__main__":
    main()
