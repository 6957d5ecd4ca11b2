"""Compare quantization runs: per-task reconstruction error from each checkpoint's report.json.

    python scripts/compare_reports.py out/agg-mix out/agg-mean out/agg-max

One markdown row per checkpoint: each task's mean (over layers) relative reconstruction error, the
mean over tasks, the mean over layers of the worst task, and the run's seconds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def row(checkpoint: Path) -> tuple[list[str], str]:
    report = json.loads((checkpoint / "report.json").read_text())
    errors = report["errors"]  # layer -> task -> error
    tasks = list(next(iter(errors.values())))
    per_task = [sum(layer[t] for layer in errors.values()) / len(errors) for t in tasks]
    worst = sum(max(layer.values()) for layer in errors.values()) / len(errors)
    cells = [f"{v:.2e}" for v in per_task] + [f"{sum(per_task) / len(per_task):.2e}", f"{worst:.2e}",
                                               f"{report['total_seconds']:.0f}"]
    return tasks, f"| {checkpoint.name} | " + " | ".join(cells) + " |"


def main(paths: list[str]) -> None:
    rows = [row(Path(p)) for p in paths]
    tasks = rows[0][0]
    print("| checkpoint | " + " | ".join(tasks) + " | mean | worst | seconds |")
    print("|---" * (len(tasks) + 4) + "|")
    for _, line in rows:
        print(line)


if __name__ == "__main__":
    main(sys.argv[1:])
