"""The in-process engine target on dummy:tiny: timelines, step classification, adapter swaps, memory,
the predictor's MAE and the no-LoRA baseline, from one run of each."""

import pytest

from inlaid.bench.engine_target import StepObserver, run_engine, step_record
from inlaid.bench.runner import BenchConfig, engine_config_for, run_all
from inlaid.engine.llm_engine import LLMEngine
from inlaid.engine.scheduler import ScheduledSeq, StepPlan
from inlaid.engine.sequence import Sequence
from inlaid.errors import ConfigError

from .conftest import tiny_engine_config, tiny_workload


@pytest.fixture(scope="module")
def workload():
    return tiny_workload(num_requests=6, num_adapters=3)


@pytest.fixture(scope="module")
def results(workload):
    config = BenchConfig(tiny_engine_config(), baselines=("no-lora",), latency_slo_s=60.0, warmup_requests=1)
    return {r.name: r for r in run_all(config, workload)}


def test_every_request_completes_with_its_exact_lengths(results, workload):
    main = results["inlaid"]
    assert main.summary["num_completed"] == 6 and main.summary["num_failed"] == 0
    by_id = {r.request_id: r for r in workload.requests}
    for row in main.requests:
        request = by_id[row["request_id"]]
        assert (row["input_tokens"], row["output_tokens"]) == (request.input_len, request.output_len)
        assert row["adapter"] == request.adapter  # the workload's name, not the engine's
        assert row["arrival_s"] <= row["first_token_s"] <= row["finish_s"]
    assert main.summary["slo"]["attainment"] == 1.0
    assert main.summary["total_output_tokens"] == sum(r.output_len for r in workload.requests)


def test_steps_split_prefill_and_decode_tokens(results, workload):
    steps = results["inlaid"].steps
    assert steps["num_steps"] >= max(r.output_len for r in workload.requests)
    assert steps["prefill_latency_s"]["count"] >= 1 and steps["decode_latency_s"]["count"] >= 1
    assert 1 <= steps["adapters_per_step"]["max"] <= 2  # max_loras = 2
    used = {r.adapter for r in workload.requests}
    # the warm-up leaves up to 2 adapters resident; 3 adapters in 2 slots swap at least once more
    assert results["inlaid"].adapter_swaps == steps["total_adapter_loads"] >= len(used) - 2


def test_predictor_mae_memory_and_roofline_are_reported(results):
    main = results["inlaid"]
    rows = [r for r in main.requests if r["predicted_output_len"] is not None]
    assert len(rows) == 6
    expected = sum(abs(r["predicted_output_len"] - r["output_tokens"]) for r in rows) / 6
    assert main.predictor["mae_at_admission"] == pytest.approx(expected)
    assert main.predictor["num_observations"] == 6  # the warm-up was forgotten
    assert sum(t["num_requests"] for t in main.predictor["per_task"].values()) == 6
    assert 0 < main.memory["kv_peak_bytes"] <= main.memory["kv_cache_bytes"] == 128 * main.memory["kv_block_bytes"]
    assert main.memory["num_adapter_slots"] == 2 and main.memory["adapter_slots_bytes"] > 0
    assert main.roofline["num_decode_steps"] >= 1 and main.roofline["fraction"] > 0
    assert main.params["bits"] == 4 and main.params["policy"] == "inlaid"
    assert main.params["slo_aware"] is True  # the run's latency SLO reached the scheduler


def test_no_lora_baseline_runs_on_the_bare_base(results):
    ceiling = results["no-lora"]
    assert ceiling.summary["num_completed"] == 6
    assert ceiling.adapter_swaps == 0 and ceiling.steps["adapters_per_step"]["max"] == 0


def test_variants_change_one_thing():
    config = BenchConfig(tiny_engine_config(), baselines=("fcfs", "fp16", "no-lora"))
    assert config.variants == ("inlaid", "fcfs", "fp16", "no-lora")
    assert engine_config_for(config, "fcfs", 3).policy == "fcfs"
    fp16 = engine_config_for(config, "fp16", 3)
    assert (fp16.dummy_bits, fp16.policy, fp16.dummy_adapters) == (None, "inlaid", 3)
    assert engine_config_for(config, "no-lora", 3).dummy_adapters == 0
    with pytest.raises(ConfigError, match="main run's policy"):
        BenchConfig(tiny_engine_config(), baselines=("inlaid",))
    with pytest.raises(ConfigError, match="choose from"):
        BenchConfig(tiny_engine_config(), baselines=("vllm",))
    with pytest.raises(ConfigError, match="only no-lora"):
        BenchConfig(url="http://127.0.0.1:1", baselines=("fcfs",))


@pytest.mark.parametrize("slo_aware", [True, False])
def test_only_inlaid_runs_get_the_slo_targets(slo_aware: bool) -> None:
    config = BenchConfig(tiny_engine_config(), baselines=("fcfs", "no-lora"), ttft_slo_s=2.0, latency_slo_s=10.0,
                         slo_aware=slo_aware)
    for variant in ("inlaid", "no-lora"):
        engine = engine_config_for(config, variant, 3)
        assert (engine.ttft_slo_s, engine.latency_slo_s) == ((2.0, 10.0) if slo_aware else (None, None))
    fcfs = engine_config_for(config, "fcfs", 3)
    assert (fcfs.ttft_slo_s, fcfs.latency_slo_s) == (None, None)
    main_fcfs = BenchConfig(tiny_engine_config(policy="fcfs"), ttft_slo_s=2.0)
    assert engine_config_for(main_fcfs, "fcfs", 3).ttft_slo_s is None


@pytest.mark.parametrize("bad", [0.0, -2.0, float("nan")])
def test_engine_config_rejects_bad_slo_targets_before_loading(bad: float) -> None:
    with pytest.raises(ConfigError, match="ttft_slo_s"):
        tiny_engine_config(ttft_slo_s=bad)


def _plan(*scheduled):
    plan = StepPlan(1)
    plan.scheduled.extend(scheduled)
    return plan


def test_step_record_classifies_by_plan():
    a = Sequence("a", list(range(3, 13)), adapter="x")
    b = Sequence("b", list(range(3, 8)), adapter=None)
    prefill = step_record(_plan(ScheduledSeq(a, 0, 10, True), ScheduledSeq(b, 0, 5, True)), 0.5, 1)
    assert (prefill.kind, prefill.num_prefill_tokens, prefill.num_decode_tokens) == ("prefill", 15, 0)
    assert prefill.adapters == ("x",) and prefill.num_context_tokens == 15 and prefill.num_adapter_loads == 1
    mixed = step_record(_plan(ScheduledSeq(a, 10, 1, True), ScheduledSeq(b, 0, 4, False)), 0.5, 0)
    assert (mixed.kind, mixed.num_prefill_tokens, mixed.num_decode_tokens, mixed.num_context_tokens) == \
        ("mixed", 4, 1, 15)


def test_observer_restores_the_scheduler_and_rejections_count_as_failures():
    engine = LLMEngine(tiny_engine_config(dummy_adapters=1, max_model_len=16))
    workload = tiny_workload(num_requests=2, num_adapters=1)
    workload.requests[1] = type(workload.requests[1])(1, 0.0, "adapter-0", 20, 2)  # longer than the context
    run = run_engine(engine, workload, {"adapter-0": "dummy-0"})
    assert [t.is_ok for t in run.timelines] == [True, False] and "context" in run.timelines[1].error
    assert "schedule" not in vars(engine.scheduler) and "add" not in vars(engine.scheduler)
    observer = StepObserver(engine)
    observer.close()
    assert "schedule" not in vars(engine.scheduler)
