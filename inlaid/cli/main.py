"""The ``inlaid`` entry point. Known errors print one line and exit 1; ``--debug`` shows tracebacks."""

from __future__ import annotations

import logging
import os
import signal
import sys

import typer

from inlaid import __version__
from inlaid.cli import bench, quantize, serve
from inlaid.cli import eval as eval_cli
from inlaid.cli.progress import NOTHING_WRITTEN, interrupt_note, set_interrupt_note
from inlaid.errors import InlaidError

app = typer.Typer(help="Multi-task GPTQ quantization and multi-LoRA serving on one low-bit base.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
app.command("quantize")(quantize.quantize_cmd)
app.command("add-task")(quantize.add_task_cmd)
app.command("serve")(serve.serve_cmd)
app.command("eval")(eval_cli.eval_cmd)
app.add_typer(bench.app, name="bench")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"inlaid {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks and debug logs."),
) -> None:
    if debug:
        os.environ["INLAID_DEBUG"] = "1"
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


def _interrupt_on_sigterm() -> None:
    """SIGTERM takes the same clean-up path as Ctrl-C (temp checkpoint dirs removed)."""

    def handler(_signum, _frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. embedded use): leave signals alone
        pass


def main() -> None:
    _interrupt_on_sigterm()
    set_interrupt_note(NOTHING_WRITTEN)
    try:
        # Non-standalone mode lets InlaidError reach us; Typer turns Ctrl-C into exit code 130 and
        # returns exit codes of typer.Exit instead of raising them.
        code = app(standalone_mode=False)
    except InlaidError as exc:
        if os.environ.get("INLAID_DEBUG"):
            raise
        typer.secho(f"error: {exc}", err=True, fg="red")
        sys.exit(1)
    except KeyboardInterrupt:
        code = 130
    except typer.Abort:
        typer.secho("aborted", err=True)
        sys.exit(1)
    except Exception as exc:  # usage errors: Click's own message and exit code
        if callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            sys.exit(exc.exit_code)
        raise
    if code == 130:
        typer.secho(interrupt_note(), err=True, fg="yellow")
    if isinstance(code, int) and code:
        sys.exit(code)
