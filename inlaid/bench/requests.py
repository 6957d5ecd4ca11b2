"""From workload requests to what a target is sent: prompt token ids of the exact input length, and
the target's adapter names for the workload's adapter names.

Prompts are random token ids in [3, 259): byte tokens under the dummy models' tokenizer and valid ids
in any real vocabulary of at least 259 tokens, so every target (engine, server, HF) gets the very
same prompts. Each request's ids come from its own seeded stream, so prompts share no prefix and the
prefix cache cannot shorten a benchmark.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from inlaid.bench.workload import LengthRange, Request, WorkloadSpec, generate, read_trace
from inlaid.errors import ConfigError

PROMPT_TOKEN_RANGE = (3, 259)


@dataclass(frozen=True)
class Workload:
    """Requests in arrival order, the adapter names they use (most popular first for generated
    workloads) and a flat description of how they were made (for result files and plots)."""

    requests: list[Request]
    adapter_names: list[str]
    params: dict = field(default_factory=dict)

    @classmethod
    def of(cls, requests: Sequence[Request], adapter_names: Sequence[str] | None = None,
           **params) -> Workload:
        if not requests:
            raise ConfigError("the workload has no requests")
        names = list(adapter_names) if adapter_names is not None else list(dict.fromkeys(r.adapter for r in requests))
        missing = {r.adapter for r in requests} - set(names)
        if missing:
            raise ConfigError(f"requests use adapters outside the workload's list: {sorted(missing)[:5]}")
        return cls(list(requests), names, {"num_requests": len(requests), "num_adapters": len(names), **params})


def spec_params(spec: WorkloadSpec) -> dict:
    """The spec as flat, JSON-ready values (lengths as "low:high", tasks by name)."""
    def span(r: LengthRange) -> str:
        return f"{r.low}:{r.high}"

    return {"pattern": spec.pattern, "alpha": spec.alpha, "batch_size": spec.batch_size, "arrival": spec.arrival,
            "rate": spec.rate, "cv": spec.cv, "seed": spec.seed, "input_len": span(spec.lengths.input),
            "output_len": span(spec.lengths.output),
            "tasks": {name: [span(p.input), span(p.output)] for name, p in spec.task_lengths.items()}
            if spec.task_lengths else None}


def workload_from_spec(spec: WorkloadSpec, **params) -> Workload:
    return Workload.of(generate(spec), spec.adapter_names(), **spec_params(spec), **params)


def workload_from_trace(path: str | Path, **params) -> Workload:
    return Workload.of(read_trace(path), None, trace=str(path), pattern="trace", **params)


def prompt_ids(request: Request, seed: int = 0) -> list[int]:
    """``request.input_len`` token ids, the same for a given (seed, request id) on every target."""
    rng = random.Random(f"{seed}:prompt:{request.request_id}")
    low, high = PROMPT_TOKEN_RANGE
    return [rng.randrange(low, high) for _ in range(request.input_len)]


def natural_key(name: str) -> list:
    """'dummy-10' sorts after 'dummy-9'."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def map_adapters(workload_names: Sequence[str], available: Sequence[str]) -> dict[str, str]:
    """Workload name -> target adapter name: itself when the target has every workload name,
    otherwise the i-th workload adapter gets the i-th available adapter in natural order (so a
    power-law workload's most popular adapter is the target's first)."""
    if set(workload_names) <= set(available):
        return {name: name for name in workload_names}
    ordered = sorted(available, key=natural_key)
    if len(ordered) < len(workload_names):
        raise ConfigError(f"the workload uses {len(workload_names)} adapters but the target serves "
                          f"{len(ordered)} ({', '.join(ordered[:5])}{', ...' if len(ordered) > 5 else ''}) "
                          "and not under the workload's names")
    return dict(zip(workload_names, ordered))
