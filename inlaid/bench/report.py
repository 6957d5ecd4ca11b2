"""Where benchmark scripts put their tables: stdout, and $OUT/<name> when OUT is set (GPU runs)."""

from __future__ import annotations

import os


def emit(text: str, filename: str) -> None:
    print(text)
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, filename), "w") as fh:
            fh.write(text + "\n")
