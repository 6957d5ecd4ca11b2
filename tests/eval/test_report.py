"""Eval table math (relative drop, average) on hand-made numbers, and the report files."""

import json

import pytest
from rich.console import Console

from inlaid.eval import report
from inlaid.eval.runner import EvalResult, TaskResult, Variant


def test_relative_drop_and_average():
    assert report.relative_drop(50.0, 40.0) == pytest.approx(0.2)
    assert report.relative_drop(50.0, 55.0) == pytest.approx(-0.1)  # better than the reference
    assert report.relative_drop(80.0, 80.0) == 0.0
    assert report.relative_drop(0.0, 10.0) is None  # undefined, not infinite
    assert report.relative_drop(None, 10.0) is None and report.relative_drop(10.0, None) is None
    assert report.relative_drop(10.0, 12.0, higher_is_better=False) == pytest.approx(0.2)  # perplexity up
    assert report.average([0.2, None, -0.1]) == pytest.approx(0.05)
    assert report.average([None]) is None


def hand_made() -> EvalResult:
    variants = [Variant("fp16", "default"), Variant("w4", "ckpt4"), Variant("w2", "ckpt2")]
    tasks = {
        "arithmetic": TaskResult("arithmetic", ("numeric_match", "exact_match"), 4,
                                 scores={"fp16": {"numeric_match": 50.0, "exact_match": 25.0},
                                         "w4": {"numeric_match": 40.0, "exact_match": 25.0},
                                         "w2": {"numeric_match": 0.0, "exact_match": 0.0}},
                                 predictions={"fp16": ["1", "2", "3", "4"], "w4": ["1", "2", "3", "5"],
                                              "w2": ["", "", "", ""]},
                                 prompts=["a", "b", "c", "d"], references=["1", "2", "9", "9"]),
        "sentiment": TaskResult("sentiment", ("accuracy",), 4,
                                scores={"fp16": {"accuracy": 80.0}, "w4": {"accuracy": 88.0},
                                        "w2": {"accuracy": 20.0}}),
        "never": TaskResult("never", ("exact_match",), 4,
                            scores={"fp16": {"exact_match": 0.0}, "w4": {"exact_match": 25.0},
                                    "w2": {"exact_match": 0.0}}),
    }
    return EvalResult(variants, "fp16", tasks, skipped={"python_expr": "no adapter"})


def test_summary_rows_and_average_drop():
    summary = report.summarize(hand_made())
    rows = {r.task: r for r in summary.rows}
    assert rows["arithmetic"].metric == "numeric_match"  # the primary metric
    assert rows["arithmetic"].drops == {"fp16": 0.0, "w4": pytest.approx(0.2), "w2": pytest.approx(1.0)}
    assert rows["sentiment"].drops["w4"] == pytest.approx(-0.1)
    assert rows["never"].drops["w4"] is None  # reference scored 0: left out of the average
    assert summary.average_drop["w4"] == pytest.approx((0.2 - 0.1) / 2)
    assert summary.average_drop["w2"] == pytest.approx((1.0 + 0.75) / 2)
    assert summary.average_drop["fp16"] == 0.0


def test_markdown_and_rich_tables():
    summary = report.summarize(hand_made())
    md = report.markdown_table(summary).splitlines()
    assert md[0] == "| task (metric) | fp16 (ref) | w4 | w2 |"
    assert md[2] == "| arithmetic (numeric_match) | 50.0 | 40.0 (drop 20.0%) | 0.0 (drop 100.0%) |"
    assert md[3] == "| sentiment (accuracy) | 80.0 | 88.0 (drop -10.0%) | 20.0 (drop 75.0%) |"
    assert md[4] == "| never (exact_match) | 0.0 | 25.0 (drop n/a) | 0.0 (drop n/a) |"
    assert md[5] == "| **average relative drop** | — | 5.0% | 87.5% |"
    console = Console(record=True, width=160)
    console.print(report.rich_table(summary, title="t"))
    text = console.export_text()
    assert "average relative drop" in text and "87.5%" in text and "40.0 (drop 20.0%)" in text


def test_write_reports(tmp_path):
    result = hand_made()
    paths = report.write_reports(result, tmp_path / "out", include_predictions=True)
    data = json.loads(paths["json"].read_text())
    assert data["schema"] == report.SCHEMA and data["reference"] == "fp16"
    assert data["tasks"]["arithmetic"]["scores"]["w4"] == {"numeric_match": 40.0, "exact_match": 25.0}
    assert data["tasks"]["arithmetic"]["examples"][3] == {"prompt": "d", "reference": "9",
                                                          "predictions": {"fp16": "4", "w4": "5", "w2": ""}}
    assert data["summary"]["average_drop"]["w4"] == pytest.approx(0.05)
    assert data["skipped"] == {"python_expr": "no adapter"}
    assert "average relative drop" in paths["markdown"].read_text()
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plain = json.loads(report.write_reports(result, tmp_path / "plain")["json"].read_text())
    assert "examples" not in plain["tasks"]["arithmetic"]
