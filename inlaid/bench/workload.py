"""Seeded benchmark workloads: which adapter each request uses, when it arrives and how long it is,
generated from a WorkloadSpec or replayed from a CSV trace.

Adapter choice, arrivals and lengths draw from separate random streams derived from one seed, so a
sweep that changes only the arrival rate replays the very same adapters and lengths at each rate.
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from importlib import resources
from itertools import accumulate
from pathlib import Path

from inlaid.errors import ConfigError, DataError

ADAPTER_PATTERNS = ("distinct", "uniform", "identical", "powerlaw", "skewed")
ARRIVALS = ("poisson", "gamma", "all-at-once")
TRACE_COLUMNS = ("timestamp", "adapter", "input_len", "output_len")


@dataclass(frozen=True)
class Request:
    """One benchmark request. arrival_s is seconds from the start of the run (the first is at 0)."""

    request_id: int
    arrival_s: float
    adapter: str
    input_len: int
    output_len: int
    prompt: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LengthRange:
    """Token counts drawn uniformly from [low, high], both inclusive; low == high is a fixed length."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if not 1 <= self.low <= self.high:
            raise ConfigError(f"length range [{self.low}, {self.high}]: need 1 <= low <= high")

    @classmethod
    def fixed(cls, length: int) -> LengthRange:
        return cls(length, length)

    def sample(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)


@dataclass(frozen=True)
class LengthProfile:
    """Input and output lengths of one task; the default is S-LoRA's uniform [8, 512] for both."""

    input: LengthRange = LengthRange(8, 512)
    output: LengthRange = LengthRange(8, 512)


@dataclass(frozen=True)
class WorkloadSpec:
    """Everything that determines a generated workload. Adapters are named ``adapter-<i>``, or by the
    keys of ``task_lengths`` when each task has its own length profile."""

    num_requests: int
    pattern: str = "powerlaw"
    num_adapters: int | None = None  # None: the pattern's natural count (see adapter_names)
    alpha: float = 1.0  # powerlaw: P(i) ∝ 1 / (i + 1) ** alpha
    batch_size: int = 1  # distinct / uniform: consecutive requests form batches of this size
    hot_size: int = 1  # skewed: adapters in the hot set
    hot_fraction: float = 0.9  # skewed: share of requests that go to the hot set
    hot_period: int = 100  # skewed: the hot set slides by hot_size adapters every hot_period requests
    arrival: str = "poisson"
    rate: float = 1.0  # requests per second (poisson, gamma)
    cv: float = 1.0  # gamma: coefficient of variation of inter-arrival gaps (1 = poisson)
    lengths: LengthProfile = LengthProfile()
    task_lengths: Mapping[str, LengthProfile] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_requests < 1 or self.batch_size < 1:
            raise ConfigError("num_requests and batch_size must be at least 1")
        if self.pattern not in ADAPTER_PATTERNS:
            raise ConfigError(f"adapter pattern {self.pattern!r}: choose one of {ADAPTER_PATTERNS}")
        if self.arrival not in ARRIVALS:
            raise ConfigError(f"arrival {self.arrival!r}: choose one of {ARRIVALS}")
        if not (math.isfinite(self.rate) and self.rate > 0 and math.isfinite(self.cv) and self.cv > 0):
            raise ConfigError(f"rate {self.rate} and cv {self.cv} must be positive and finite")
        if self.alpha < 0:
            raise ConfigError(f"alpha {self.alpha} must not be negative")
        self._check_adapter_count(len(self.adapter_names()))

    def _check_adapter_count(self, count: int) -> None:
        if self.pattern == "distinct" and count < self.batch_size:
            raise ConfigError(f"distinct: {count} adapters cannot fill a batch of {self.batch_size}")
        if self.pattern == "uniform" and count < uniform_group_size(self.batch_size):
            raise ConfigError(f"uniform: batch {self.batch_size} needs at least "
                              f"{uniform_group_size(self.batch_size)} adapters, got {count}")
        if self.pattern == "skewed" and not (1 <= self.hot_size < count and self.hot_period >= 1
                                             and 0 <= self.hot_fraction <= 1):
            raise ConfigError(f"skewed: need 1 <= hot_size < num_adapters ({count}), hot_period >= 1 "
                              "and 0 <= hot_fraction <= 1")

    def adapter_names(self) -> list[str]:
        if self.task_lengths is not None:
            if not self.task_lengths or self.num_adapters not in (None, len(self.task_lengths)):
                raise ConfigError("task_lengths names the adapters: give one profile per adapter")
            return list(self.task_lengths)
        count = self.num_adapters if self.num_adapters is not None else self._default_adapter_count()
        if count < 1:
            raise ConfigError(f"num_adapters {count} must be at least 1")
        return [f"adapter-{i}" for i in range(count)]

    def _default_adapter_count(self) -> int:
        defaults = {"distinct": self.num_requests, "identical": 1,
                    "uniform": uniform_group_size(self.batch_size)}
        if self.pattern not in defaults:
            raise ConfigError(f"{self.pattern}: give num_adapters")
        return defaults[self.pattern]


def uniform_group_size(batch_size: int) -> int:
    """Adapters per batch in the uniform pattern: √batch rounded to the nearest integer, at least 1."""
    return max(1, round(math.sqrt(batch_size)))


def generate(spec: WorkloadSpec) -> list[Request]:
    """The spec's requests in arrival order; the same spec always gives the same requests."""
    names = spec.adapter_names()
    adapters = [names[i] for i in _CHOOSERS[spec.pattern](spec, _stream(spec.seed, "adapters"), len(names))]
    arrivals = _arrival_times(spec, _stream(spec.seed, "arrivals"))
    lengths_rng = _stream(spec.seed, "lengths")
    requests = []
    for i, (arrival, adapter) in enumerate(zip(arrivals, adapters)):
        profile = spec.task_lengths[adapter] if spec.task_lengths is not None else spec.lengths
        requests.append(Request(i, arrival, adapter, profile.input.sample(lengths_rng),
                                profile.output.sample(lengths_rng)))
    return requests


def _stream(seed: int, name: str) -> random.Random:
    # Seeding with a string is stable across processes (it is hashed with SHA-512, not hash()).
    return random.Random(f"{seed}:{name}")


def _uniform(spec: WorkloadSpec, rng: random.Random, count: int) -> list[int]:
    # Each batch spreads its requests as evenly as possible over exactly √batch adapters.
    group_size = uniform_group_size(spec.batch_size)
    chosen: list[int] = []
    for start in range(0, spec.num_requests, spec.batch_size):
        group = rng.sample(range(count), group_size)
        batch = [group[j % group_size] for j in range(min(spec.batch_size, spec.num_requests - start))]
        rng.shuffle(batch)
        chosen.extend(batch)
    return chosen


def _powerlaw(spec: WorkloadSpec, rng: random.Random, count: int) -> list[int]:
    weights = [1.0 / (i + 1) ** spec.alpha for i in range(count)]
    return rng.choices(range(count), weights=weights, k=spec.num_requests)


def _skewed(spec: WorkloadSpec, rng: random.Random, count: int) -> list[int]:
    # Hot set: a window of hot_size adapters that moves on by its own size every hot_period requests;
    # the remaining requests go uniformly to the adapters outside the window.
    chosen = []
    for i in range(spec.num_requests):
        first = (i // spec.hot_period) * spec.hot_size
        if rng.random() < spec.hot_fraction:
            chosen.append((first + rng.randrange(spec.hot_size)) % count)
        else:
            chosen.append((first + spec.hot_size + rng.randrange(count - spec.hot_size)) % count)
    return chosen


# Each chooser maps (spec, rng, number of adapters) to one adapter index per request. Distinct cycles
# through the adapters, so no batch of batch_size consecutive requests repeats one.
_CHOOSERS = {"distinct": lambda spec, rng, count: [i % count for i in range(spec.num_requests)],
             "identical": lambda spec, rng, count: [0] * spec.num_requests,
             "uniform": _uniform, "powerlaw": _powerlaw, "skewed": _skewed}


def _arrival_times(spec: WorkloadSpec, rng: random.Random) -> list[float]:
    """The first request arrives at 0; the gaps between the others are Poisson or Gamma."""
    gaps_needed = spec.num_requests - 1
    if spec.arrival == "all-at-once":
        return [0.0] * spec.num_requests
    if spec.arrival == "poisson":
        gaps = [rng.expovariate(spec.rate) for _ in range(gaps_needed)]
    else:  # gamma: mean gap 1/rate, std/mean = cv
        shape = 1.0 / spec.cv**2
        gaps = [rng.gammavariate(shape, 1.0 / (spec.rate * shape)) for _ in range(gaps_needed)]
    return list(accumulate(gaps, initial=0.0))


def read_trace(path: str | Path) -> list[Request]:
    """Requests from a CSV trace (timestamp in seconds, adapter, input_len, output_len, and an
    optional prompt column), shifted so that the first arrives at 0. Any bad row is a DataError
    naming its line."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            _check_header(reader.fieldnames, path)
            requests: list[Request] = []
            for row in reader:
                requests.append(_parse_row(row, f"{path}, line {reader.line_num}", requests))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read the trace: {exc}") from None
    if not requests:
        raise DataError(f"{path}: the trace has a header but no rows")
    start = requests[0].arrival_s
    return [replace(r, arrival_s=r.arrival_s - start) for r in requests]


def _check_header(fieldnames: Sequence[str] | None, path: str | Path) -> None:
    missing = [c for c in TRACE_COLUMNS if c not in (fieldnames or ())]
    if missing:
        raise DataError(f"{path}, line 1: missing column(s) {', '.join(missing)}; "
                        f"the header must name {','.join(TRACE_COLUMNS)}")


def _parse_row(row: dict, where: str, previous: list[Request]) -> Request:
    timestamp = _number(row, "timestamp", where, float)
    if previous and timestamp < previous[-1].arrival_s:
        raise DataError(f"{where}: timestamp {timestamp} goes backwards "
                        f"(the previous row is at {previous[-1].arrival_s})")
    return Request(len(previous), timestamp, _text(row, "adapter", where),
                   _number(row, "input_len", where, int), _number(row, "output_len", where, int),
                   row.get("prompt") or None)


def _text(row: dict, column: str, where: str) -> str:
    value = row.get(column)
    if value is None or not value.strip():
        raise DataError(f"{where}: missing value for {column}")
    return value.strip()


def _number(row: dict, column: str, where: str, kind: type) -> float | int:
    text = _text(row, column, where)
    try:
        value = kind(text)
    except ValueError:
        expected = "an integer" if kind is int else "a number"
        raise DataError(f"{where}: {column} {text!r} is not {expected}") from None
    if not math.isfinite(value):
        raise DataError(f"{where}: {column} {text} is not a finite number")
    if value < 0:
        raise DataError(f"{where}: {column} {text} is negative")
    if kind is int and value == 0:
        raise DataError(f"{where}: {column} is 0; a request needs at least one token")
    return value


def write_trace(path: str | Path, requests: Sequence[Request]) -> Path:
    """Write requests as a trace that read_trace reads back (timestamps to the millisecond)."""
    with_prompt = any(r.prompt for r in requests)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(TRACE_COLUMNS + (("prompt",) if with_prompt else ()))
        for r in requests:
            row = [f"{r.arrival_s:.3f}", r.adapter, r.input_len, r.output_len]
            writer.writerow(row + ([r.prompt or ""] if with_prompt else []))
    return Path(path)


# Five tasks with their own length profiles (short SQL answers, long summaries, ...): the multi-task
# shape of LoRA-Inlaid's study, in miniature.
SAMPLE_TASKS = {
    "sql": LengthProfile(LengthRange(64, 256), LengthRange(16, 64)),
    "math": LengthProfile(LengthRange(32, 128), LengthRange(64, 256)),
    "chat": LengthProfile(LengthRange(16, 256), LengthRange(32, 512)),
    "summarize": LengthProfile(LengthRange(256, 512), LengthRange(32, 128)),
    "translate": LengthProfile(LengthRange(16, 128), LengthRange(16, 128)),
}


def sample_spec(seed: int = 0, num_requests: int = 200) -> WorkloadSpec:
    """Bursty (gamma, cv 2) arrivals at 4 req/s over the sample tasks with power-law popularity."""
    return WorkloadSpec(num_requests, pattern="powerlaw", alpha=1.0, arrival="gamma", rate=4.0, cv=2.0,
                        task_lengths=SAMPLE_TASKS, seed=seed)


def write_sample_trace(path: str | Path, seed: int = 0, num_requests: int = 200) -> Path:
    """The shipped sample_trace_path() is exactly write_sample_trace(path, seed=0)."""
    return write_trace(path, generate(sample_spec(seed, num_requests)))


def sample_trace_path() -> Path:
    return Path(str(resources.files("inlaid.bench") / "data" / "sample_trace.csv"))
