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

Policies:
- ``fcfs``: score 0, arrival order decides; adapter slots go to the oldest requests.
- ``inlaid``: score = remaining predicted output (``predicted_remaining``) − aging_rate · age.
  Age = scheduler steps since arrival (deterministic; a step is a token for running requests), so
  a request overtakes any request R tokens shorter after R / aging_rate steps: nothing starves. Grouping: an adapter's group score is its best
  member's score, minus ``task_affinity`` if it ran last step (warm slot, fewer LoRA segments); the
  β best groups run. Aging lowers waiting scores without bound, so every adapter wins a slot.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field
from itertools import chain

from inlaid.engine.block_manager import BlockManager
from inlaid.engine.predictor import OutputLengthPredictor, predicted_remaining
from inlaid.engine.sequence import Sequence, SequenceStatus
from inlaid.errors import ConfigError, RequestError

POLICIES = ("fcfs", "inlaid")


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

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"--policy {self.policy!r}: choose one of {POLICIES}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ConfigError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if (self.max_loras is not None and self.max_loras < 1) or self.max_tasks_per_step < 1:
            raise ConfigError("max_loras and max_tasks_per_step (β) must be >= 1")
        if self.aging_rate < 0 or self.task_affinity < 0:
            raise ConfigError("aging_rate and task_affinity must be >= 0")

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
                 predictor: OutputLengthPredictor | None = None) -> None:
        self.config = config
        self.block_manager = block_manager
        self.predictor = predictor if predictor is not None else OutputLengthPredictor()
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

    def priority(self, seq: Sequence) -> tuple[float, int]:
        if self.config.policy == "fcfs":
            return 0.0, seq.arrival_index
        age = self._step - seq.arrival_step
        return self.remaining_output(seq) - self.config.aging_rate * age, seq.arrival_index

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
        # Scores are fixed within a step: compute each once (sorting with priority() as the key
        # cost ~1 ms a step with a few hundred waiting requests under `inlaid`).
        if self.config.policy == "fcfs":
            key = self.priority  # a constant score: nothing to compute
        else:
            scores = {id(seq): self.priority(seq) for seq in chain(self.running, self.waiting)}
            key = lambda seq: scores[id(seq)]  # noqa: E731
        running = sorted(self.running, key=key)
        waiting = sorted(self.waiting, key=key)
        allowed = self._choose_adapters(running, waiting, key)
        paused = self._schedule_running(running, allowed, budget, plan)
        if not plan.preempted:  # memory is short: admitting now would only preempt again
            self._admit(waiting, allowed, paused, budget, plan)
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
            victim = max(chain(queue, paused), key=self.priority, default=None)
            if victim is None:
                self._preempt(seq, plan)
                return False
            (queue if victim in queue else paused).remove(victim)
            self._preempt(victim, plan)
        self.block_manager.append_slot(seq)
        return True

    def _admit(self, waiting: list[Sequence], allowed: set[str] | None, paused: list[Sequence],
               budget: _Budget, plan: StepPlan) -> None:
        for seq in waiting:
            if budget.exhausted:
                break
            if not _is_allowed(seq, allowed):
                continue  # another task's turn; grouping is the point of skipping here
            pending = seq.num_tokens - self.block_manager.cached_prefix_len(seq)
            if not self.config.enable_chunked_prefill and pending > budget.tokens:
                break
            while not self.block_manager.can_allocate(seq) and paused:
                paused.remove(victim := max(paused, key=self.priority))
                self._preempt(victim, plan)
            if not self.block_manager.can_allocate(seq):
                break
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

    def postprocess(self, seqs: list[Sequence], token_ids: list[int]) -> list[Sequence]:
        """Record a step: ``token_ids[i]`` was sampled for ``seqs[i]`` (ignored for a prefill chunk
        that leaves tokens pending). Returns the sequences that finished."""
        if len(seqs) != len(token_ids):
            raise ValueError(f"{len(seqs)} sequences but {len(token_ids)} sampled tokens")
        finished = []
        for seq, token_id in zip(seqs, token_ids):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # aborted while the model ran
            seq.num_computed_tokens += seq.num_scheduled_tokens
            seq.num_scheduled_tokens = 0
            self.block_manager.cache_full_blocks(seq)
            if seq.num_computed_tokens < seq.num_tokens:
                continue
            seq.append_token(token_id)
            reason = self._finish_reason(seq, token_id)
            if reason is not None:
                self.finish(seq, reason)
                finished.append(seq)
        return finished

    def _finish_reason(self, seq: Sequence, token_id: int) -> str | None:
        if not seq.sampling.ignore_eos and token_id in self.config.eos_token_ids:
            return "stop"
        return "length" if seq.num_output_tokens >= seq.sampling.max_tokens else None


def _is_allowed(seq: Sequence, allowed: set[str] | None) -> bool:
    return allowed is None or seq.adapter is None or seq.adapter in allowed
