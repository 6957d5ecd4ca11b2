"""Commands that exist in the CLI but are not built yet: they say so and exit non-zero."""

from __future__ import annotations

from inlaid.errors import NotBuiltError


def _not_built(command: str, issue: str) -> None:
    raise NotBuiltError(f"'inlaid {command}' is not built yet ({issue}); nothing was done")


def serve_cmd() -> None:
    """Serve the quantized base and every adapter (OpenAI-compatible API). Not built yet."""
    _not_built("serve", "serving engine issue")


def eval_cmd() -> None:
    """Per-task accuracy of quantized variants. Not built yet."""
    _not_built("eval", "task suite and eval issue")


def bench_cmd() -> None:
    """Serving benchmarks under multi-adapter workloads. Not built yet."""
    _not_built("bench", "bench issue")
