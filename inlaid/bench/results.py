"""One benchmark run's result, its files (JSON, CSV) and the metrics every table and plot reads.

A result is plain data, the same in memory and on disk, so ``compare`` reads back exactly what a
run wrote. Files in an output directory:
- ``<name>.json``: one run; ``results.json``: every run of an invocation (a list);
- ``summary.csv``: one row per run (the METRICS columns); ``<name>.requests.csv``: one row per request.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from inlaid.bench.metrics import RequestTimeline
from inlaid.errors import DataError
from inlaid.paths import check_writable_dir

SCHEMA = "inlaid-bench/1"


@dataclass
class RunResult:
    name: str  # the variant's label: a policy (inlaid, fcfs), fp16, no-lora, hf-peft, server, ...
    target: str  # engine | http | hf-peft
    params: dict  # workload and target settings: num_adapters, rate, pattern, batch_size, model, ...
    summary: dict  # RunSummary.to_dict()
    requests: list[dict]  # RequestTimeline.to_dict() per request (+ predicted_output_len)
    steps: dict | None = None  # StepSummary.to_dict(); None for a server
    adapter_swaps: int | None = None
    memory: dict | None = None
    predictor: dict | None = None
    roofline: dict | None = None
    wall_s: float = 0.0
    device: str = ""
    schema: str = SCHEMA
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RunResult:
        schema = data.get("schema") if isinstance(data, dict) else None
        if schema != SCHEMA:
            raise DataError(f"not an inlaid bench result (schema {schema!r}, expected {SCHEMA!r})")
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def timelines(self) -> list[RequestTimeline]:
        fields = RequestTimeline.__dataclass_fields__
        return [RequestTimeline(**{k: v for k, v in r.items() if k in fields}) for r in self.requests]

    @property
    def label(self) -> str:
        """The name plus the sweep coordinates that tell points apart: 'inlaid 100 adapters',
        'fcfs 4 req/s', 'inlaid distinct batch 8'."""
        swept = self.params.get("sweep", ())
        coords = [_COORDINATES[k](self.params[k]) for k in _COORDINATES if k in swept and k in self.params]
        return " ".join([self.name, *coords])


_COORDINATES = {"num_adapters": lambda v: f"{v} adapters", "rate": lambda v: f"{v:g} req/s",
                "pattern": str, "batch_size": lambda v: f"batch {v}"}


def _get(path: str) -> Callable[[RunResult], float | None]:
    first, *rest = path.split(".")

    def read(result: RunResult):
        value = getattr(result, first)
        for key in rest:
            if not isinstance(value, dict):
                return None
            value = value.get(key)
        return value if isinstance(value, (int, float)) else None
    return read


# column name -> how to read it from a result; names ending in _s are seconds
METRICS: dict[str, Callable[[RunResult], float | None]] = {
    "req_per_sec": _get("summary.request_throughput"),
    "output_tok_per_sec": _get("summary.output_throughput"),
    "ttft_mean_s": _get("summary.ttft_s.mean"),
    "ttft_p50_s": _get("summary.ttft_s.p50"),
    "ttft_p90_s": _get("summary.ttft_s.p90"),
    "ttft_p99_s": _get("summary.ttft_s.p99"),
    "tpot_mean_s": _get("summary.tpot_s.mean"),
    "tpot_p99_s": _get("summary.tpot_s.p99"),
    "latency_mean_s": _get("summary.latency_s.mean"),  # = mean JCT
    "latency_p50_s": _get("summary.latency_s.p50"),
    "latency_p90_s": _get("summary.latency_s.p90"),
    "latency_p99_s": _get("summary.latency_s.p99"),
    "makespan_s": _get("summary.makespan_s"),
    "slo_attainment": _get("summary.slo.attainment"),
    "num_failed": _get("summary.num_failed"),
    "prefill_step_mean_s": _get("steps.prefill_latency_s.mean"),
    "decode_step_mean_s": _get("steps.decode_latency_s.mean"),
    "decode_step_p99_s": _get("steps.decode_latency_s.p99"),
    "adapters_per_step_mean": _get("steps.adapters_per_step.mean"),
    "adapter_swaps": _get("adapter_swaps"),
    "predictor_mae_tokens": _get("predictor.mae_at_admission"),
    "decode_roofline_fraction": _get("roofline.fraction"),
    "kv_peak_mib": lambda r: _mib(_get("memory.kv_peak_bytes")(r)),
    "adapter_slots_mib": lambda r: _mib(_get("memory.adapter_slots_bytes")(r)),
}


def _mib(value: float | None) -> float | None:
    return None if value is None else value / 2**20


def metric(result: RunResult, name: str) -> float | None:
    return METRICS[name](result)


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).strip("_") or "run"


def write_results(results: Sequence[RunResult], out_dir: str | Path) -> list[Path]:
    """Every result's JSON and request CSV, results.json and summary.csv; returns the paths."""
    out = Path(out_dir)
    check_writable_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for result in results:
        stem = safe_name(result.label)
        paths.append(out / f"{stem}.json")
        paths[-1].write_text(json.dumps(result.to_dict(), indent=1))
        paths.append(write_requests_csv(result, out / f"{stem}.requests.csv"))
    paths.append(out / "results.json")
    paths[-1].write_text(json.dumps([r.to_dict() for r in results], indent=1))
    paths.append(write_summary_csv(results, out / "summary.csv"))
    return paths


PARAM_COLUMNS = ("num_adapters", "rate", "pattern", "batch_size", "num_requests", "model", "policy", "bits")


def write_summary_csv(results: Sequence[RunResult], path: str | Path) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["name", "target", *PARAM_COLUMNS, *METRICS])
        for r in results:
            writer.writerow([r.name, r.target, *(r.params.get(k, "") for k in PARAM_COLUMNS),
                             *("" if (v := metric(r, m)) is None else f"{v:.6g}" for m in METRICS)])
    return Path(path)


REQUEST_COLUMNS = ("request_id", "adapter", "arrival_s", "first_token_s", "finish_s", "input_tokens",
                   "output_tokens", "predicted_output_len", "error")


def write_requests_csv(result: RunResult, path: str | Path) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, REQUEST_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(result.requests)
    return Path(path)


def load_results(paths: Iterable[str | Path]) -> list[RunResult]:
    """Results from run files (one object) and results.json files (a list), in the order given."""
    results = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: cannot read a bench result: {exc}") from None
        try:
            results.extend(RunResult.from_dict(d) for d in (data if isinstance(data, list) else [data]))
        except DataError as exc:
            raise DataError(f"{path}: {exc}") from None
        except TypeError as exc:
            raise DataError(f"{path}: malformed bench result: {exc}") from None
    if not results:
        raise DataError("no results to compare")
    return results
