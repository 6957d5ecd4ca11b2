"""Output paths every command checks before its work: a long run must not end by failing to write."""

from __future__ import annotations

import os
from pathlib import Path

from inlaid.errors import ConfigError


def check_writable_dir(path: str | Path, flag: str = "--out") -> None:
    """Raise ConfigError unless ``path`` is, or can be created as, a directory we may write into:
    its nearest existing part must be a writable directory, not a file."""
    path = Path(path)
    for part in (path, *path.parents):
        if not part.exists():
            continue
        if not part.is_dir():
            raise ConfigError(f"{flag} {path}: {part} is a file, not a directory to write into")
        if not os.access(part, os.W_OK | os.X_OK):
            raise ConfigError(f"{flag} {path}: {part} is not writable")
        return
