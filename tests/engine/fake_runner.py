"""Test oracle for the scheduler: a fake model runner with a KV cache addressed through the block
tables. It writes each fed token into its slot, refuses writes into shared blocks, and checks that
every slot a step attends to holds that sequence's token under that sequence's adapter. Its "model"
is a deterministic function of (adapter, context), so every request's output must equal the output
of generating it alone, however it was batched, chunked, cached or preempted.
"""

from __future__ import annotations

import zlib

from inlaid.engine.block_manager import BlockManager
from inlaid.engine.scheduler import Scheduler, SchedulerConfig, StepPlan
from inlaid.engine.sequence import SamplingParams, Sequence, SequenceStatus

VOCAB, EOS = 50, 0


def fake_model(adapter: str | None, context: list[int]) -> int:
    return (sum(context) * 7 + len(context) * 13 + zlib.crc32(str(adapter).encode())) % VOCAB


def reference_output(prompt: list[int], adapter: str | None, sampling: SamplingParams) -> list[int]:
    tokens = list(prompt)
    while True:
        tokens.append(fake_model(adapter, tokens))
        is_eos = tokens[-1] == EOS and not sampling.ignore_eos
        if is_eos or len(tokens) - len(prompt) == sampling.max_tokens:
            return tokens[len(prompt):]


class FakeRunner:
    def __init__(self, bm: BlockManager) -> None:
        self.bm = bm
        self.kv: dict[tuple[int, int], tuple[str | None, int]] = {}
        self.last: dict[str, int] = {}  # the last run's sampled tokens: the "device" copy

    def token(self, seq: Sequence, pos: int) -> int:
        """The token fed at ``pos``: a placeholder (asynchronous scheduling) is the last run's
        sample of that sequence, as the real runner takes it from the device."""
        if pos < len(seq.token_ids):
            return seq.token_ids[pos]
        assert pos == len(seq.token_ids) and seq.num_placeholders >= 1, "feeds an unsampled token"
        return self.last[seq.request_id]

    def slot(self, seq: Sequence, pos: int) -> tuple[int, int]:
        return seq.block_table[pos // self.bm.block_size], pos % self.bm.block_size

    def run(self, plan: StepPlan) -> list[int]:
        # reads first, writes second: a step may only use KV computed by earlier steps, besides
        # the tokens it feeds itself (the contract that lets prefix hits skip work safely)
        for item in plan.scheduled:
            assert item.start == item.seq.num_computed_tokens
            assert item.start + item.num_new_tokens <= item.seq.num_tokens
            self.check_context(item.seq, range(item.start))
        for item in plan.scheduled:
            seq = item.seq
            for pos in range(item.start, item.start + item.num_new_tokens):
                block, offset = self.slot(seq, pos)
                assert self.bm.ref_count(block) == 1, "a write into a shared block"
                self.kv[block, offset] = (seq.adapter, self.token(seq, pos))
        sampled = [fake_model(s.seq.adapter, [self.token(s.seq, p) for p in range(s.start + s.num_new_tokens)])
                   for s in plan.scheduled]
        self.last = {s.seq.request_id: t for s, t in zip(plan.scheduled, sampled) if s.samples}
        return sampled

    def check_context(self, seq: Sequence, positions: range) -> None:
        for pos in positions:
            assert self.kv.get(self.slot(seq, pos)) == (seq.adapter, seq.token_ids[pos]), pos


def make_scheduler(num_blocks: int = 64, block_size: int = 4, prefix: bool = True,
                   **config) -> Scheduler:
    config.setdefault("eos_token_ids", (EOS,))
    return Scheduler(SchedulerConfig(**config), BlockManager(num_blocks, block_size, prefix))


def add(sched: Scheduler, rid: str, prompt: list[int], adapter: str | None = None,
        max_tokens: int = 8, predicted: float | None = None, ignore_eos: bool = True) -> Sequence:
    seq = Sequence(rid, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos), adapter)
    seq.predicted_output_len = predicted
    sched.add(seq)
    return seq


def check_plan(sched: Scheduler, plan: StepPlan) -> None:
    cfg = sched.config
    assert plan.num_batched_tokens <= cfg.max_num_batched_tokens
    assert len(plan.scheduled) <= cfg.max_num_seqs
    assert len({id(s) for s in plan.seqs}) == len(plan.seqs)
    assert all(s.status is SequenceStatus.RUNNING for s in plan.seqs)
    assert plan.adapters == {s.adapter for s in plan.seqs} - {None}
    if cfg.adapter_cap is not None:
        assert len(plan.adapters) <= cfg.adapter_cap


def step(sched: Scheduler, runner: FakeRunner) -> StepPlan:
    plan = sched.schedule()
    assert not plan.is_empty, "no progress while requests are pending"
    check_plan(sched, plan)
    sched.postprocess(plan, runner.run(plan))
    return plan


class SyncDriver:
    """Steps as the engine does by default: schedule, run and record one step at a time."""

    def __init__(self, sched: Scheduler, runner: FakeRunner) -> None:
        self.sched, self.runner = sched, runner

    def step(self) -> StepPlan:
        return step(self.sched, self.runner)

    @property
    def busy(self) -> bool:
        return not self.sched.is_finished()


class AsyncDriver(SyncDriver):
    """Steps as the engine does under asynchronous scheduling: schedule and run step N + 1, then
    resolve step N's tokens."""

    def __init__(self, sched: Scheduler, runner: FakeRunner) -> None:
        super().__init__(sched, runner)
        self.in_flight: tuple[StepPlan, list[int]] | None = None

    def step(self) -> StepPlan:
        plan = self.sched.schedule()
        check_plan(self.sched, plan)
        launched = None
        if not plan.is_empty:
            launched = (plan, self.runner.run(plan))
            self.sched.advance(plan)
        assert launched or self.in_flight, "no progress while requests are pending"
        if self.in_flight is not None:
            self.sched.resolve(*self.in_flight)
        self.in_flight = launched
        return plan

    @property
    def busy(self) -> bool:
        return super().busy or self.in_flight is not None


def run_all(sched: Scheduler, runner: FakeRunner | None = None, max_steps: int = 5000,
            driver: SyncDriver | None = None) -> list[StepPlan]:
    """Step until every request is done (through ``driver``: synchronous by default)."""
    driver = driver or SyncDriver(sched, runner or FakeRunner(sched.block_manager))
    plans = []
    while driver.busy:
        plans.append(driver.step())
        assert len(plans) < max_steps
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks
    return plans


def first_step_of(plans: list[StepPlan]) -> dict[str, int]:
    first: dict[str, int] = {}
    for plan in plans:
        for seq in plan.seqs:
            first.setdefault(seq.request_id, plan.step)
    return first
