"""Drive an in-process :class:`LLMEngine` through a workload and record what each step did.

Arrivals are honoured in real time: a request is added once its arrival time has passed, with that
scheduled time as its arrival, so time spent waiting for the loop counts against the engine; with
``realtime=False`` every request arrives at 0 and the engine runs as fast as it can.

Steps are observed, not changed: the engine's scheduler ``schedule`` and ``add`` are wrapped on the
instance for the run (restored after), so each ``step()`` is timed and classified by its plan —
prefill tokens vs decode tokens, the adapters of its requests, the KV positions it attends — and each
request's output-length prediction is read when the scheduler admits it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from inlaid.bench.metrics import RequestTimeline, StepRecord
from inlaid.bench.requests import Workload, prompt_ids
from inlaid.engine.llm_engine import LLMEngine, RequestOutput
from inlaid.engine.sequence import SamplingParams
from inlaid.errors import InlaidError

Progress = Callable[[int, int], None]
MAX_IDLE_STEPS = 10_000  # consecutive empty plans with requests in the engine: it is stuck


@dataclass
class EngineRun:
    timelines: list[RequestTimeline]
    steps: list[StepRecord]
    predicted_output_len: dict[int, float] = field(default_factory=dict)  # request id -> at admission
    max_kv_blocks_used: int = 0
    num_adapter_loads: int = 0
    wall_s: float = 0.0


class StepObserver:
    """Wraps ``engine.scheduler.schedule`` / ``add`` on the instance; ``close`` restores them."""

    def __init__(self, engine: LLMEngine):
        self.scheduler = engine.scheduler
        self.last_plan = None
        self.max_kv_blocks_used = 0  # right after scheduling, before finished requests free theirs
        self.predicted: dict[str, float | None] = {}
        schedule, add = self.scheduler.schedule, self.scheduler.add

        def observed_schedule():
            self.last_plan = schedule()
            used = self.scheduler.block_manager.num_used_blocks
            self.max_kv_blocks_used = max(self.max_kv_blocks_used, used)
            return self.last_plan

        def observed_add(seq):
            add(seq)
            self.predicted[seq.request_id] = seq.predicted_output_len

        self.scheduler.schedule, self.scheduler.add = observed_schedule, observed_add

    def close(self) -> None:
        for name in ("schedule", "add"):
            self.scheduler.__dict__.pop(name, None)

    def take_plan(self):
        plan, self.last_plan = self.last_plan, None
        return plan


def step_record(plan, duration_s: float, num_loads: int) -> StepRecord:
    """A step's record from its plan: decode tokens are the one-token steps of running sequences."""
    decode = sum(1 for s in plan.scheduled if s.is_decode)
    prefill = sum(s.num_new_tokens for s in plan.scheduled if not s.is_decode)
    adapters = tuple(s.seq.adapter for s in plan.scheduled if s.seq.adapter is not None)
    context = sum(s.start + s.num_new_tokens for s in plan.scheduled)
    return StepRecord(duration_s, prefill, decode, adapters, num_loads, context)


def _timeline(out: RequestOutput, t0: float, adapter: str) -> RequestTimeline:
    """``adapter`` is the workload's name for the request's adapter (the engine's may differ)."""
    return RequestTimeline(out.arrival_time - t0, out.first_token_time - t0, out.finish_time - t0,
                           len(out.prompt_token_ids), len(out.output_token_ids), request_id=int(out.request_id),
                           adapter=adapter)


def warm_up(engine: LLMEngine, workload: Workload, adapter_map: dict[str, str | None], num_requests: int,
            seed: int = 0) -> None:
    """The workload's first ``num_requests`` requests, untimed, all at once and cut to 4 output tokens:
    the first steps at the workload's own shapes (kernel compiles for its prefill sizes, allocations,
    adapter loads) stay out of the measured run."""
    sampling = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    for i, request in enumerate(workload.requests[:num_requests]):
        prompt = request.prompt if request.prompt else prompt_ids(request, seed)
        try:
            engine.add_request(prompt, sampling, adapter_map.get(request.adapter), request_id=f"warmup-{i}")
        except InlaidError:  # the measured run reports it as a failed request
            continue
    while engine.has_unfinished_requests():
        engine.step()


def run_engine(engine: LLMEngine, workload: Workload, adapter_map: dict[str, str | None], *,
               realtime: bool = True, seed: int = 0, progress: Progress | None = None) -> EngineRun:
    """Every request of ``workload`` through ``engine``; requests the engine rejects count as failed."""
    loop = _Loop(engine, workload, adapter_map, realtime, seed, progress)
    observer = StepObserver(engine)
    loads_before = engine.adapters.num_loads
    try:
        while loop.pending or engine.has_unfinished_requests():
            loop.admit_arrivals()
            if engine.has_unfinished_requests():
                loop.step(observer)
            elif loop.pending:
                time.sleep(max(0.0, loop.t0 + loop.pending[0].arrival_s - time.monotonic()))
    finally:
        observer.close()
    run = loop.run
    run.wall_s = time.monotonic() - loop.t0
    run.num_adapter_loads = engine.adapters.num_loads - loads_before
    run.max_kv_blocks_used = observer.max_kv_blocks_used
    run.predicted_output_len = {int(k): v for k, v in observer.predicted.items() if v is not None}
    run.timelines.sort(key=lambda t: t.request_id)
    return run


class _Loop:
    def __init__(self, engine: LLMEngine, workload: Workload, adapter_map: dict[str, str | None],
                 realtime: bool, seed: int, progress: Progress | None):
        self.engine, self.adapter_map = engine, adapter_map
        self.realtime, self.seed, self.progress = realtime, seed, progress
        self.pending = deque(sorted(workload.requests, key=lambda r: (r.arrival_s, r.request_id)))
        self.total = len(self.pending)
        self.adapter_of = {str(r.request_id): r.adapter for r in workload.requests}
        self.run = EngineRun([], [])
        self.idle = 0
        self.t0 = time.monotonic()

    def finished(self, timeline: RequestTimeline) -> None:
        self.run.timelines.append(timeline)
        if self.progress is not None:
            self.progress(len(self.run.timelines), self.total)

    def admit_arrivals(self) -> None:
        now = time.monotonic()
        while self.pending and (not self.realtime or self.t0 + self.pending[0].arrival_s <= now):
            failed = _add(self.engine, self.pending.popleft(), self.adapter_map, self.t0, self.realtime, self.seed)
            if failed is not None:
                self.finished(failed)

    def step(self, observer: StepObserver) -> None:
        engine = self.engine
        loads = engine.adapters.num_loads
        start = time.monotonic()
        outputs = engine.step(finished_only=True)
        duration = time.monotonic() - start
        plan = observer.take_plan()
        if plan is None or plan.is_empty:
            self.idle += 1
            if self.idle > MAX_IDLE_STEPS:
                raise InlaidError(f"the engine made no progress in {MAX_IDLE_STEPS} steps with "
                                  f"{engine.num_unfinished_requests} requests in it")
            return
        self.idle = 0
        self.run.steps.append(step_record(plan, duration, engine.adapters.num_loads - loads))
        for out in outputs:
            if out.finished:
                self.finished(_timeline(out, self.t0, self.adapter_of.get(out.request_id, "")))


def _add(engine: LLMEngine, request, adapter_map: dict[str, str | None], t0: float, realtime: bool,
         seed: int) -> RequestTimeline | None:
    arrival = t0 + request.arrival_s if realtime else t0
    prompt = request.prompt if request.prompt else prompt_ids(request, seed)
    sampling = SamplingParams(temperature=0, max_tokens=request.output_len, ignore_eos=True)
    try:
        engine.add_request(prompt, sampling, adapter_map.get(request.adapter), request_id=str(request.request_id),
                           arrival_time=arrival)
    except InlaidError as exc:  # too long for the context or the cache: a failed request, not a crash
        now = time.monotonic() - t0
        return RequestTimeline(arrival - t0, None, max(now, arrival - t0), request.input_len, 0,
                               request_id=request.request_id, adapter=request.adapter, error=str(exc))
    return None
