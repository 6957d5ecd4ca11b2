"""Scheduling policies: fcfs order, SRTF by predicted remaining output, victims, β grouping with
previous-step preference, and aging against starvation."""

from __future__ import annotations

import dataclasses
import random

import pytest

from inlaid.engine.sequence import Sequence, SequenceStatus
from tests.engine.fake_runner import (VOCAB, FakeRunner, add, first_step_of, make_scheduler,
                                      reference_output, run_all, step)


@pytest.mark.parametrize("policy, first_victim", [("fcfs", "s2"), ("inlaid", "s0")])
def test_victim_is_the_lowest_priority_running_sequence(policy: str, first_victim: str) -> None:
    sched = make_scheduler(num_blocks=3, block_size=4, policy=policy, aging_rate=0)
    for rid, predicted in [("s0", 8), ("s1", 3), ("s2", 5)]:
        add(sched, rid, [1, 2, 3, 4], max_tokens=8, predicted=predicted)
    runner = FakeRunner(sched.block_manager)
    step(sched, runner)  # three one-block prefills fill the cache; each decode needs a new block
    plan = step(sched, runner)
    assert plan.preempted[0].request_id == first_victim
    assert plan.preempted[0].status is SequenceStatus.PREEMPTED
    assert plan.preempted[0] in sched.waiting and plan.preempted[0].block_table == []


@pytest.mark.parametrize("policy, expected", [("fcfs", ["a", "b", "c", "d"]),
                                              ("inlaid", ["c", "a", "d", "b"])])
def test_admission_order(policy: str, expected: list[str]) -> None:
    sched = make_scheduler(policy=policy, max_num_seqs=1, aging_rate=0)
    for rid, predicted in [("a", 20), ("b", 40), ("c", 5), ("d", 30)]:
        add(sched, rid, [1, 2, 3], max_tokens=int(predicted), predicted=predicted)
    first = first_step_of(run_all(sched))
    assert sorted(first, key=first.get) == expected


def test_remaining_output_counts_generated_tokens_and_overruns() -> None:
    sched = make_scheduler(policy="inlaid", aging_rate=0)
    seq = add(sched, "s", [1], max_tokens=100, predicted=30)
    assert sched.remaining_output(seq) == 30
    seq.token_ids += [5] * 10
    assert sched.remaining_output(seq) == 20
    seq.token_ids += [5] * 30  # 40 made, prediction was 30: expect 40 more, capped at 100
    assert sched.remaining_output(seq) == 40
    seq.token_ids += [5] * 30
    assert sched.remaining_output(seq) == 30
    huge = add(sched, "huge", [1], max_tokens=10, predicted=500)  # clipped to max_tokens
    assert sched.remaining_output(huge) == 10


def test_running_order_is_shortest_remaining_first() -> None:
    sched = make_scheduler(policy="inlaid", max_num_seqs=3, aging_rate=0)
    runner = FakeRunner(sched.block_manager)
    for rid, length in [("long", 30), ("mid", 12), ("short", 4)]:
        add(sched, rid, [1, 2], max_tokens=length, predicted=length)
    step(sched, runner)  # all three running, in order long, mid, short; now squeeze the batch to one sequence
    sched.config = dataclasses.replace(sched.config, max_num_seqs=1)
    done = []
    while not sched.is_finished():
        done += [s.request_id for s in step(sched, runner).seqs if s.is_finished]
    assert done == ["short", "mid", "long"]


def test_adapter_caps_hold_in_both_policies() -> None:
    for policy, cap in [("fcfs", 2), ("inlaid", 3)]:
        sched = make_scheduler(policy=policy, max_loras=2 if policy == "fcfs" else 8,
                               max_tasks_per_step=3, max_num_seqs=32)
        rng = random.Random(5)
        for i in range(60):
            add(sched, f"r{i}", [rng.randrange(1, VOCAB) for _ in range(3)], f"task{i % 8}",
                max_tokens=rng.randrange(1, 12), predicted=rng.randrange(1, 12))
        plans = run_all(sched)
        assert max(len(p.adapters) for p in plans) == cap  # check_plan asserts <= cap each step


def test_previous_step_tasks_are_preferred_within_the_affinity() -> None:
    sched = make_scheduler(policy="inlaid", max_tasks_per_step=1, aging_rate=0, task_affinity=16)
    runner = FakeRunner(sched.block_manager)
    a = add(sched, "a", [1, 2], "A", max_tokens=50, predicted=50)
    assert step(sched, runner).adapters == {"A"}
    add(sched, "b", [1, 2], "B", max_tokens=40, predicted=40)  # 9 tokens shorter than a's 49 left
    assert step(sched, runner).adapters == {"A"}
    add(sched, "c", [1, 2], "C", max_tokens=10, predicted=10)  # 38 shorter: beats the bonus
    plan = step(sched, runner)
    assert plan.adapters == {"C"}
    assert a.status is SequenceStatus.RUNNING and a.block_table and not plan.preempted  # paused
    assert step(sched, runner).adapters == {"C"}  # C is now the warm task


def test_paused_tasks_yield_their_blocks_to_the_chosen_task() -> None:
    # without this, a paused task holding every block would stall the chosen one forever
    sched = make_scheduler(num_blocks=4, block_size=4, policy="inlaid", max_tasks_per_step=1,
                           aging_rate=0, task_affinity=0)
    runner = FakeRunner(sched.block_manager)
    a = add(sched, "a", [1] * 12, "A", max_tokens=5, predicted=50)  # 3 of the 4 blocks
    step(sched, runner)
    b = add(sched, "b", [2] * 8, "B", max_tokens=1, predicted=1)  # needs 2 blocks, wins the slot
    plan = step(sched, runner)
    assert plan.preempted == [a] and plan.seqs == [b]
    run_all(sched, runner)
    assert a.output_token_ids == reference_output(a.prompt_token_ids, "A", a.sampling)


def test_aging_lets_a_long_job_through_a_stream_of_short_jobs() -> None:
    def simulate(aging_rate: float, num_steps: int = 1000) -> tuple[Sequence, int]:
        """Returns the long job and how many short jobs had finished when it started."""
        sched = make_scheduler(num_blocks=512, policy="inlaid", max_num_seqs=1,
                               aging_rate=aging_rate)
        runner = FakeRunner(sched.block_manager)
        long = add(sched, "long", [1, 2, 3], max_tokens=100, predicted=100)
        shorts_before = -1
        for t in range(num_steps):
            if t % 4 == 0:  # arrivals outpace the service rate (5 steps a job): shorts always wait
                add(sched, f"short{t}", [4, 5], max_tokens=5, predicted=5)
            plan = step(sched, runner)
            if long in plan.seqs and shorts_before < 0:
                shorts_before = sched.predictor.num_observations
        return long, shorts_before

    starved, _ = simulate(aging_rate=0)
    assert starved.status is SequenceStatus.WAITING and starved.num_output_tokens == 0
    aged, shorts_before = simulate(aging_rate=1)
    assert aged.is_finished and aged.num_output_tokens == 100
    # SRTF still served the shorts that arrived within (100 - 5) / aging_rate steps of it first
    assert 20 <= shorts_before <= 30
