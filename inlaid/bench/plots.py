"""PNG plots of benchmark results (matplotlib, Agg backend: no display needed).

- ``latency_cdf.png``: the CDF of end-to-end latency (JCT) per run;
- ``throughput_vs_adapters.png``: output tok/s vs the number of adapters, a line per variant;
- ``slo_vs_rate.png``: SLO attainment and mean JCT vs the arrival rate, a line per variant;
- ``latency_vs_batch.png``: decode step and prefill latency vs batch size, per variant and pattern.

``make_plots`` draws the ones the results can fill (a line needs two points of its x variable).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from inlaid.bench.results import RunResult, metric
from inlaid.errors import ConfigError


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise ConfigError(f"plots need matplotlib: pip install matplotlib ({exc})") from exc
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    fig.clf()
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def latency_cdf(results: Sequence[RunResult], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        latencies = sorted(t.latency_s for t in r.timelines() if t.is_ok)
        if latencies:
            n = len(latencies)
            ax.step(latencies, [(i + 1) / n for i in range(n)], where="post", label=r.label)
    ax.set(xlabel="end-to-end latency (JCT), s", ylabel="fraction of requests", ylim=(0, 1.02),
           title="latency CDF")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def _lines(results: Sequence[RunResult], x_key: str, y_metric: str, group=lambda r: r.name):
    """{line label: sorted [(x, y)]} over results that have both values."""
    lines = defaultdict(list)
    for r in results:
        x, y = r.params.get(x_key), metric(r, y_metric)
        if x is not None and y is not None:
            lines[group(r)].append((x, y))
    return {k: sorted(v) for k, v in lines.items()}


def _plot_lines(ax, lines: dict, **labels) -> None:
    for name, points in lines.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.set(**labels)
    if labels.get("xscale") == "log":  # tick the measured points, not powers of ten
        xs = sorted({p[0] for points in lines.values() for p in points})
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.minorticks_off()
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def throughput_vs_adapters(results: Sequence[RunResult], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _plot_lines(ax, _lines(results, "num_adapters", "output_tok_per_sec"), xscale="log",
                xlabel="number of adapters", ylabel="output tokens / s", title="throughput vs adapters")
    return _save(fig, path)


def slo_vs_rate(results: Sequence[RunResult], path: Path) -> Path:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    _plot_lines(left, _lines(results, "rate", "slo_attainment"), xlabel="arrival rate, req/s",
                ylabel="SLO attainment", ylim=(-0.02, 1.02), title="SLO attainment vs rate")
    _plot_lines(right, _lines(results, "rate", "latency_mean_s"), xlabel="arrival rate, req/s",
                ylabel="mean JCT, s", title="JCT vs rate")
    return _save(fig, path)


def latency_vs_batch(results: Sequence[RunResult], path: Path) -> Path:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    group = lambda r: f"{r.name} {r.params.get('pattern')}"  # noqa: E731
    _plot_lines(left, _lines(results, "batch_size", "decode_step_mean_s", group), xscale="log", yscale="log",
                xlabel="batch", ylabel="decode step, s", title="decode step latency")
    _plot_lines(right, _lines(results, "batch_size", "prefill_step_mean_s", group), xscale="log", yscale="log",
                xlabel="batch", ylabel="prefill step, s", title="prefill latency")
    return _save(fig, path)


def _varies(results: Sequence[RunResult], key: str) -> bool:
    """The results take two values or more of ``key`` and, when they come from a sweep, it is a swept key."""
    swept = {k for r in results for k in r.params.get("sweep", ())}
    values = {r.params.get(key) for r in results if r.params.get(key) is not None}
    return len(values) > 1 and (not swept or key in swept)


def make_plots(results: Sequence[RunResult], out_dir: str | Path) -> list[Path]:
    """Every plot the results can fill, into ``out_dir``; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [latency_cdf(results, out / "latency_cdf.png")]
    if _varies(results, "num_adapters"):
        paths.append(throughput_vs_adapters(results, out / "throughput_vs_adapters.png"))
    if _varies(results, "rate") and any(metric(r, "slo_attainment") is not None for r in results):
        paths.append(slo_vs_rate(results, out / "slo_vs_rate.png"))
    if _varies(results, "batch_size") and any(metric(r, "decode_step_mean_s") is not None for r in results):
        paths.append(latency_vs_batch(results, out / "latency_vs_batch.png"))
    return paths
