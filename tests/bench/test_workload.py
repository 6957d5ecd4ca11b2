"""Workload generators: seeded and reproducible, distributions checked on large fixed-seed samples
(deterministic, so the tolerances cannot flake), and CSV traces with every kind of bad row."""

import statistics
from collections import Counter

import pytest

from inlaid.bench.workload import (SAMPLE_TASKS, LengthProfile, LengthRange, Request, WorkloadSpec,
                                   generate, read_trace, sample_trace_path, uniform_group_size,
                                   write_sample_trace, write_trace)
from inlaid.errors import ConfigError, DataError

SPECS = {
    "distinct": dict(pattern="distinct", batch_size=8),
    "uniform": dict(pattern="uniform", batch_size=16, num_adapters=10),
    "identical": dict(pattern="identical"),
    "powerlaw": dict(pattern="powerlaw", num_adapters=20, arrival="gamma", cv=3.0),
    "skewed": dict(pattern="skewed", num_adapters=20, hot_size=3, hot_period=50),
    "tasks": dict(pattern="powerlaw", task_lengths=SAMPLE_TASKS, arrival="all-at-once"),
}


def gaps(requests):
    return [b.arrival_s - a.arrival_s for a, b in zip(requests, requests[1:])]


def batches(requests, size):
    return [requests[i:i + size] for i in range(0, len(requests), size)]


@pytest.mark.parametrize("name", SPECS)
def test_same_seed_same_requests_other_seed_other_requests(name):
    first = generate(WorkloadSpec(300, seed=1, **SPECS[name]))
    assert generate(WorkloadSpec(300, seed=1, **SPECS[name])) == first
    assert generate(WorkloadSpec(300, seed=2, **SPECS[name])) != first
    assert [r.request_id for r in first] == list(range(300))
    assert all(r.arrival_s >= 0 for r in first) and first[0].arrival_s == 0.0


def test_changing_the_rate_replays_the_same_adapters_and_lengths():
    slow = generate(WorkloadSpec(200, num_adapters=8, rate=1.0, seed=3))
    fast = generate(WorkloadSpec(200, num_adapters=8, rate=10.0, seed=3))
    assert [(r.adapter, r.input_len, r.output_len) for r in slow] == \
           [(r.adapter, r.input_len, r.output_len) for r in fast]
    assert [r.arrival_s for r in slow] != [r.arrival_s for r in fast]


def test_poisson_gaps_have_mean_one_over_rate_and_cv_one():
    requests = generate(WorkloadSpec(20_000, pattern="identical", arrival="poisson", rate=5.0, seed=0))
    g = gaps(requests)
    assert statistics.fmean(g) == pytest.approx(1 / 5.0, rel=0.03)
    assert statistics.pstdev(g) / statistics.fmean(g) == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("cv", [0.5, 2.0])
def test_gamma_gaps_have_the_requested_cv(cv):
    requests = generate(WorkloadSpec(20_000, pattern="identical", arrival="gamma", rate=2.0, cv=cv, seed=0))
    g = gaps(requests)
    assert statistics.fmean(g) == pytest.approx(0.5, rel=0.06)
    assert statistics.pstdev(g) / statistics.fmean(g) == pytest.approx(cv, rel=0.08)


def test_all_at_once_arrives_at_zero():
    requests = generate(WorkloadSpec(50, pattern="identical", arrival="all-at-once"))
    assert {r.arrival_s for r in requests} == {0.0}


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_powerlaw_frequencies_are_ordered_and_follow_the_law(alpha):
    requests = generate(WorkloadSpec(60_000, pattern="powerlaw", num_adapters=6, alpha=alpha, seed=0))
    counts = Counter(r.adapter for r in requests)
    freq = [counts[f"adapter-{i}"] for i in range(6)]
    assert freq == sorted(freq, reverse=True)
    for i in range(1, 6):  # P(0) / P(i) = (i + 1) ** alpha
        assert freq[0] / freq[i] == pytest.approx((i + 1) ** alpha, rel=0.08)


def test_distinct_never_repeats_an_adapter_within_a_batch():
    requests = generate(WorkloadSpec(96, pattern="distinct", batch_size=8, num_adapters=8))
    for batch in batches(requests, 8):
        assert len({r.adapter for r in batch}) == 8
    everyone = generate(WorkloadSpec(50, pattern="distinct"))  # default: one adapter per request
    assert len({r.adapter for r in everyone}) == 50


@pytest.mark.parametrize("batch_size,num_adapters", [(16, None), (9, 40), (32, 100)])
def test_uniform_spreads_each_batch_evenly_over_sqrt_batch_adapters(batch_size, num_adapters):
    requests = generate(WorkloadSpec(batch_size * 20, pattern="uniform", batch_size=batch_size,
                                     num_adapters=num_adapters, seed=0))
    groups = set()
    for batch in batches(requests, batch_size):
        counts = Counter(r.adapter for r in batch)
        assert len(counts) == uniform_group_size(batch_size) == round(batch_size**0.5)
        assert max(counts.values()) - min(counts.values()) <= 1
        groups.add(frozenset(counts))
    # All of a √batch pool every time; from a larger pool, other adapters batch by batch.
    assert len(groups) == 1 if num_adapters is None else len(groups) > 1


def test_identical_uses_one_adapter():
    assert {r.adapter for r in generate(WorkloadSpec(100, pattern="identical"))} == {"adapter-0"}


def test_skewed_hot_set_takes_its_share_and_moves():
    spec = WorkloadSpec(3_000, pattern="skewed", num_adapters=20, hot_size=4, hot_fraction=0.9,
                        hot_period=1_000, seed=0)
    requests = generate(spec)
    top_sets = []
    for period, chunk in enumerate(batches(requests, 1_000)):
        hot = {f"adapter-{(4 * period + j) % 20}" for j in range(4)}
        assert sum(r.adapter in hot for r in chunk) / len(chunk) == pytest.approx(0.9, abs=0.03)
        top_sets.append({name for name, _ in Counter(r.adapter for r in chunk).most_common(4)})
        assert top_sets[-1] == hot
    assert top_sets[0].isdisjoint(top_sets[1]) and top_sets[1].isdisjoint(top_sets[2])


def test_lengths_fixed_and_uniform_range():
    fixed = generate(WorkloadSpec(50, pattern="identical",
                                  lengths=LengthProfile(LengthRange.fixed(128), LengthRange.fixed(64))))
    assert {(r.input_len, r.output_len) for r in fixed} == {(128, 64)}
    ranged = generate(WorkloadSpec(20_000, pattern="identical", seed=0))  # S-LoRA's [8, 512]
    for lengths in ([r.input_len for r in ranged], [r.output_len for r in ranged]):
        assert min(lengths) == 8 and max(lengths) == 512
        assert statistics.fmean(lengths) == pytest.approx(260, rel=0.02)


def test_per_task_profiles_give_each_task_its_own_lengths():
    requests = generate(WorkloadSpec(2_000, pattern="powerlaw", task_lengths=SAMPLE_TASKS, seed=0))
    assert {r.adapter for r in requests} == set(SAMPLE_TASKS)
    for r in requests:
        profile = SAMPLE_TASKS[r.adapter]
        assert profile.input.low <= r.input_len <= profile.input.high
        assert profile.output.low <= r.output_len <= profile.output.high


@pytest.mark.parametrize("kwargs", [
    dict(pattern="zipf", num_adapters=4),
    dict(arrival="bursty"),
    dict(rate=0.0),
    dict(arrival="gamma", cv=-1.0),
    dict(pattern="powerlaw"),  # powerlaw needs num_adapters
    dict(pattern="powerlaw", num_adapters=4, alpha=-1.0),
    dict(pattern="distinct", batch_size=8, num_adapters=4),
    dict(pattern="uniform", batch_size=16, num_adapters=3),
    dict(pattern="skewed", num_adapters=4, hot_size=4),
    dict(pattern="identical", num_adapters=0),
    dict(task_lengths=SAMPLE_TASKS, num_adapters=3),
])
def test_bad_specs_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        WorkloadSpec(10, **kwargs)


def test_bad_length_range_is_a_config_error():
    with pytest.raises(ConfigError, match="low"):
        LengthRange(0, 5)
    with pytest.raises(ConfigError):
        LengthRange(10, 5)


def test_sample_trace_is_shipped_small_valid_and_regenerable(tmp_path):
    path = sample_trace_path()
    assert path.stat().st_size < 20_000
    assert write_sample_trace(tmp_path / "sample.csv", seed=0).read_bytes() == path.read_bytes()
    requests = read_trace(path)
    assert len(requests) == 200 and requests[0].arrival_s == 0.0
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(requests, requests[1:]))
    assert {r.adapter for r in requests} == set(SAMPLE_TASKS)
    assert all(SAMPLE_TASKS[r.adapter].output.low <= r.output_len <= SAMPLE_TASKS[r.adapter].output.high
               for r in requests)


def test_trace_round_trip_keeps_prompts_and_shifts_time_to_zero(tmp_path):
    original = [Request(0, 10.0, "sql", 12, 4, "select,\n\"x\""), Request(1, 10.25, "math", 7, 9)]
    requests = read_trace(write_trace(tmp_path / "t.csv", original))
    assert requests == [Request(0, 0.0, "sql", 12, 4, "select,\n\"x\""), Request(1, 0.25, "math", 7, 9)]
    assert requests[0].to_dict()["adapter"] == "sql"


HEADER = "timestamp,adapter,input_len,output_len\n"
GOOD = "0.5,sql,12,4\n"


@pytest.mark.parametrize("text,where,problem", [
    ("timestamp,adapter,input_len\n0,sql,12\n", "line 1", "output_len"),
    ("", "line 1", "missing column"),
    (HEADER + GOOD + "1.0,sql,,4\n", "line 3", "missing value for input_len"),
    (HEADER + GOOD + "1.0,sql,12\n", "line 3", "missing value for output_len"),
    (HEADER + GOOD + "1.0,,12,4\n", "line 3", "missing value for adapter"),
    (HEADER + "soon,sql,12,4\n", "line 2", "timestamp 'soon' is not a number"),
    (HEADER + GOOD + "1.0,sql,twelve,4\n", "line 3", "input_len 'twelve' is not an integer"),
    (HEADER + GOOD + "1.0,sql,12,4.5\n", "line 3", "output_len '4.5' is not an integer"),
    (HEADER + GOOD + "1.0,sql,-3,4\n", "line 3", "input_len -3 is negative"),
    (HEADER + "-1.0,sql,12,4\n", "line 2", "timestamp -1.0 is negative"),
    (HEADER + GOOD + "nan,sql,12,4\n", "line 3", "not a finite number"),
    (HEADER + GOOD + "1.0,sql,12,0\n", "line 3", "output_len is 0"),
    (HEADER + GOOD + "2.0,sql,12,4\n1.5,sql,12,4\n", "line 4", "timestamp 1.5 goes backwards"),
    (HEADER, "", "no rows"),
    (HEADER.replace("\n", ",prompt\n") + '0,sql,12,4,"two\nlines"\n1.0,sql,x,4,\n', "line 4", "input_len"),
])
def test_bad_trace_rows_are_data_errors_naming_the_line(tmp_path, text, where, problem):
    path = tmp_path / "trace.csv"
    path.write_text(text)
    with pytest.raises(DataError) as info:
        read_trace(path)
    assert where in str(info.value) and problem in str(info.value) and str(path) in str(info.value)


def test_missing_trace_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="cannot read"):
        read_trace(tmp_path / "nope.csv")
