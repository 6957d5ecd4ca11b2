"""Metric math on hand-made timelines whose answers are worked out by hand (binary fractions, so the
percentiles, TTFT, TPOT, JCT and SLO attainment compare exactly)."""

import json

import pytest

from inlaid.bench.metrics import (RequestTimeline, Stats, StepRecord, percentile, slo_attainment,
                                  summarize, summarize_steps)
from inlaid.errors import DataError

# A: 5 tokens, TTFT 0.5, latency 2.5, TPOT (2.5 - 0.5) / 4 = 0.5
# B: 3 tokens, TTFT 0.25, latency 1.75, TPOT (2.75 - 1.25) / 2 = 0.75
# C: 1 token, TTFT 1, latency 1, no TPOT
# D: failed
TIMELINES = [
    RequestTimeline(0.0, 0.5, 2.5, input_tokens=10, output_tokens=5, request_id=0),
    RequestTimeline(1.0, 1.25, 2.75, input_tokens=20, output_tokens=3, request_id=1),
    RequestTimeline(2.0, 3.0, 3.0, input_tokens=30, output_tokens=1, request_id=2),
    RequestTimeline(3.0, None, 4.0, input_tokens=40, output_tokens=0, request_id=3, error="timeout"),
]


def test_per_request_ttft_tpot_latency():
    a, b, c, d = TIMELINES
    assert (a.ttft_s, a.tpot_s, a.latency_s) == (0.5, 0.5, 2.5)
    assert (b.ttft_s, b.tpot_s, b.latency_s) == (0.25, 0.75, 1.75)
    assert (c.ttft_s, c.tpot_s, c.latency_s) == (1.0, None, 1.0)
    assert (d.is_ok, d.ttft_s, d.tpot_s, d.latency_s) == (False, None, None, None)


def test_summary_throughput_makespan_and_latency_stats():
    s = summarize(TIMELINES)
    assert (s.num_requests, s.num_completed, s.num_failed) == (4, 3, 1)
    assert s.makespan_s == 4.0  # first arrival 0 -> last finish 4 (the failed request's)
    assert s.request_throughput == 3 / 4
    assert s.output_throughput == (5 + 3 + 1) / 4
    assert (s.total_input_tokens, s.total_output_tokens) == (60, 9)
    assert s.ttft_s == Stats(3, pytest.approx(1.75 / 3), 0.5, 1.0, 1.0, 1.0)
    assert s.tpot_s == Stats(2, 0.625, 0.5, 0.75, 0.75, 0.75)
    assert s.latency_s == Stats(3, pytest.approx(5.25 / 3), 1.75, 2.5, 2.5, 2.5)
    assert s.slo is None


@pytest.mark.parametrize("ttft,latency,met", [
    (0.5, None, 2),  # A and B; C's TTFT is 1; D failed
    (None, 1.75, 2),  # B (exactly at the SLO counts) and C
    (0.5, 1.75, 1),  # both SLOs: only B
    (10.0, 10.0, 3),  # a failed request never meets an SLO
])
def test_slo_attainment_counts_every_request(ttft, latency, met):
    result = slo_attainment(TIMELINES, ttft_slo_s=ttft, latency_slo_s=latency)
    assert (result.num_met, result.attainment) == (met, met / 4)
    assert summarize(TIMELINES, ttft_slo_s=ttft, latency_slo_s=latency).slo == result


def test_slo_needs_an_slo_and_requests():
    with pytest.raises(ValueError):
        slo_attainment(TIMELINES)
    with pytest.raises(DataError):
        slo_attainment([], ttft_slo_s=1.0)


def test_nearest_rank_percentiles():
    hundred = list(range(100, 0, -1))  # unsorted on purpose
    assert [percentile(hundred, q) for q in (1, 50, 90, 99, 100)] == [1, 50, 90, 99, 100]
    ten = [float(v) for v in range(1, 11)]
    assert [percentile(ten, q) for q in (50, 90, 99, 25)] == [5.0, 9.0, 10.0, 3.0]  # rank ceil(q*n/100)
    assert percentile([7.0], 99) == 7.0
    for values, q in (([], 50), ([1.0], 0), ([1.0], 101)):
        with pytest.raises(ValueError):
            percentile(values, q)


def test_stats_skip_undefined_values_and_handle_none_at_all():
    assert Stats.of([None, 2.0, None, 4.0]) == Stats(2, 3.0, 2.0, 4.0, 4.0, 4.0)
    assert Stats.of([]) == Stats(0, None, None, None, None, None)


def test_timeline_from_token_times():
    t = RequestTimeline.from_token_times(0.0, [0.5, 0.75, 1.0, 1.5], input_tokens=8, request_id=7)
    assert (t.first_token_s, t.finish_s, t.output_tokens, t.request_id) == (0.5, 1.5, 4, 7)
    assert t.tpot_s == pytest.approx(1.0 / 3)
    for times in ([], [1.0, 0.5]):
        with pytest.raises(DataError):
            RequestTimeline.from_token_times(0.0, times, input_tokens=8)


@pytest.mark.parametrize("kwargs", [
    dict(arrival_s=1.0, first_token_s=0.5, finish_s=2.0, output_tokens=2),  # token before arrival
    dict(arrival_s=0.0, first_token_s=2.0, finish_s=1.0, output_tokens=2),  # finish before first token
    dict(arrival_s=0.0, first_token_s=None, finish_s=1.0, output_tokens=2),  # completed, no first token
    dict(arrival_s=0.0, first_token_s=0.5, finish_s=1.0, output_tokens=0),  # completed, no tokens
    dict(arrival_s=2.0, first_token_s=None, finish_s=1.0, output_tokens=0, error="x"),  # failed in the past
])
def test_impossible_timelines_are_data_errors(kwargs):
    with pytest.raises(DataError):
        RequestTimeline(input_tokens=4, **kwargs)


def test_summaries_serialize_to_json():
    s = summarize(TIMELINES, ttft_slo_s=0.5)
    data = json.loads(json.dumps(s.to_dict()))
    assert data == s.to_dict()
    assert data["ttft_s"]["p90"] == 1.0 and data["slo"]["attainment"] == 0.5
    assert data["tpot_s"]["count"] == 2


def test_zero_length_run_has_no_throughput_and_empty_run_is_an_error():
    s = summarize([RequestTimeline(0.0, 0.0, 0.0, input_tokens=1, output_tokens=1)])
    assert (s.makespan_s, s.request_throughput, s.output_throughput) == (0.0, None, None)
    with pytest.raises(DataError):
        summarize([])


def test_step_summary_by_kind_and_distinct_adapters():
    steps = [
        StepRecord(0.25, num_prefill_tokens=300, num_decode_tokens=0, adapters=("a", "b", "a"),
                   num_adapter_loads=2),
        StepRecord(0.5, num_prefill_tokens=100, num_decode_tokens=0, adapters=("c",), num_adapter_loads=1),
        StepRecord(0.125, num_prefill_tokens=0, num_decode_tokens=4, adapters=("a", "b", "c", "c")),
        StepRecord(0.0625, num_prefill_tokens=0, num_decode_tokens=3, adapters=("a", "a", "a")),
        StepRecord(0.0625, num_prefill_tokens=0, num_decode_tokens=2),  # base model only
        StepRecord(0.375, num_prefill_tokens=64, num_decode_tokens=3, adapters=("a", "b")),
    ]
    assert [s.kind for s in steps] == ["prefill", "prefill", "decode", "decode", "decode", "mixed"]
    summary = summarize_steps(steps)
    assert summary.num_steps == 6 and summary.total_adapter_loads == 3
    assert summary.prefill_latency_s == Stats(2, 0.375, 0.25, 0.5, 0.5, 0.5)
    assert summary.decode_latency_s == Stats(3, 0.25 / 3, 0.0625, 0.125, 0.125, 0.125)
    assert summary.mixed_latency_s == Stats(1, 0.375, 0.375, 0.375, 0.375, 0.375)
    # distinct adapters per step: 2, 1, 3, 1, 0, 2 -> sorted 0 1 1 2 2 3
    assert summary.adapters_per_step == Stats(6, 1.5, 1, 3, 3, 3)
    assert json.loads(json.dumps(summary.to_dict()))["adapters_per_step"]["p50"] == 1
    # requests decoding per step, over the steps that decode: 4, 3, 2, 3
    assert summary.decode_batch_size == Stats(4, 3.0, 3, 4, 4, 4)
