"""scripts/timeline.py: a step's wall time split over the main chain's kernels and gaps."""

import pytest

from ..conftest import load_script

timeline = load_script("timeline")


def test_charges_add_up_to_the_span_and_follow_the_main_chain():
    # a norm, a GEMM launched early (PDL) that ends after the side branch's shrink, a gap in which
    # the join waits on a second shrink, then idle launch latency before the last norm
    intervals = [
        ("norm", 0.0, 10.0),
        ("gemm", 4.0, 30.0),  # started during the norm: charged 10 -> 30 only
        ("FillFunctor", 10.0, 11.0),
        ("_lora_shrink_kernel", 11.0, 20.0),  # ends under the GEMM: charged nothing
        ("_lora_shrink_kernel", 30.0, 38.0),
        ("attn", 40.0, 50.0),  # gap 30 -> 40: the join waited on the shrink ending at 38
        ("norm", 53.0, 60.0),  # gap 50 -> 53: nothing ended on the side branch: idle
    ]
    span, charged = timeline.exposed(intervals)
    assert span == 60.0
    assert charged == {"norm": 17.0, "gemm": 20.0, "gap: _lora_shrink_kernel": 10.0, "attn": 10.0,
                       "gap: idle": 3.0}
    assert sum(charged.values()) == pytest.approx(span)
    # with no side branch the shrinks are main-chain kernels and take their own stretches
    span, charged = timeline.exposed(intervals, side=())
    assert span == 60.0 and charged["_lora_shrink_kernel"] == 8.0 + 9.0
    assert sum(charged.values()) == pytest.approx(span)


def test_no_gap_while_a_later_ending_kernel_runs():
    # b starts after the norm ends, but the GEMM (ending last) started before: no idle stretch
    intervals = [("norm", 0.0, 10.0), ("gemm", 8.0, 40.0), ("b", 20.0, 25.0)]
    span, charged = timeline.exposed(intervals)
    assert span == 40.0
    assert charged == {"norm": 10.0, "b": 15.0, "gemm": 15.0}


def test_reads_kernels_from_a_chrome_trace():
    trace = {"traceEvents": [
        {"ph": "X", "cat": "kernel", "name": "a", "ts": 5, "dur": 10, "tid": "stream 7"},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 0, "dur": 2, "tid": 7},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 50, "tid": 1},
        {"ph": "X", "cat": "kernel", "name": "b", "ts": 6, "dur": 1, "tid": 9},
    ]}
    intervals = timeline.kernels_from_trace(trace)
    assert sorted(intervals) == [("Memcpy HtoD", 0.0, 2.0), ("a", 5.0, 15.0), ("b", 6.0, 7.0)]
    lines = timeline.table(intervals, steps=1)
    assert "0.015 ms/step" in lines[0]
    # by end: the copy 0 -> 2, idle 2 -> 5 (a starts at 5: no gap after that), b 5 -> 7, a 7 -> 15
    assert any("53.3%" in line and line.endswith("  a") for line in lines[1:])
    assert any("20.0%" in line and line.endswith("gap: idle") for line in lines[1:])
    assert any("13.3%" in line and line.endswith("  b") for line in lines[1:])
