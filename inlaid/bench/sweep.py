"""The three result shapes, each a grid of runs (main + baselines at every point):

1. ``adapters``: throughput vs the number of adapters (1, 10, 100, 1000), power-law popularity;
2. ``rates``: SLO attainment and JCT vs the arrival rate (multi-task lengths; ``inlaid`` vs ``fcfs``);
3. ``batch``: prefill / decode / end-to-end latency for the distinct / uniform / identical patterns at
   batch 1, 8, 32, 64 (all requests at once, one batch, fixed lengths; decode roofline fraction).

Each result's ``params["sweep"]`` names the coordinates that tell its points apart (tables and plots
group and label by them). Every point uses the same seed, so only the swept quantity changes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from inlaid.bench.requests import workload_from_spec
from inlaid.bench.results import RunResult
from inlaid.bench.runner import BenchConfig, OnResult, Progress, run_all
from inlaid.bench.workload import LengthProfile, LengthRange, WorkloadSpec, uniform_group_size
from inlaid.errors import ConfigError

BATCH_PATTERNS = ("distinct", "uniform", "identical")

ADAPTERS_COLUMNS = ("output_tok_per_sec", "req_per_sec", "latency_mean_s", "ttft_p50_s", "adapters_per_step_mean",
                    "adapter_swaps", "num_failed")
RATES_COLUMNS = ("slo_attainment", "latency_mean_s", "latency_p90_s", "ttft_p90_s", "output_tok_per_sec",
                 "predictor_mae_tokens", "num_failed")
BATCH_COLUMNS = ("prefill_step_mean_s", "decode_step_mean_s", "latency_mean_s", "decode_roofline_fraction",
                 "output_tok_per_sec")
COLUMNS = {"adapters": (ADAPTERS_COLUMNS, ("output_tok_per_sec",)),
           "rates": (RATES_COLUMNS, ("slo_attainment", "latency_mean_s")),
           "batch": (BATCH_COLUMNS, ("prefill_step_mean_s", "decode_step_mean_s", "latency_mean_s"))}


def _point_progress(progress: Progress | None, point: str) -> Progress | None:
    if progress is None:
        return None
    return lambda variant, done, total: progress(f"{variant} {point}", done, total)


def sweep_adapters(config: BenchConfig, spec: WorkloadSpec, counts: Sequence[int],
                   progress: Progress | None = None, on_result: OnResult | None = None) -> list[RunResult]:
    """Result shape 1: the same requests over 1, 10, 100, ... adapters."""
    if not counts or min(counts) < 1:
        raise ConfigError("--counts needs adapter counts >= 1")
    if spec.task_lengths is not None:
        raise ConfigError("sweep adapters sets the number of adapters: per-task lengths (--tasks) do not apply")
    results = []
    for count in counts:
        point = dataclasses.replace(spec, num_adapters=count)
        # Device slots grow with the adapters in use (up to one per running request), as S-LoRA's
        # unified memory does: with a fixed 8 slots, many adapters would only measure the slot cap.
        e = config.engine
        engine = dataclasses.replace(e, max_loras=max(e.max_loras, min(count, e.max_num_seqs)),
                                     max_tasks_per_step=max(e.max_tasks_per_step, min(count, e.max_num_seqs)))
        results += run_all(dataclasses.replace(config, engine=engine), workload_from_spec(point),
                           _point_progress(progress, f"adapters={count}"), {"sweep": ["num_adapters"]}, on_result)
    return results


def sweep_rates(config: BenchConfig, spec: WorkloadSpec, rates: Sequence[float],
                progress: Progress | None = None, on_result: OnResult | None = None) -> list[RunResult]:
    """Result shape 2: the same requests (adapters, lengths) at increasing arrival rates."""
    if config.ttft_slo_s is None and config.latency_slo_s is None:
        raise ConfigError("sweep rates measures SLO attainment: give --ttft-slo and/or --latency-slo")
    if not rates or min(rates) <= 0:
        raise ConfigError("--rates needs positive rates")
    if spec.arrival == "all-at-once":
        raise ConfigError("sweep rates needs --arrival poisson or gamma")
    results = []
    for rate in rates:
        point = dataclasses.replace(spec, rate=rate)
        results += run_all(config, workload_from_spec(point), _point_progress(progress, f"rate={rate:g}"),
                           {"sweep": ["rate"]}, on_result)
    return results


def batch_adapters(pattern: str, batch: int) -> int:
    return {"distinct": batch, "uniform": uniform_group_size(batch), "identical": 1}[pattern]


def sweep_batch(config: BenchConfig, patterns: Sequence[str], batch_sizes: Sequence[int], input_len: int,
                output_len: int, seed: int = 0, progress: Progress | None = None,
                on_result: OnResult | None = None) -> list[RunResult]:
    """Result shape 3: one batch of ``batch`` requests at once; the engine may run all of them (and
    all their adapters) in one step, its prefill in one step (token budget = batch · input_len)."""
    unknown = [p for p in patterns if p not in BATCH_PATTERNS]
    if unknown or not batch_sizes or min(batch_sizes) < 1:
        raise ConfigError(f"sweep batch: patterns from {BATCH_PATTERNS}, batch sizes >= 1")
    results = []
    for pattern in patterns:
        for batch in batch_sizes:
            num_adapters = batch_adapters(pattern, batch)
            spec = WorkloadSpec(batch, pattern=pattern, num_adapters=num_adapters, batch_size=batch,
                                arrival="all-at-once", seed=seed,
                                lengths=LengthProfile(LengthRange.fixed(input_len), LengthRange.fixed(output_len)))
            e = config.engine
            engine = dataclasses.replace(
                e, max_num_seqs=batch, max_loras=max(e.max_loras, num_adapters),
                max_tasks_per_step=max(e.max_tasks_per_step, num_adapters),
                max_num_batched_tokens=max(e.max_num_batched_tokens, batch * input_len))
            # the warm-up runs the whole batch once, so its prefill shape is compiled before timing
            point = dataclasses.replace(config, engine=engine, hf_batch_size=batch,
                                        warmup_requests=max(config.warmup_requests, batch))
            results += run_all(point, workload_from_spec(spec),
                               _point_progress(progress, f"{pattern} batch={batch}"),
                               {"sweep": ["pattern", "batch_size"]}, on_result)
    return results
