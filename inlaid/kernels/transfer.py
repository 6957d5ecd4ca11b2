"""Host <-> device transfers that never wait for the GPU when they are queued.

``torch.tensor(values, device="cuda")`` copies from pageable memory and then synchronises the
stream: the host waits for every kernel queued ahead of it. Under asynchronous scheduling the
engine builds step N + 1's inputs while step N still runs, so such a copy would serialise the two
steps again. Here the values go through pinned memory and a non-blocking copy, queued in stream
order behind that work (torch's pinned-memory cache keeps the buffer until the copy is done).
The way back (``HostCopy``) is the same: device tensors copied into pinned memory behind the work
that makes them, and an event to wait for those copies alone.
"""

from __future__ import annotations

import numpy as np
import torch


def to_device(values, dtype: torch.dtype, device: torch.device | str,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """``values`` (a list, nested lists of equal length, or a numpy array) as a ``dtype`` tensor on
    ``device``; with ``out`` (a device tensor of that shape and dtype) written into it instead."""
    device = torch.device(device)
    if device.type != "cuda":
        host = torch.as_tensor(values, dtype=dtype)
        return host.to(device) if out is None else out.copy_(host)
    if isinstance(values, np.ndarray):  # torch.tensor cannot pin what it builds from numpy
        host = torch.from_numpy(values).to(dtype).pin_memory()
    else:
        host = torch.tensor(values, dtype=dtype, pin_memory=True)
    if out is None:
        return host.to(device, non_blocking=True)
    return out.copy_(host, non_blocking=True)


class HostCopy:
    """Device tensors on their way to the host: the copies are queued now; ``wait()`` waits for
    them (not for work queued after them) and returns the host tensors. On the CPU: the tensors."""

    def __init__(self, tensors: list[torch.Tensor]):
        self._event = None
        if tensors and tensors[0].device.type == "cuda":
            self._host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                          for t in tensors]
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = list(tensors)

    def wait(self) -> list[torch.Tensor]:
        if self._event is not None:
            self._event.synchronize()
        return self._host
