"""Rich progress bars and summary tables for long quantization runs."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn
from rich.table import Table

from inlaid.quant.calibrate import Reporter

console = Console(stderr=True)
NOTHING_WRITTEN = "interrupted: nothing was written"
_interrupt_note = NOTHING_WRITTEN


def set_interrupt_note(note: str) -> None:
    """What the entry point prints on Ctrl-C / SIGTERM: a command that keeps partial results says where."""
    global _interrupt_note
    _interrupt_note = note


def interrupt_note() -> str:
    return _interrupt_note


class RichReporter(Reporter):
    def __init__(self) -> None:
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                                 transient=True)
        self.layers = self.tasks = None

    def __enter__(self) -> "RichReporter":
        return self

    def __exit__(self, *exc) -> None:
        if self.layers is not None:
            self.progress.stop()

    def start(self, num_layers: int, num_tasks: int) -> None:
        # Started only here, once inputs are validated: an early error stays a single clean line.
        self.progress.start()
        self.layers = self.progress.add_task("layers", total=num_layers)
        self.tasks = self.progress.add_task("tasks in layer 0", total=num_tasks)

    def task_done(self, layer: int, task: str) -> None:
        self.progress.update(self.tasks, description=f"layer {layer}: {task}", advance=1)

    def layer_done(self, layer: int, seconds: float) -> None:
        self.progress.update(self.layers, advance=1)
        self.progress.reset(self.tasks, description=f"layer {layer + 1}")


def summary_table(report) -> Table:
    """Rows: layers; columns: tasks; cells: relative reconstruction error ||(W-Q)X||^2/||WX||^2."""
    table = Table(title=f"relative reconstruction error per layer and task -> {report.out_dir}")
    table.add_column("layer", justify="right")
    for task in next(iter(report.errors.values()), {}):
        table.add_column(task, justify="right")
    table.add_column("seconds", justify="right")
    for layer, per_task in report.errors.items():
        secs = report.layer_seconds[layer] if layer < len(report.layer_seconds) else float("nan")
        table.add_row(str(layer), *(f"{v:.2e}" for v in per_task.values()), f"{secs:.1f}")
    return table
