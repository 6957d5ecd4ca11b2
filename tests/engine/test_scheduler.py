"""Scheduler mechanics: requests, budgets, chunked prefill, prefix hits, finishing, preemption.
Outputs are checked against generating each request alone (see fake_runner)."""

from __future__ import annotations

import random

import pytest

from inlaid.engine.scheduler import SchedulerConfig
from inlaid.engine.sequence import SamplingParams, Sequence
from inlaid.errors import ConfigError
from tests.engine.fake_runner import (EOS, VOCAB, AsyncDriver, FakeRunner, SyncDriver, add, first_step_of,
                                      make_scheduler, reference_output, run_all, step)


@pytest.mark.parametrize("kwargs", [
    {"temperature": -0.1}, {"temperature": float("nan")}, {"top_p": 0}, {"top_p": 1.5},
    {"top_k": -2}, {"top_k": 1.5}, {"max_tokens": 0}, {"max_tokens": True}, {"stop": [""]},
    {"stop": [3]}, {"seed": "1"}, {"logprobs": -1}, {"logprobs": 21}])
def test_bad_sampling_params_raise_config_error(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        SamplingParams(**kwargs)


def test_good_sampling_params() -> None:
    params = SamplingParams(temperature=0, top_k=0, stop="###", seed=3, logprobs=5)
    assert params.is_greedy and params.stop == ("###",)


def test_bad_requests_and_configs_raise_config_error() -> None:
    with pytest.raises(ConfigError):
        Sequence("empty", [])
    with pytest.raises(ConfigError):
        Sequence("neg", [1, -1])
    sched = make_scheduler(num_blocks=4, block_size=4)  # 16 KV slots
    add(sched, "fits", [1] * 8, max_tokens=9)  # 8 + 9 - 1 = 16 slots
    with pytest.raises(ConfigError):
        add(sched, "too-long", [1] * 8, max_tokens=10)
    with pytest.raises(ConfigError):
        add(sched, "fits", [1], max_tokens=1)  # duplicate id
    no_chunks = make_scheduler(max_num_batched_tokens=8, enable_chunked_prefill=False)
    with pytest.raises(ConfigError):
        add(no_chunks, "big", [1] * 6, max_tokens=4)
    for bad in [{"policy": "sjf"}, {"max_num_seqs": 0}, {"max_loras": 0},
                {"max_tasks_per_step": 0}, {"aging_rate": -1}]:
        with pytest.raises(ConfigError):
            SchedulerConfig(**bad)


def test_chunked_prefill_shares_steps_with_decodes_under_the_token_budget() -> None:
    sched = make_scheduler(max_num_batched_tokens=16)
    runner = FakeRunner(sched.block_manager)
    short = add(sched, "short", [1, 2, 3], max_tokens=10)
    step(sched, runner)
    long = add(sched, "long", list(range(1, 51)), max_tokens=2)
    chunks = []
    for _ in range(4):
        plan = step(sched, runner)
        by_id = {s.seq.request_id: s for s in plan.scheduled}
        assert by_id["short"].is_decode and not by_id["long"].is_decode
        assert plan.num_batched_tokens == 16 or by_id["long"].samples
        chunks.append((by_id["long"].num_new_tokens, by_id["long"].samples, long.num_output_tokens))
    assert chunks == [(15, False, 0), (15, False, 0), (15, False, 0), (5, True, 1)]
    run_all(sched, runner)
    assert long.output_token_ids == reference_output(list(range(1, 51)), None, long.sampling)
    assert short.output_token_ids == reference_output([1, 2, 3], None, short.sampling)


def test_without_chunking_a_prompt_waits_for_a_whole_budget() -> None:
    sched = make_scheduler(max_num_batched_tokens=12, enable_chunked_prefill=False)
    runner = FakeRunner(sched.block_manager)
    add(sched, "a", [1] * 8, max_tokens=3)
    add(sched, "b", [2] * 8, max_tokens=3)
    plan = step(sched, runner)
    assert [(s.seq.request_id, s.num_new_tokens) for s in plan.scheduled] == [("a", 8)]
    plan = step(sched, runner)
    assert [(s.seq.request_id, s.num_new_tokens) for s in plan.scheduled] == [("a", 1), ("b", 8)]


def test_prefix_cache_hit_skips_the_cached_prefill() -> None:
    sched = make_scheduler(block_size=4)
    runner = FakeRunner(sched.block_manager)
    prompt = list(range(1, 12))
    first = add(sched, "first", prompt, adapter="a", max_tokens=1)
    step(sched, runner)
    assert first.is_finished
    again, other = add(sched, "again", prompt, "a", 1), add(sched, "other", prompt, "b", 1)
    plan = step(sched, runner)
    starts = {s.seq.request_id: (s.start, s.num_new_tokens) for s in plan.scheduled}
    assert starts == {"again": (8, 3), "other": (0, 11)}
    assert again.output_token_ids == reference_output(prompt, "a", again.sampling)
    assert other.output_token_ids == reference_output(prompt, "b", other.sampling)


def test_prefix_hits_cover_only_chunks_computed_in_earlier_steps() -> None:
    sched = make_scheduler(block_size=4, max_num_batched_tokens=16)
    runner = FakeRunner(sched.block_manager)
    prompt = list(range(1, 61))
    add(sched, "a", prompt, max_tokens=2)
    for _ in range(3):
        step(sched, runner)  # 48 of a's 60 tokens computed
    b = add(sched, "b", prompt + [7], max_tokens=2)
    plan = step(sched, runner)  # a's last 12 tokens, and b admitted with the 4 tokens left
    assert [(s.seq.request_id, s.start, s.num_new_tokens) for s in plan.scheduled] == [
        ("a", 48, 12), ("b", 48, 4)]
    run_all(sched, runner)
    assert b.output_token_ids == reference_output(prompt + [7], None, b.sampling)


def test_eos_and_max_tokens_finish_with_reasons() -> None:
    sched = make_scheduler()
    prompts = {f"r{i}": [i + 1, 2 * i + 3, 5] for i in range(30)}
    seqs = [add(sched, rid, p, max_tokens=12, ignore_eos=False) for rid, p in prompts.items()]
    ignore = add(sched, "ignore", prompts["r0"], max_tokens=12, ignore_eos=True)
    run_all(sched)
    reasons = {s.finish_reason for s in seqs}
    assert reasons == {"stop", "length"}  # the fake model emits EOS for some prompts
    for seq in seqs + [ignore]:
        assert seq.output_token_ids == reference_output(seq.prompt_token_ids, None, seq.sampling)
        ends_with_eos = seq.output_token_ids[-1] == EOS and seq is not ignore
        assert (seq.finish_reason == "stop") == ends_with_eos
    assert sched.predictor.num_observations == 31


def test_abort_frees_blocks_even_while_the_model_runs() -> None:
    sched = make_scheduler()
    runner = FakeRunner(sched.block_manager)
    keep, gone = add(sched, "keep", [1, 2, 3]), add(sched, "gone", [4, 5, 6, 7, 8])
    plan = sched.schedule()
    sampled = runner.run(plan)
    assert sched.abort("gone") and not sched.abort("gone") and not sched.abort("unknown")
    assert sched.block_manager.num_used_blocks == 1
    sched.postprocess(plan, sampled)
    assert gone.finish_reason == "abort" and gone.output_token_ids == []
    run_all(sched, runner)
    assert keep.finish_reason == "length"
    assert sched.predictor.num_observations == 1  # aborted lengths are not learned


def test_preempted_sequences_recompute_and_complete() -> None:
    sched = make_scheduler(num_blocks=10, block_size=4, max_num_batched_tokens=32)
    rng = random.Random(3)
    seqs = [add(sched, f"r{i}", [rng.randrange(1, VOCAB) for _ in range(rng.randrange(2, 9))],
                max_tokens=rng.randrange(8, 25)) for i in range(12)]
    plans = run_all(sched)
    assert sum(len(p.preempted) for p in plans) > 0
    assert any(s.num_preemptions > 0 and s.num_output_tokens > 0 for s in seqs)
    for seq in seqs:
        assert seq.output_token_ids == reference_output(seq.prompt_token_ids, None, seq.sampling)


def test_no_admission_in_a_step_that_preempted() -> None:
    sched = make_scheduler(num_blocks=5, block_size=4)
    runner = FakeRunner(sched.block_manager)
    for rid, prompt in [("s0", [1] * 4), ("s1", [2] * 4), ("s2", [3] * 5)]:
        add(sched, rid, prompt, max_tokens=8)
    step(sched, runner)  # 1 + 1 + 2 blocks; s0 and s1 need a block each to decode
    add(sched, "w", [4, 5], max_tokens=2)  # one block, which s2's preemption frees
    plan = step(sched, runner)
    assert [s.request_id for s in plan.preempted] == ["s2"]
    assert [s.request_id for s in plan.seqs] == ["s0", "s1"]
    assert sched.block_manager.num_free_blocks == 1
    plans = run_all(sched, runner)
    first = first_step_of(plans)
    assert first["s2"] < first["w"]  # and fcfs order holds once memory is back


def test_a_request_that_does_not_fit_is_not_overtaken() -> None:
    sched = make_scheduler(num_blocks=4, block_size=4)
    running = add(sched, "running", [1] * 9, max_tokens=4)  # 3 of the 4 blocks
    big = add(sched, "big", [2] * 5, max_tokens=2)  # needs 2 blocks
    small = add(sched, "small", [3] * 2, max_tokens=2)  # would fit in the free block
    plans = run_all(sched)
    assert plans[0].seqs == [running]
    first = first_step_of(plans)
    assert first["big"] <= first["small"]
    assert small.output_token_ids == reference_output(small.prompt_token_ids, None, small.sampling)


@pytest.mark.parametrize("policy", ["fcfs", "inlaid"])
@pytest.mark.parametrize("prefix", [True, False])
@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_random_workloads_complete_with_exact_outputs(policy: str, prefix: bool, asynchronous: bool) -> None:
    rng = random.Random(f"{policy}-{prefix}")
    sched = make_scheduler(num_blocks=24, block_size=4, prefix=prefix, policy=policy,
                           max_num_seqs=6, max_num_batched_tokens=20, max_loras=2,
                           max_tasks_per_step=3)
    runner, seqs = FakeRunner(sched.block_manager), []
    driver = (AsyncDriver if asynchronous else SyncDriver)(sched, runner)
    shared = [rng.randrange(1, VOCAB) for _ in range(9)]
    for t in range(300):
        if t < 150 and rng.random() < 0.5:
            tail = [rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 10))]
            prompt = (shared if rng.random() < 0.5 else []) + tail
            seqs.append(add(sched, f"r{t}", prompt, rng.choice([None, "a", "b", "c"]),
                            max_tokens=rng.randrange(1, 20), ignore_eos=rng.random() < 0.5))
        if driver.busy:
            driver.step()
    run_all(sched, runner, driver=driver)
    for seq in seqs:
        assert seq.output_token_ids == reference_output(seq.prompt_token_ids, seq.adapter, seq.sampling)


def test_async_preemption_eos_and_length_give_exact_outputs() -> None:
    """Asynchronous scheduling under memory pressure: preempted sequences whose last sample is
    still unread, EOS found a step late, max_tokens reached by a placeholder."""
    sched = make_scheduler(num_blocks=10, block_size=4, max_num_batched_tokens=32)
    rng = random.Random(5)
    seqs = []
    while len(seqs) < 16:
        prompt = [rng.randrange(1, VOCAB) for _ in range(rng.randrange(2, 9))]
        params = SamplingParams(max_tokens=rng.randrange(1, 25), ignore_eos=len(seqs) % 2 == 0)
        if params.ignore_eos or reference_output(prompt, None, params)[-1] == EOS:  # half stop on EOS
            seqs.append(add(sched, f"r{len(seqs)}", prompt, max_tokens=params.max_tokens,
                            ignore_eos=params.ignore_eos))
    plans = run_all(sched, driver=AsyncDriver(sched, FakeRunner(sched.block_manager)))
    assert sum(len(p.preempted) for p in plans) > 0
    assert {s.finish_reason for s in seqs} == {"stop", "length"}
    for seq in seqs:
        assert seq.output_token_ids == reference_output(seq.prompt_token_ids, None, seq.sampling)
        assert seq.num_placeholders == 0


def test_async_feeds_unread_samples_and_stops_feeding_at_max_tokens() -> None:
    sched = make_scheduler()
    driver = AsyncDriver(sched, FakeRunner(sched.block_manager))
    one = add(sched, "one", [1, 2, 3], max_tokens=1)
    four = add(sched, "four", [4, 5], max_tokens=4)
    plans = run_all(sched, driver=driver)
    fed = {rid: sum(rid in [s.request_id for s in p.seqs] for p in plans) for rid in ("one", "four")}
    # a request is fed once per token it needs and never after its max_tokens-th sample: the
    # placeholder that reaches max_tokens keeps it out of the next step's batch
    assert fed == {"one": 1, "four": 4}
    decode = [s for s in plans[1].scheduled if s.seq is four][0]
    assert decode.start == 2 and decode.is_decode  # fed while its first token was still unread
    assert one.output_token_ids == reference_output([1, 2, 3], None, one.sampling)
    assert four.output_token_ids == reference_output([4, 5], None, four.sampling)


def test_async_stop_found_late_drops_the_extra_step() -> None:
    sched = make_scheduler()
    params = SamplingParams(max_tokens=12, ignore_eos=False)
    prompt = next(p for p in ([i, j] for i in range(1, VOCAB) for j in range(1, VOCAB))
                  if reference_output(p, None, params) == [EOS])  # the fake model's EOS comes first
    seq = add(sched, "eos", prompt, max_tokens=12, ignore_eos=False)
    plans = run_all(sched, driver=AsyncDriver(sched, FakeRunner(sched.block_manager)))
    expect = reference_output(prompt, None, seq.sampling)
    assert seq.finish_reason == "stop" and seq.output_token_ids == expect and expect[-1] == EOS
    assert sum(seq in p.seqs for p in plans) == len(expect) + 1  # one step fed after the EOS, dropped
