"""Benchmark metrics from per-request timelines and engine step records.

All times are seconds. A request's clock starts at its scheduled arrival (not when the client got
round to sending it), so time spent queued anywhere, client included, counts against the system.
- TTFT = first_token_s - arrival_s.
- latency (end to end) = finish_s - arrival_s: each request's job completion time (JCT) in the
  LoRA-Inlaid sense.
- TPOT = (finish_s - first_token_s) / (output_tokens - 1): the mean gap between output tokens after
  the first; defined only for requests with at least 2 output tokens, then summarized over requests.
- makespan = last finish - first arrival over the whole run; throughputs divide completed requests
  and their output tokens by it.
- Percentiles use the nearest-rank method: pX is the smallest value v such that at least X% of the
  values are <= v. It is always an observed value, and "p90 TTFT <= SLO" means exactly that at
  least 90% of requests met the SLO, so percentiles and SLO attainment never disagree.
- SLO attainment = requests that met every given SLO (<=, inclusive) / all requests; a failed
  request misses every SLO. Latency statistics cover completed requests only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from inlaid.errors import DataError


class _JsonDict:
    def to_dict(self) -> dict:
        """Plain dicts, lists, numbers, strings and None: ready for json.dumps."""
        return asdict(self)


@dataclass(frozen=True)
class RequestTimeline:
    """What the load generator saw of one request. first_token_s is None only for a failed one."""

    arrival_s: float
    first_token_s: float | None
    finish_s: float
    input_tokens: int
    output_tokens: int
    request_id: int = 0
    adapter: str = ""
    error: str | None = None

    def __post_init__(self) -> None:
        if self.error is None and not (self.first_token_s is not None and self.output_tokens >= 1
                                       and self.arrival_s <= self.first_token_s <= self.finish_s):
            raise DataError(f"request {self.request_id}: a completed request needs arrival <= first "
                            "token <= finish and at least one output token")
        if self.finish_s < self.arrival_s or self.input_tokens < 0 or self.output_tokens < 0:
            raise DataError(f"request {self.request_id}: finishes before it arrives or has negative "
                            "token counts")

    @classmethod
    def from_token_times(cls, arrival_s: float, token_times: Sequence[float], input_tokens: int,
                         **fields) -> RequestTimeline:
        """A completed request from the time each output token arrived (streaming)."""
        if not token_times or list(token_times) != sorted(token_times):
            raise DataError("token times must be a non-empty, non-decreasing sequence")
        return cls(arrival_s, token_times[0], token_times[-1], input_tokens, len(token_times), **fields)

    @property
    def is_ok(self) -> bool:
        return self.error is None

    @property
    def ttft_s(self) -> float | None:
        return self.first_token_s - self.arrival_s if self.is_ok else None

    @property
    def latency_s(self) -> float | None:
        return self.finish_s - self.arrival_s if self.is_ok else None

    @property
    def tpot_s(self) -> float | None:
        if not self.is_ok or self.output_tokens < 2:
            return None
        return (self.finish_s - self.first_token_s) / (self.output_tokens - 1)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, 0 < q <= 100: the value at rank ceil(q/100 * n) of the sorted values."""
    if not values or not 0 < q <= 100:
        raise ValueError(f"percentile {q} of {len(values)} values: need values and 0 < q <= 100")
    # q * n first: for integer q the product is exact, so ceil never rounds up past an exact rank.
    rank = math.ceil(q * len(values) / 100)
    return sorted(values)[rank - 1]


@dataclass(frozen=True)
class Stats(_JsonDict):
    """Summary of one quantity; everything but count is None when there are no values."""

    count: int
    mean: float | None = None
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    max: float | None = None

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Stats:
        """Statistics of the values that are not None (None marks an undefined value)."""
        present = sorted(v for v in values if v is not None)
        if not present:
            return cls(0)
        return cls(len(present), math.fsum(present) / len(present), percentile(present, 50),
                   percentile(present, 90), percentile(present, 99), present[-1])


@dataclass(frozen=True)
class SloResult(_JsonDict):
    ttft_slo_s: float | None
    latency_slo_s: float | None
    num_met: int
    attainment: float  # num_met / all requests, failed ones included


def slo_attainment(timelines: Sequence[RequestTimeline], ttft_slo_s: float | None = None,
                   latency_slo_s: float | None = None) -> SloResult:
    """The share of requests whose TTFT and latency are within the given SLOs (at least one)."""
    if ttft_slo_s is None and latency_slo_s is None:
        raise ValueError("give a TTFT SLO, a latency SLO or both")
    if not timelines:
        raise DataError("no requests to measure SLO attainment on")
    met = sum(1 for t in timelines if t.is_ok
              and (ttft_slo_s is None or t.ttft_s <= ttft_slo_s)
              and (latency_slo_s is None or t.latency_s <= latency_slo_s))
    return SloResult(ttft_slo_s, latency_slo_s, met, met / len(timelines))


@dataclass(frozen=True)
class RunSummary(_JsonDict):
    num_requests: int
    num_completed: int
    num_failed: int
    makespan_s: float  # first arrival -> last finish
    request_throughput: float | None  # completed requests / makespan (None when it is 0)
    output_throughput: float | None  # output tokens of completed requests / makespan
    total_input_tokens: int
    total_output_tokens: int
    ttft_s: Stats
    tpot_s: Stats
    latency_s: Stats  # per-request end-to-end latency = job completion time (JCT) in LoRA-Inlaid's sense
    slo: SloResult | None


def summarize(timelines: Sequence[RequestTimeline], ttft_slo_s: float | None = None,
              latency_slo_s: float | None = None) -> RunSummary:
    """Throughput, latency statistics and (when an SLO is given) SLO attainment of one run."""
    if not timelines:
        raise DataError("no requests to summarize")
    done = [t for t in timelines if t.is_ok]
    makespan = max(t.finish_s for t in timelines) - min(t.arrival_s for t in timelines)
    output_tokens = sum(t.output_tokens for t in done)
    has_slo = ttft_slo_s is not None or latency_slo_s is not None
    return RunSummary(
        num_requests=len(timelines), num_completed=len(done), num_failed=len(timelines) - len(done),
        makespan_s=makespan,
        request_throughput=len(done) / makespan if makespan > 0 else None,
        output_throughput=output_tokens / makespan if makespan > 0 else None,
        total_input_tokens=sum(t.input_tokens for t in done), total_output_tokens=output_tokens,
        ttft_s=Stats.of(t.ttft_s for t in done), tpot_s=Stats.of(t.tpot_s for t in done),
        latency_s=Stats.of(t.latency_s for t in done),
        slo=slo_attainment(timelines, ttft_slo_s, latency_slo_s) if has_slo else None)


@dataclass(frozen=True)
class StepRecord:
    """One engine step: how long it took, the tokens it ran and the LoRA adapters of its requests
    (one name per request, repeats allowed; requests on the bare base model are not listed)."""

    duration_s: float
    num_prefill_tokens: int
    num_decode_tokens: int
    adapters: tuple[str, ...] = ()
    num_adapter_loads: int = 0  # adapters copied into device slots before this step
    num_context_tokens: int = 0  # KV positions the step attends over, new tokens included (roofline)

    @property
    def kind(self) -> str:
        """prefill, decode, or mixed (a chunked-prefill step that also decodes)."""
        if self.num_decode_tokens == 0:
            return "prefill"
        return "decode" if self.num_prefill_tokens == 0 else "mixed"


@dataclass(frozen=True)
class StepSummary(_JsonDict):
    num_steps: int
    prefill_latency_s: Stats
    decode_latency_s: Stats
    mixed_latency_s: Stats
    adapters_per_step: Stats  # distinct adapters in a step
    total_adapter_loads: int
    # requests decoding per step (steps that decode): an emptier step at the same load explains a
    # throughput drop that ordering alone cannot
    decode_batch_size: Stats = None


def summarize_steps(steps: Sequence[StepRecord]) -> StepSummary:
    """Step latency per kind and the number of distinct adapters per step."""
    def latencies(kind: str) -> Stats:
        return Stats.of(s.duration_s for s in steps if s.kind == kind)

    return StepSummary(
        num_steps=len(steps), prefill_latency_s=latencies("prefill"),
        decode_latency_s=latencies("decode"), mixed_latency_s=latencies("mixed"),
        adapters_per_step=Stats.of(len(set(s.adapters)) for s in steps),
        total_adapter_loads=sum(s.num_adapter_loads for s in steps),
        decode_batch_size=Stats.of(s.num_decode_tokens for s in steps if s.num_decode_tokens))
