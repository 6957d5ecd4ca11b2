"""The ``inlaid`` entry point. Known errors print one line and exit 1; ``--debug`` shows tracebacks."""

from __future__ import annotations

import logging
import os
import sys

import typer

from inlaid import __version__
from inlaid.cli import not_built, quantize
from inlaid.errors import InlaidError

app = typer.Typer(help="Multi-task GPTQ quantization and multi-LoRA serving on one low-bit base.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
app.command("quantize")(quantize.quantize_cmd)
app.command("add-task")(quantize.add_task_cmd)
app.command("serve")(not_built.serve_cmd)
app.command("eval")(not_built.eval_cmd)
app.command("bench")(not_built.bench_cmd)


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


def main() -> None:
    try:
        app(standalone_mode=False)
    except InlaidError as exc:
        if os.environ.get("INLAID_DEBUG"):
            raise
        typer.secho(f"error: {exc}", err=True, fg="red")
        sys.exit(1)
    except KeyboardInterrupt:
        typer.secho("interrupted: nothing was written", err=True, fg="yellow")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.secho("aborted", err=True)
        sys.exit(1)
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise
