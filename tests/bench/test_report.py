"""Result files round trip, tables (ratios at the same sweep point) and plots, on hand-made results."""

import csv
import json
from dataclasses import asdict

import pytest

from inlaid.bench import plots, report
from inlaid.bench.metrics import RequestTimeline, summarize
from inlaid.bench.results import RunResult, load_results, metric, write_results
from inlaid.errors import DataError


def fake_result(name: str, num_adapters: int, scale: float, rate: float = 1.0) -> RunResult:
    """Two requests whose times are multiplied by ``scale`` (so throughput divides by it)."""
    timelines = [RequestTimeline(0.0, 0.25 * scale, 1.0 * scale, 8, 4, request_id=0, adapter="a"),
                 RequestTimeline(0.0, 0.5 * scale, 2.0 * scale, 8, 4, request_id=1, adapter="b")]
    summary = summarize(timelines, latency_slo_s=1.5).to_dict()
    return RunResult(name=name, target="engine", summary=summary, requests=[asdict(t) for t in timelines],
                     params={"num_adapters": num_adapters, "rate": rate, "sweep": ["num_adapters"]},
                     steps={"decode_latency_s": {"mean": 0.01 * scale}}, adapter_swaps=3)


RESULTS = [fake_result("inlaid", 1, 1.0), fake_result("hf-peft", 1, 4.0),
           fake_result("inlaid", 10, 2.0), fake_result("hf-peft", 10, 8.0)]


def test_files_round_trip(tmp_path):
    paths = write_results(RESULTS, tmp_path)
    assert {p.name for p in paths} >= {"results.json", "summary.csv", "inlaid_1_adapters.json",
                                       "hf-peft_10_adapters.requests.csv"}
    loaded = load_results([tmp_path / "results.json", tmp_path / "inlaid_1_adapters.json"])
    assert [r.to_dict() for r in loaded] == [r.to_dict() for r in RESULTS + RESULTS[:1]]
    rows = list(csv.DictReader(open(tmp_path / "summary.csv")))
    assert [r["name"] for r in rows] == ["inlaid", "hf-peft", "inlaid", "hf-peft"]
    assert float(rows[0]["output_tok_per_sec"]) == 4.0 and rows[0]["slo_attainment"] == "0.5"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "something-else"}))
    with pytest.raises(DataError, match="bad.json"):
        load_results([bad])


def test_metrics_and_ratio_columns_match_sweep_points():
    assert metric(RESULTS[0], "output_tok_per_sec") == 4.0 and metric(RESULTS[1], "output_tok_per_sec") == 1.0
    assert metric(RESULTS[0], "decode_roofline_fraction") is None
    header, rows = report.table_rows(RESULTS, columns=("output_tok_per_sec", "latency_mean_s", "kv_peak_mib"),
                                     ratios=("output_tok_per_sec",), reference="hf-peft")
    assert header == ["run", "output tok per sec", "latency mean ms", "output tok per sec × hf-peft"]
    assert [row[0] for row in rows] == ["inlaid 1 adapters", "hf-peft 1 adapters",
                                        "inlaid 10 adapters", "hf-peft 10 adapters"]
    assert [row[-1] for row in rows] == ["4.00", "1.00", "4.00", "1.00"]  # against hf-peft at the same count
    assert rows[0][2] == "1.5e+03"  # mean latency 1.5 s in ms
    header, rows = report.table_rows(RESULTS[:2], columns=("output_tok_per_sec",), reference="hf-peft",
                                     ratios=("output_tok_per_sec",), transpose=True)
    assert header == ["metric", "inlaid 1 adapters", "hf-peft 1 adapters"]
    assert rows == [["output tok per sec", "4", "1"], ["output tok per sec × hf-peft", "4.00", "1.00"]]
    assert report.default_reference(RESULTS) == "hf-peft"
    assert report.markdown_table(RESULTS[:1], columns=("adapter_swaps",)).splitlines()[2] == \
        "| inlaid 1 adapters | 3 |"


def test_plots_are_pngs(tmp_path):
    rates = [fake_result(n, 4, s, rate) for rate in (1.0, 2.0) for n, s in (("inlaid", rate), ("fcfs", 2 * rate))]
    for r in rates:
        r.params["sweep"] = ["rate"]
    paths = plots.make_plots(RESULTS, tmp_path / "a") + plots.make_plots(rates, tmp_path / "b")
    assert [p.name for p in paths] == ["latency_cdf.png", "throughput_vs_adapters.png", "latency_cdf.png",
                                       "slo_vs_rate.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
