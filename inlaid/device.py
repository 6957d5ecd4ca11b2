"""Which torch device a command runs on: the one flag every command shares (--device)."""

from __future__ import annotations

import torch

from inlaid.errors import ConfigError


def pick_device(requested: str | None) -> torch.device:
    """``requested`` (cpu, cuda, cuda:N) checked against this machine; None: cuda when available."""
    if not requested:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {requested!r}: expected cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {requested}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {requested}: this machine has {torch.cuda.device_count()} GPU(s)")
    return device
