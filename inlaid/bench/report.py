"""Tables of benchmark results: a rich table for the terminal, markdown for files, and ``emit`` for
the kernel benchmark scripts (stdout, and $OUT/<name> when OUT is set on GPU runs).

Every row is one run; a ratio column divides a metric by the reference run's value at the same
sweep point (the run named ``reference``: by default the first baseline of the run), so a row reads
"the number, and how many times the baseline's".
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from inlaid.bench.results import METRICS, RunResult, metric

SERVE_COLUMNS = ("req_per_sec", "output_tok_per_sec", "ttft_p50_s", "ttft_p99_s", "tpot_mean_s", "latency_mean_s",
                 "latency_p99_s", "slo_attainment", "prefill_step_mean_s", "decode_step_mean_s",
                 "adapters_per_step_mean", "adapter_swaps", "predictor_mae_tokens", "decode_roofline_fraction",
                 "kv_peak_mib", "num_failed")
SERVE_RATIOS = ("output_tok_per_sec",)


def emit(text: str, filename: str) -> None:
    print(text)
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, filename), "w") as fh:
            fh.write(text + "\n")


def _header(name: str) -> str:
    """'ttft_p50_s' -> 'ttft p50 ms': times are shown in milliseconds, fractions in percent."""
    if name.endswith("_s"):
        return name[:-2].replace("_", " ") + " ms"
    if name.endswith("fraction") or name == "slo_attainment":
        return name.replace("_", " ") + " %"
    return name.replace("_", " ")


def _cell(name: str, value: float | None) -> str:
    if value is None:
        return "–"
    if name.endswith("_s"):
        return f"{value * 1e3:.3g}"
    if name.endswith("fraction") or name == "slo_attainment":
        return f"{value * 100:.1f}"
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.4g}"


def _point(result: RunResult) -> tuple:
    return tuple(result.params.get(k) for k in result.params.get("sweep", ()))


def default_reference(results: Sequence[RunResult]) -> str | None:
    """The first run whose name differs from the first run's (the first baseline), else None."""
    names = list(dict.fromkeys(r.name for r in results))
    return names[1] if len(names) > 1 else None


def table_rows(results: Sequence[RunResult], columns: Sequence[str] = SERVE_COLUMNS,
               ratios: Sequence[str] = SERVE_RATIOS, reference: str | None = None,
               transpose: bool = False) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of formatted cells, a row per run (``transpose``: a row per metric); metrics no
    run has a value for are dropped."""
    columns = [c for c in columns if any(metric(r, c) is not None for r in results)]
    ratios = [c for c in ratios if c in columns] if reference else []
    header = ["run", *[_header(c) for c in columns], *[_ratio_header(c, reference) for c in ratios]]
    rows = [[r.label, *[_cell(c, metric(r, c)) for c in columns], *_ratio_cells(results, r, ratios, reference)]
            for r in results]
    if transpose:
        return ["metric", *(row[0] for row in rows)], [list(col) for col in zip(header[1:], *(row[1:] for row in rows))]
    return header, rows


def _ratio_header(name: str, reference: str | None) -> str:
    return f"{_header(name).removesuffix(' ms').removesuffix(' %')} × {reference}"


def _ratio_cells(results: Sequence[RunResult], result: RunResult, ratios: Sequence[str],
                 reference: str | None) -> list[str]:
    """``result``'s value over the reference run's at the same sweep point, per ratio metric."""
    ref = next((r for r in results if r.name == reference and _point(r) == _point(result)), None)
    cells = []
    for c in ratios:
        mine, theirs = metric(result, c), metric(ref, c) if ref is not None else None
        cells.append(f"{mine / theirs:.2f}" if mine is not None and theirs else "–")
    return cells


def rich_table(results: Sequence[RunResult], title: str = "", **kwargs):
    from rich.table import Table

    header, rows = table_rows(results, **kwargs)
    table = Table(title=title or None)
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table


def markdown_table(results: Sequence[RunResult], **kwargs) -> str:
    header, rows = table_rows(results, **kwargs)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def check_columns(columns: Sequence[str]) -> None:
    unknown = [c for c in columns if c not in METRICS]
    if unknown:
        from inlaid.errors import ConfigError

        raise ConfigError(f"unknown metric {unknown[0]!r}; known: {', '.join(METRICS)}")
