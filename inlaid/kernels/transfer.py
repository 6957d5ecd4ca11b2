"""Host lists to device tensors without waiting for the GPU.

``torch.tensor(values, device="cuda")`` copies from pageable memory and then synchronises the
stream: the host waits for every kernel queued ahead of it. Under asynchronous scheduling the
engine builds step N + 1's inputs while step N still runs, so such a copy would serialise the two
steps again. Here the values go through pinned memory and a non-blocking copy, queued in stream
order behind that work (torch's pinned-memory cache keeps the buffer until the copy is done).
"""

from __future__ import annotations

import torch


def to_device(values, dtype: torch.dtype, device: torch.device | str,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """``values`` (a list, or nested lists of equal length) as a ``dtype`` tensor on ``device``;
    with ``out`` (a device tensor of that shape and dtype) written into it instead."""
    device = torch.device(device)
    if device.type != "cuda":
        host = torch.tensor(values, dtype=dtype)
        return host.to(device) if out is None else out.copy_(host)
    host = torch.tensor(values, dtype=dtype, pin_memory=True)
    if out is None:
        return host.to(device, non_blocking=True)
    return out.copy_(host, non_blocking=True)
