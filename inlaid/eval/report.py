"""Tables and files for an :class:`~inlaid.eval.runner.EvalResult`.

- relative drop of a variant on a task: ``(ref - score) / ref`` on the task's primary metric, where
  ``ref`` is the reference variant's score (fp16 by default). 0.05 means 5 % worse than the
  reference; negative means better. Undefined (``None``, shown "n/a") when ``ref`` is 0. For a
  lower-is-better metric (lm-eval perplexities) the sign is flipped, so a drop is always a loss.
- average relative drop: the mean of a variant's defined per-task drops, LoRA-Inlaid's headline
  number for a quantized variant.

``write_reports`` writes ``eval.json`` (all metrics, optionally every prediction), ``eval.md`` (the
markdown table) and ``eval.png`` (a bar chart: primary score per task and variant).
"""

from __future__ import annotations

import datetime
import json
import math
from dataclasses import dataclass
from pathlib import Path

from inlaid.errors import ConfigError
from inlaid.eval.runner import EvalResult

SCHEMA = "inlaid.eval/1"


def relative_drop(reference: float | None, score: float | None, higher_is_better: bool = True) -> float | None:
    if reference is None or score is None or not math.isfinite(reference) or reference == 0:
        return None
    drop = (reference - score) / abs(reference)
    return drop if higher_is_better else -drop


def average(values) -> float | None:
    """Mean of the values that are not None; None when there are none."""
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


@dataclass
class Row:
    task: str
    metric: str
    scores: dict[str, float | None]  # variant -> primary score
    drops: dict[str, float | None]  # variant -> relative drop vs the reference


@dataclass
class Summary:
    variants: list[str]
    reference: str
    rows: list[Row]
    average_drop: dict[str, float | None]


def summarize(result: EvalResult) -> Summary:
    variants, ref = result.variant_names, result.reference
    rows = []
    for name, task in result.tasks.items():
        metric = task.metrics[0]
        scores = {v: task.scores.get(v, {}).get(metric) for v in variants}
        drops = {v: relative_drop(scores[ref], scores[v], task.higher_is_better) for v in variants}
        rows.append(Row(name, metric, scores, drops))
    averages = {v: average(r.drops[v] for r in rows) for v in variants}
    return Summary(variants, ref, rows, averages)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def cell(score: float | None, drop: float | None, is_reference: bool) -> str:
    if score is None:
        return "—"
    return f"{score:.1f}" if is_reference else f"{score:.1f} (drop {_percent(drop)})"


def _header(summary: Summary, variant: str) -> str:
    return f"{variant} (ref)" if variant == summary.reference else variant


def _cells(summary: Summary) -> tuple[list[str], list[list[str]]]:
    header = ["task (metric)", *(_header(summary, v) for v in summary.variants)]
    body = [[f"{r.task} ({r.metric})",
             *(cell(r.scores[v], r.drops[v], v == summary.reference) for v in summary.variants)]
            for r in summary.rows]
    body.append(["average relative drop",
                 *("—" if v == summary.reference else _percent(summary.average_drop[v])
                   for v in summary.variants)])
    return header, body


def rich_table(summary: Summary, title: str = ""):
    from rich.table import Table

    header, body = _cells(summary)
    table = Table(title=title or None)
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right")
    for i, row in enumerate(body):
        table.add_row(*row, end_section=i == len(body) - 2)
    return table


def markdown_table(summary: Summary) -> str:
    header, body = _cells(summary)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body[:-1]]
    lines.append("| **" + body[-1][0] + "** | " + " | ".join(body[-1][1:]) + " |")
    return "\n".join(lines) + "\n"


def to_json(result: EvalResult, summary: Summary, include_predictions: bool = False) -> dict:
    tasks = {}
    for name, t in result.tasks.items():
        entry = {"metrics": list(t.metrics), "primary": t.metrics[0], "num_examples": t.num_examples,
                 "higher_is_better": t.higher_is_better, "scores": t.scores, "seconds": t.seconds}
        if include_predictions:
            entry["examples"] = [{"prompt": p, "reference": r,
                                  "predictions": {v: preds[i] for v, preds in t.predictions.items()}}
                                 for i, (p, r) in enumerate(zip(t.prompts, t.references))]
        tasks[name] = entry
    return {"schema": SCHEMA, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "reference": result.reference,
            "variants": [{"name": v.name, "source": v.source} for v in result.variants],
            "settings": result.settings, "skipped": result.skipped, "tasks": tasks,
            "summary": {"rows": [{"task": r.task, "metric": r.metric, "scores": r.scores, "drops": r.drops}
                                 for r in summary.rows],
                        "average_drop": summary.average_drop}}


def plot(summary: Summary, path: Path) -> Path:
    """Grouped bars: primary score per task (x) and variant (colour); the legend holds each
    variant's average relative drop."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ConfigError(f"the chart needs matplotlib: pip install matplotlib ({exc})") from exc
    num_tasks, num_variants = len(summary.rows), len(summary.variants)
    fig = Figure(figsize=(max(6.0, 1.1 * num_tasks * max(1, num_variants) ** 0.5 + 2), 4.5))
    ax = fig.add_subplot()
    width = 0.8 / max(num_variants, 1)
    for k, variant in enumerate(summary.variants):
        xs = [i + (k - (num_variants - 1) / 2) * width for i in range(num_tasks)]
        ys = [r.scores[variant] or 0.0 for r in summary.rows]
        label = variant if variant == summary.reference else \
            f"{variant} (avg drop {_percent(summary.average_drop[variant])})"
        bars = ax.bar(xs, ys, width=width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=6, padding=1)
    ax.set_xticks(range(num_tasks), [f"{r.task}\n{r.metric}" for r in summary.rows], fontsize=8,
                  rotation=30 if num_tasks > 5 else 0, ha="right" if num_tasks > 5 else "center")
    top = max([r.scores[v] or 0.0 for r in summary.rows for v in summary.variants], default=0.0)
    ax.set_ylim(0, top * 1.15 or 1.0)
    ax.set(ylabel="primary score", title=f"per-task primary score; drops relative to {summary.reference}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return Path(path)


def write_reports(result: EvalResult, out_dir: Path, include_predictions: bool = False,
                  stem: str = "eval") -> dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` into ``out_dir``; returns kind -> path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(result)
    paths = {"json": out_dir / f"{stem}.json", "markdown": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    paths["json"].write_text(json.dumps(to_json(result, summary, include_predictions), indent=2,
                                        ensure_ascii=False) + "\n")
    paths["markdown"].write_text(markdown_table(summary))
    plot(summary, paths["png"])
    return paths
