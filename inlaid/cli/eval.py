"""``inlaid eval``: flags -> EvalConfig -> inlaid.eval (runner, report, perplexity, lm-eval bridge).

    inlaid eval MODEL [MORE ...]                  per-task scores and relative drop vs the first
    inlaid eval --perplexity FILE MODEL [...]     perplexity of a text file
    inlaid eval --export-lm-eval DIR              the task suite as lm-eval YAML tasks
    inlaid eval --lm-eval-tasks NAMES --lm-eval-include DIR MODEL [...]   run lm-eval tasks
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from inlaid.cli.progress import console
from inlaid.errors import ConfigError
from inlaid.paths import check_writable_dir
from inlaid.eval.runner import (BACKENDS, DEFAULT_ADAPTERS, DEFAULT_DATA, EvalReporter, example_dir,
                                unique_variants)


PPL, LM = "Perplexity", "lm-evaluation-harness"
Models = Annotated[Optional[list[str]], typer.Argument(
    help="fp16 HF dir, 'default' or an inlaid checkpoint, optionally NAME=SOURCE; the first is the reference.",
    show_default=False)]
Tasks = Annotated[str, typer.Option("--tasks", "-t", help="'all' or comma-separated task names.")]
Limit = Annotated[Optional[int], typer.Option(help="First N test rows per task.")]
AdaptersDir = Annotated[Optional[Path], typer.Option(
    "--adapters", help=f"Adapter root: <DIR>/<task> is a task's PEFT adapter (default: {DEFAULT_ADAPTERS}, here "
                       "or in the source checkout).", show_default=False)]
DataDir = Annotated[Optional[Path], typer.Option(
    help=f"Task data root: <DIR>/<task>/test.jsonl, generated if absent (default: {DEFAULT_DATA}, here or in "
         "the source checkout).", show_default=False)]
Out = Annotated[Path, typer.Option(help="Output directory (JSON, markdown, PNG).")]
Reference = Annotated[Optional[str], typer.Option(help="Variant the drops are relative to (default: the first).")]
Device = Annotated[Optional[str], typer.Option(help="cpu or cuda (default: cuda when available).")]
Seed = Annotated[int, typer.Option(help="Seed for generated test rows (tasks without a data file).")]
Backend = Annotated[str, typer.Option(help=f"Generation backend: {' or '.join(BACKENDS)} (HF + PEFT, fp16 only).")]
SavePredictions = Annotated[bool, typer.Option("--save-predictions", help="Store every prediction in the JSON.")]
MaxNumSeqs = Annotated[Optional[int], typer.Option(help="Engine batch size (requests in flight).")]
PerplexityFile = Annotated[Optional[Path], typer.Option(
    "--perplexity", help="Perplexity of each model on this text file instead of the task suite.", rich_help_panel=PPL)]
WithAdapter = Annotated[Optional[str], typer.Option(
    help="With the adapter <--adapters>/<TASK> active.", rich_help_panel=PPL)]
Window = Annotated[Optional[int], typer.Option(
    help="Tokens per window (default: the context, at most 2048).", rich_help_panel=PPL)]
Stride = Annotated[Optional[int], typer.Option(
    help="Positions scored per window (default: window - 1).", rich_help_panel=PPL)]
ExportDir = Annotated[Optional[Path], typer.Option(
    "--export-lm-eval", help="Write the tasks (--tasks, --limit) as lm-eval YAML tasks into this directory.",
    rich_help_panel=LM)]
LmEvalTasks = Annotated[Optional[str], typer.Option(
    help="Run these lm-eval tasks (comma-separated) on every MODEL.", rich_help_panel=LM)]
LmEvalInclude = Annotated[Optional[Path], typer.Option(
    help="lm-eval include_path (default: the --export-lm-eval directory).", rich_help_panel=LM)]
LmEvalAdapter = Annotated[str, typer.Option(
    help="'task' (the adapter named like each task), 'none' or an adapter name.", rich_help_panel=LM)]


class RichEvalReporter(EvalReporter):
    """One progress bar per (variant, task); a line per finished pair."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=console, transient=True)
        self.bar = None

    def __enter__(self) -> "RichEvalReporter":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def skip(self, task, reason):
        console.print(f"[yellow]skipping {task}: {reason}[/yellow]")

    def start(self, variant, task, total):
        self.bar = self.progress.add_task(f"{variant} · {task}", total=total)

    def advance(self, done, total):
        self.progress.update(self.bar, completed=done)

    def done(self, variant, task, scores, seconds):
        self.progress.remove_task(self.bar)
        shown = ", ".join(f"{k} {v:.1f}" for k, v in scores.items())
        console.print(f"{variant} · {task}: {shown} ({seconds:.1f} s)")

    def bar_progress(self, variant: str, done: int, total: int) -> None:
        """For the perplexity run: a bar per variant."""
        if self.bar is None or self.progress.tasks[-1].description != variant:
            self.bar = self.progress.add_task(variant, total=total)
        self.progress.update(self.bar, completed=done, total=total)


def _tasks(text: str):
    from inlaid.eval.tasks import TASKS, get_task

    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError("--tasks: give 'all' or comma-separated task names")
    return list(TASKS.values()) if names == ["all"] else [get_task(n) for n in names]


def _show(result, out: Path, stem: str, save_predictions: bool = False, title: str = "") -> None:
    from inlaid.eval import report

    summary = report.summarize(result)
    console.print(report.rich_table(summary, title=title))
    paths = report.write_reports(result, out, include_predictions=save_predictions, stem=stem)
    console.print(f"wrote {', '.join(str(p) for p in paths.values())}")


def _perplexity(variants, file: Path, with_adapter, adapters: Path, device, window, stride, options,
                out: Path) -> None:
    import json

    from rich.table import Table

    from inlaid.eval.perplexity import check_window, run_perplexity

    check_window(window, stride)
    with RichEvalReporter() as reporter:
        results = run_perplexity(variants, file, with_adapter, adapters, device, window, stride, options,
                                 progress=reporter.bar_progress)
    table = Table(title=f"perplexity of {file}" + (f" with adapter {with_adapter}" if with_adapter else ""))
    for name in ("variant", "tokens", "nll / token", "perplexity", f"vs {results[0].variant}"):
        table.add_column(name, justify="left" if name == "variant" else "right")
    for r in results:
        table.add_row(r.variant, str(r.num_tokens), f"{r.nll / r.num_tokens:.4f}", f"{r.perplexity:.3f}",
                      f"{r.perplexity / results[0].perplexity:.3f}x")
    console.print(table)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "perplexity.json"
    path.write_text(json.dumps({"file": str(file), "adapter": with_adapter,
                                "results": [r.to_dict() for r in results]}, indent=2) + "\n")
    console.print(f"wrote {path}")


def eval_cmd(
    models: Models = None,
    tasks: Tasks = "all",
    limit: Limit = None,
    adapters: AdaptersDir = None,
    data: DataDir = None,
    out: Out = Path("results"),
    reference: Reference = None,
    device: Device = None,
    seed: Seed = 0,
    backend: Backend = "engine",
    save_predictions: SavePredictions = False,
    max_num_seqs: MaxNumSeqs = None,
    perplexity: PerplexityFile = None,
    with_adapter: WithAdapter = None,
    window: Window = None,
    stride: Stride = None,
    export_lm_eval: ExportDir = None,
    lm_eval_tasks: LmEvalTasks = None,
    lm_eval_include: LmEvalInclude = None,
    lm_eval_adapter: LmEvalAdapter = "task",
) -> None:
    """Per-task accuracy of model variants (fp16 vs quantized), each task with its own LoRA adapter."""
    variants = unique_variants(models or [])
    options = {} if max_num_seqs is None else {"max_num_seqs": max_num_seqs}
    adapters = example_dir(DEFAULT_ADAPTERS) if adapters is None else adapters
    data = example_dir(DEFAULT_DATA) if data is None else data
    # a bad output path found after the models ran would lose every score
    if export_lm_eval is not None:
        check_writable_dir(export_lm_eval, "--export-lm-eval")
    if export_lm_eval is None or lm_eval_tasks is not None:
        check_writable_dir(out, "--out")
    if export_lm_eval is not None:
        from inlaid.eval.lm_eval_export import export_lm_eval as export

        written = export(_tasks(tasks), export_lm_eval, data, limit, seed)
        console.print(f"wrote {len(written)} lm-eval tasks ({', '.join(written)}) and group inlaid_suite "
                      f"into {export_lm_eval}")
        if lm_eval_tasks is None:
            return
    if not variants:
        raise ConfigError("give at least one MODEL (an fp16 dir, 'default' or an inlaid checkpoint)")
    if perplexity is not None and lm_eval_tasks is not None:
        raise ConfigError("--perplexity and --lm-eval-tasks are separate runs: give one of them")
    if perplexity is not None:
        return _perplexity(variants, perplexity, with_adapter, adapters, device, window, stride, options, out)
    if lm_eval_tasks is not None:
        from inlaid.eval.lm_eval_run import run_lm_eval

        names = [n.strip() for n in lm_eval_tasks.split(",") if n.strip()]
        result = run_lm_eval(variants, names, lm_eval_include or export_lm_eval, lm_eval_adapter,
                             adapters if adapters.is_dir() else None, limit, device or "cpu",
                             reference=reference, engine_options=options)
        return _show(result, out, "lm_eval", save_predictions, title="lm-eval")
    from inlaid.eval.runner import EvalConfig, run_eval

    config = EvalConfig(variants=variants, tasks=_tasks(tasks), adapters_dir=adapters, data_dir=data, limit=limit,
                        seed=seed, reference=reference, device=device, backend=backend, engine_options=options)
    with RichEvalReporter() as reporter:
        result = run_eval(config, reporter)
    _show(result, out, "eval", save_predictions, title=f"relative drop vs {result.reference}")
