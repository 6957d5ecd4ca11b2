"""Continuous-batching scheduler: each step feeds decodes and prefill chunks to the model together,
under a token budget, a sequence budget, a cap on distinct adapters and the free KV blocks.

A step, under either policy:
1. Order running and waiting sequences by ``priority``, a (score, arrival index) tuple, lowest first.
2. Choose the step's adapters: at most ``max_loras`` (fcfs), ``min(β, max_loras)`` (inlaid). Base
   requests need no slot and never count. Running sequences of other adapters are *paused*.
3. Running sequences, best first, get a decode token or their next prefill chunk. One that lacks a
   KV block preempts the worst unscheduled running sequence (recompute: blocks freed, back to
   waiting with its tokens), or itself when none is left.
4. Unless 3 preempted, waiting sequences of the chosen adapters are admitted, best first, preempting
   paused ones for blocks; admission stops at the first that does not fit, so none is overtaken forever.

After a step is launched, ``advance(plan)`` counts its fed tokens as computed and gives every
sampling sequence a placeholder; ``resolve(plan, tokens)`` turns the placeholders into tokens and
finishes sequences (``postprocess`` is both, for a step whose tokens are already known). Under
asynchronous scheduling the engine schedules, launches and advances step N + 1 before it resolves
step N.

Policies:
- ``fcfs``: score 0, arrival order decides; adapter slots go to the oldest requests.
- ``inlaid``: score = remaining predicted output (``predicted_remaining``) − aging_rate · age.
  Age = scheduler steps since arrival (deterministic; a step is a token for running requests), so
  a request overtakes any request R tokens shorter after R / aging_rate steps: nothing starves. Grouping: an adapter's group score is its best
  member's score, minus ``task_affinity`` if it ran last step (warm slot, fewer LoRA segments); the
  β best groups run. Aging lowers waiting scores without bound, so every adapter wins a slot.
- ``inlaid`` with SLO targets (``ttft_slo_s`` / ``latency_slo_s``; None, the default, is the plain
  ``inlaid`` above): a request that can no longer meet the SLO (``misses_slo``: no first token
  ``ttft_slo_s`` after arrival, or time spent + predicted remaining output × the recent step time
  past ``latency_slo_s``) scores ``slo_miss_penalty`` tokens worse, which puts it behind every
  request that still can (unless one has aged that much longer); within each class the score above
  decides. Running requests are demoted too: in 3 a late one is skipped, then fed in 4 where its
  score puts it among the waiting ones (paused, KV kept, until then). Serving requests that will
  miss anyway makes the ones queued behind them miss too: under a burst this is most of the loss.
  Starvation bound: a late request is overtaken only by requests that arrived within
  (its remaining + ``slo_miss_penalty`` + ``task_affinity``) / aging_rate steps after it, at most
  (max_tokens + 1024 + 16) / 1 steps with the defaults; aging_rate 0 gives no bound, as without SLOs.
  Times come from the ``clock`` given to the Scheduler, on which ``Sequence.arrival_time`` is read.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import chain

from inlaid.engine.block_manager import BlockManager
from inlaid.engine.predictor import OutputLengthPredictor, predicted_remaining
from inlaid.engine.sequence import Sequence, SequenceStatus
from inlaid.errors import ConfigError, RequestError

POLICIES = ("fcfs", "inlaid")
# Weight of the newest step in the step-time estimate. Reactive on purpose: the estimate must rise
# within a step or two of a burst, whose eager prefill steps are what make running requests late
# (scripts/sim_scheduler.py at 24 req/s, 5 seeds: 83% SLO attainment with 0.1, 88% with 0.5).
STEP_TIME_WEIGHT = 0.5


@dataclass(frozen=True)
class SchedulerConfig:
    policy: str = "fcfs"
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_loras: int | None = None  # GPU adapter slots; None: no cap
    max_tasks_per_step: int = 10  # β, inlaid only
    aging_rate: float = 1.0  # tokens of priority gained per step waited, inlaid only
    task_affinity: float = 16.0  # tokens of priority for adapters of the previous step, inlaid only
    enable_chunked_prefill: bool = True
    eos_token_ids: tuple[int, ...] = ()
    # SLO targets (seconds), inlaid only: requests that can no longer meet them are served last
    ttft_slo_s: float | None = None
    latency_slo_s: float | None = None
    slo_miss_penalty: float = 1024.0  # tokens of priority lost by such a request (bounds its wait)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"--policy {self.policy!r}: choose one of {POLICIES}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ConfigError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if (self.max_loras is not None and self.max_loras < 1) or self.max_tasks_per_step < 1:
            raise ConfigError("max_loras and max_tasks_per_step (β) must be >= 1")
        if self.aging_rate < 0 or self.task_affinity < 0:
            raise ConfigError("aging_rate and task_affinity must be >= 0")
        check_slo_target("ttft_slo_s", self.ttft_slo_s)
        check_slo_target("latency_slo_s", self.latency_slo_s)
        if not (_is_positive(self.slo_miss_penalty) or self.slo_miss_penalty == 0):
            raise ConfigError(f"slo_miss_penalty {self.slo_miss_penalty!r}: must be a finite number >= 0")

    @property
    def slo_aware(self) -> bool:
        return self.policy == "inlaid" and (self.ttft_slo_s is not None or self.latency_slo_s is not None)

    @property
    def adapter_cap(self) -> int | None:
        beta = self.max_tasks_per_step if self.policy == "inlaid" else None
        return min((c for c in (self.max_loras, beta) if c is not None), default=None)


@dataclass(frozen=True)
class ScheduledSeq:
    """Feed tokens [start, start + num_new_tokens) of ``seq`` to the model this step. A snapshot:
    ``samples`` (a token is sampled: these are the last pending tokens) is fixed at schedule time."""

    seq: Sequence
    start: int
    num_new_tokens: int
    samples: bool

    @property
    def is_decode(self) -> bool:
        """One query token over the sequence's own cache: the decode (CUDA-graph) path."""
        return self.num_new_tokens == 1 and self.samples and self.start > 0


@dataclass
class StepPlan:
    step: int
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    adapters: set[str] = field(default_factory=set)  # adapters that need a GPU slot this step
    scheduled_at: float = 0.0  # the scheduler's clock at schedule() (SLO-aware only)

    @property
    def seqs(self) -> list[Sequence]:
        return [s.seq for s in self.scheduled]

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class _Budget:
    seqs: int
    tokens: int

    @property
    def exhausted(self) -> bool:
        return self.seqs <= 0 or self.tokens <= 0


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager,
                 predictor: OutputLengthPredictor | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.block_manager = block_manager
        self.predictor = predictor if predictor is not None else OutputLengthPredictor()
        self.clock = clock  # the clock of Sequence.arrival_time (a virtual one in simulations)
        self.step_time: float | None = None  # seconds per step, recent steps weighted most
        self._last_resolved: float | None = None  # clock at the last resolve() (SLO-aware only)
        self._now = 0.0  # clock reading of the current step's schedule() (SLO-aware only)
        self._key = self.priority  # this step's ordering (schedule() fixes it)
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self._live: dict[str, Sequence] = {}
        self._num_arrived = 0
        self._step = 0
        self._previous_adapters: set[str] = set()
        self.next_in_line: list[Sequence] = []  # waiting after the last step, best first

    def add(self, seq: Sequence) -> None:
        """Queue a new request; rejects what could never run instead of stalling on it later."""
        if seq.request_id in self._live:
            raise RequestError(f"request id {seq.request_id!r} is already in the engine")
        # the last sampled token is never fed back, so it needs no KV slot
        max_kv_tokens = seq.num_prompt_tokens + seq.sampling.max_tokens - 1
        capacity = self.block_manager.num_blocks * self.block_manager.block_size
        if max_kv_tokens > capacity:
            raise RequestError(f"request {seq.request_id!r}: prompt + max_tokens need {max_kv_tokens} "
                              f"KV slots, the cache holds {capacity}")
        if not self.config.enable_chunked_prefill and max_kv_tokens > self.config.max_num_batched_tokens:
            raise RequestError(f"request {seq.request_id!r}: {max_kv_tokens} tokens exceed "
                              f"max_num_batched_tokens without chunked prefill")
        seq.arrival_index, seq.arrival_step = self._num_arrived, self._step
        self._num_arrived += 1
        if seq.predicted_output_len is None:
            seq.predicted_output_len = self.predictor.predict(seq.adapter, seq.num_prompt_tokens)
        self._live[seq.request_id] = seq
        self.waiting.append(seq)

    def abort(self, request_id: str) -> bool:
        """Finish a request early (client gone); frees its KV blocks. False if unknown."""
        seq = self._live.get(request_id)
        if seq is not None:
            self.finish(seq, "abort")
        return seq is not None

    def finish(self, seq: Sequence, reason: str) -> None:
        """End ``seq`` (also for stop strings, which the detokenizing engine detects)."""
        if seq.is_finished:
            return
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        seq.num_placeholders = 0  # samples still in flight are dropped with the request
        self.block_manager.free(seq)
        (self.running if seq in self.running else self.waiting).remove(seq)
        del self._live[seq.request_id]
        if reason != "abort":  # an aborted length says nothing about the task
            self.predictor.observe(seq.adapter, seq.num_prompt_tokens, seq.num_output_tokens)

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def remaining_output(self, seq: Sequence) -> float:
        predicted = seq.predicted_output_len or seq.sampling.max_tokens
        return predicted_remaining(predicted, seq.num_output_tokens, seq.sampling.max_tokens)

    def misses_slo(self, seq: Sequence, now: float, remaining: float | None = None) -> bool:
        """Whether ``seq`` can no longer meet the SLO at time ``now``: its first token came, or is
        still missing, later than ``ttft_slo_s`` after arrival; or the time it has spent plus its
        ``remaining`` output (default: predicted) at the recent step time exceeds ``latency_slo_s``.
        The latency test is a forecast: it changes its mind when the step time does."""
        cfg = self.config
        waited = now - seq.arrival_time
        if cfg.ttft_slo_s is not None:
            ttft = waited if seq.first_token_time is None else seq.first_token_time - seq.arrival_time
            if ttft > cfg.ttft_slo_s:
                return True
        if cfg.latency_slo_s is not None and self.step_time is not None:
            if remaining is None:
                remaining = self.remaining_output(seq)
            return waited + remaining * self.step_time > cfg.latency_slo_s
        return False

    def priority(self, seq: Sequence) -> tuple[float, int]:
        if self.config.policy == "fcfs":
            return 0.0, seq.arrival_index
        age = self._step - seq.arrival_step
        remaining = self.remaining_output(seq)
        score = remaining - self.config.aging_rate * age
        if self.config.slo_aware and self.misses_slo(seq, self._now, remaining):
            score += self.config.slo_miss_penalty
        return score, seq.arrival_index

    def _choose_adapters(self, running: list[Sequence], waiting: list[Sequence], key) -> set[str] | None:
        """The adapters allowed this step (None: all). ``running`` and ``waiting`` are sorted by ``key``."""
        cap = self.config.adapter_cap
        if cap is None:
            return None
        group_scores: dict[str, tuple[float, int]] = {}
        for seq in heapq.merge(running, waiting, key=key):
            if seq.adapter is not None and seq.adapter not in group_scores:
                score, index = key(seq)  # the group's best member comes first
                if self.config.policy == "inlaid" and seq.adapter in self._previous_adapters:
                    score -= self.config.task_affinity
                group_scores[seq.adapter] = (score, index)
        return set(sorted(group_scores, key=group_scores.__getitem__)[:cap])

    def schedule(self) -> StepPlan:
        self._step += 1
        plan = StepPlan(self._step)
        budget = _Budget(self.config.max_num_seqs, self.config.max_num_batched_tokens)
        if self.config.slo_aware:
            self._now = plan.scheduled_at = self.clock()
        # Scores are fixed within a step: compute each once (sorting with priority() as the key
        # cost ~1 ms a step with a few hundred waiting requests under `inlaid`).
        if self.config.policy == "fcfs":
            key = self.priority  # a constant score: nothing to compute
        else:
            scores = {id(seq): self.priority(seq) for seq in chain(self.running, self.waiting)}
            key = lambda seq: scores[id(seq)]  # noqa: E731
        self._key = key
        # A sequence whose unread samples already reach max_tokens is done: it only waits for
        # resolve() (asynchronous scheduling), so it is neither fed nor a preemption victim.
        running = sorted((seq for seq in self.running if not _awaits_last_token(seq)), key=key)
        waiting = sorted(self.waiting, key=key)
        allowed = self._choose_adapters(running, waiting, key)
        # A late running request gives its place in the batch to waiting requests that can still
        # make it (it keeps its KV blocks, paused): under a burst the batch is otherwise full of
        # requests that miss anyway, and everyone queued behind them misses too (simulated at
        # 24 req/s: 88% SLO attainment with this, 78% without). It competes with the waiting ones
        # by score, penalty included, so aging brings it back.
        demoted = [seq for seq in running if self.misses_slo(seq, self._now)] if self.config.slo_aware else []
        if demoted:
            late = {id(seq) for seq in demoted}
            running = [seq for seq in running if id(seq) not in late]
        paused = self._schedule_running(running, allowed, budget, plan)
        candidates = list(heapq.merge(waiting, demoted, key=key)) if demoted else waiting
        self._admit(candidates, allowed, paused, budget, plan, len(demoted))
        self._previous_adapters = plan.adapters
        # who is next in line after this step, best first (the engine prefetches their adapters)
        self.next_in_line = [seq for seq in waiting if seq.status is not SequenceStatus.RUNNING]
        return plan

    def _schedule_running(self, running: list[Sequence], allowed: set[str] | None,
                          budget: _Budget, plan: StepPlan) -> list[Sequence]:
        """Decodes and continuing prefill chunks; returns the running sequences left paused."""
        queue, paused = deque(running), []
        while queue:
            seq = queue.popleft()
            if budget.exhausted or not _is_allowed(seq, allowed):
                paused.append(seq)
            elif self._reserve_slots(seq, queue, paused, plan):
                self._feed(seq, budget, plan)
        return paused

    def _reserve_slots(self, seq: Sequence, queue: deque[Sequence], paused: list[Sequence],
                       plan: StepPlan) -> bool:
        """Make KV room for ``seq``'s pending tokens, preempting the worst unscheduled sequences."""
        while not self.block_manager.may_append(seq):
            # the queue may hold waiting requests too (see _admit): only running ones have blocks
            victim = max((s for s in chain(queue, paused) if s.status is SequenceStatus.RUNNING),
                         key=self._key, default=None)
            if victim is None:
                self._preempt(seq, plan)
                return False
            (queue if victim in queue else paused).remove(victim)
            self._preempt(victim, plan)
        self.block_manager.append_slot(seq)
        return True

    def _admit(self, candidates: list[Sequence], allowed: set[str] | None, paused: list[Sequence],
               budget: _Budget, plan: StepPlan, num_demoted: int = 0) -> None:
        """Admit waiting sequences, best first. ``candidates`` may also hold ``num_demoted`` running
        sequences that miss their SLO: each continues where its score puts it among the waiting ones.
        (A victim taken from the queue may be one of them: the count is an upper bound, which only
        costs a longer scan.) A waiting sequence short of KV blocks preempts only paused sequences:
        demoted ones still queued behind it keep their blocks and may run this step, so under
        memory pressure "late requests go last" holds for admission order, not for KV."""
        admitting = not plan.preempted  # memory is short: admitting now would only preempt again
        queue = deque(candidates)
        while queue and not budget.exhausted and (admitting or num_demoted):
            seq = queue.popleft()
            if seq.status is SequenceStatus.RUNNING:
                num_demoted -= 1
                preempted = len(plan.preempted)
                if not _is_allowed(seq, allowed):
                    paused.append(seq)
                elif self._reserve_slots(seq, queue, paused, plan):
                    self._feed(seq, budget, plan)
                admitting = admitting and len(plan.preempted) == preempted
                continue
            if not admitting:
                continue  # only demoted running sequences are still looked for
            if not _is_allowed(seq, allowed) or seq.num_placeholders:
                # another task's turn (grouping is the point of skipping here), or preempted
                # with a sample still unread: its recompute must wait until the value is known
                continue
            pending = seq.num_tokens - self.block_manager.cached_prefix_len(seq)
            if not self.config.enable_chunked_prefill and pending > budget.tokens:
                admitting = False
                continue
            while not self.block_manager.can_allocate(seq) and paused:
                paused.remove(victim := max(paused, key=self._key))
                self._preempt(victim, plan)
            if not self.block_manager.can_allocate(seq):
                admitting = False
                continue
            self.block_manager.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            self.waiting.remove(seq)
            self.running.append(seq)
            self._feed(seq, budget, plan)

    def _feed(self, seq: Sequence, budget: _Budget, plan: StepPlan) -> None:
        pending = seq.num_tokens - seq.num_computed_tokens
        num_new = min(pending, budget.tokens)
        seq.num_scheduled_tokens = num_new
        budget.seqs -= 1
        budget.tokens -= num_new
        plan.scheduled.append(ScheduledSeq(seq, seq.num_computed_tokens, num_new, num_new == pending))
        if seq.adapter is not None:
            plan.adapters.add(seq.adapter)

    def _preempt(self, seq: Sequence, plan: StepPlan) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.PREEMPTED
        seq.num_preemptions += 1
        self.running.remove(seq)
        self.waiting.append(seq)
        plan.preempted.append(seq)

    def postprocess(self, plan: StepPlan, token_ids: list[int]) -> list[Sequence]:
        """Record a step whose tokens are known: ``advance`` then ``resolve``."""
        self.advance(plan)
        return self.resolve(plan, token_ids)

    def advance(self, plan: StepPlan) -> None:
        """The step is launched: its fed tokens count as computed, and each sampling sequence
        gets a placeholder for its token, so the next ``schedule()`` can already feed it (the
        runner takes the value from the device). Call once per plan, before the next schedule."""
        for item in plan.scheduled:
            seq = item.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue  # aborted since schedule()
            seq.num_computed_tokens += seq.num_scheduled_tokens
            seq.num_scheduled_tokens = 0
            if item.samples:
                seq.num_placeholders += 1

    def resolve(self, plan: StepPlan, token_ids: list[int]) -> list[Sequence]:
        """The step's tokens are read back: ``token_ids[i]`` was sampled for ``plan.scheduled[i]``
        (ignored where it samples nothing). Plans resolve in launch order, after ``advance``; a
        later plan may have been scheduled and advanced in between (asynchronous scheduling), so
        a sequence may be preempted by now, or have been fed once more than it needed (a stop
        found here: that work is dropped). Returns the sequences that finished."""
        if len(plan.scheduled) != len(token_ids):
            raise ValueError(f"{len(plan.scheduled)} sequences but {len(token_ids)} sampled tokens")
        finished = []
        now = self.clock() if self.config.slo_aware else 0.0
        if self.config.slo_aware and not all(item.seq.is_finished for item in plan.scheduled):
            # the cadence of tokens: from the later of this plan's schedule and the last resolve
            # (under asynchronous scheduling the plan was scheduled while the previous step ran).
            # A plan whose requests all ended meanwhile may be read long after (an idle engine):
            # it says nothing about the step time.
            took = now - max(plan.scheduled_at, self._last_resolved or plan.scheduled_at)
            self._last_resolved = now
            self.step_time = took if self.step_time is None else \
                self.step_time + STEP_TIME_WEIGHT * (took - self.step_time)
        for item, token_id in zip(plan.scheduled, token_ids):
            seq = item.seq
            if seq.is_finished:
                continue  # aborted, or stopped by an earlier plan's token
            if item.samples:
                seq.resolve_placeholder(token_id)
                if seq.first_token_time is None and self.config.slo_aware:
                    seq.first_token_time = now
            if seq.status is SequenceStatus.RUNNING:
                self.block_manager.cache_full_blocks(seq)
            reason = self._finish_reason(seq, token_id) if item.samples else None
            if reason is not None:
                self.finish(seq, reason)
                finished.append(seq)
        return finished

    def _finish_reason(self, seq: Sequence, token_id: int) -> str | None:
        if not seq.sampling.ignore_eos and token_id in self.config.eos_token_ids:
            return "stop"
        return "length" if seq.num_output_tokens >= seq.sampling.max_tokens else None


def check_slo_target(name: str, value: object) -> None:
    if value is not None and not _is_positive(value):
        raise ConfigError(f"{name} {value!r}: must be a positive number of seconds, or None (no target)")


def _is_positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _awaits_last_token(seq: Sequence) -> bool:
    return seq.num_placeholders > 0 and seq.num_output_tokens + seq.num_placeholders >= seq.sampling.max_tokens


def _is_allowed(seq: Sequence, allowed: set[str] | None) -> bool:
    return allowed is None or seq.adapter is None or seq.adapter in allowed
