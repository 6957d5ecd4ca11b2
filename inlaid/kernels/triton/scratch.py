"""Device buffers that outlive a launch: arrival counters and partial results of kernels whose
programs combine their work in-kernel (the last program to arrive finishes it).

Such a kernel needs zeroed counters at launch. Allocating and zeroing them per call would cost one
more kernel (a memset) per launch, a sizeable share of a decode step made of ~700 small kernels.
Instead each launch's finishing program sets its counter back to 0, so one zeroed buffer serves
every later launch. The rule that makes this safe: launches that share a buffer (one ``name`` on
one device) never run at once — they are on one stream, and with PDL a kernel waits for the one
ahead before it touches memory (``inlaid.kernels.pdl``). A buffer outgrown is kept alive, not
freed: CUDA graphs captured with it still use it.
"""

from __future__ import annotations

import torch

_BUFFERS: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []


def persistent(name: str, device: torch.device, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A zero-initialised 1-D buffer of at least ``numel`` elements, the same one on every call for
    (name, device, dtype) until a larger one is asked for."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" are one buffer
        device = torch.device("cuda", torch.cuda.current_device())
    key = (name, device, dtype)
    buf = _BUFFERS.get(key)
    if buf is None or buf.numel() < numel:
        if buf is not None:
            _RETIRED.append(buf)
        buf = _BUFFERS[key] = torch.zeros(max(numel, 256), dtype=dtype, device=device)
    return buf
