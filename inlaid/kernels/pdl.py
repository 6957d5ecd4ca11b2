"""Programmatic dependent launch (PDL, sm_90+): a kernel may start before the one ahead of it on the
stream has finished, and waits for it in-kernel (``griddepcontrol.wait``) before touching its data.

Why: a decode step is ~700 small dependent kernels. Between two of them the GPU drains the first
grid, then launches and ramps up the second: ~1-2 µs each inside a CUDA graph, a sizeable share of a
step that takes a few ms. With PDL the next grid is launched while the current one runs, its blocks
take the SMs the current one frees, and they wait on-chip for its completion (and the visibility of
its writes) instead of behind the launch path.

The contract every kernel launched with PDL keeps (the Triton kernels through
:func:`inlaid.kernels.triton.pdl.start`, the CUDA GEMM in ``cuda/qgemm4.cu``):

- it waits (``griddepcontrol.wait``) before it reads anything another kernel may write and before
  it writes anything at all. The wait returns when every grid it depends on has completed and its
  memory is visible; since the grid ahead waited for its own predecessor in turn, everything earlier
  on the stream is complete too, so stream order holds for all the kernel does after the wait. The
  only reads allowed before it are of tensors nothing writes during a forward pass: the CUDA GEMM
  loads its first weight tiles there (weights change only between steps, in ``swap_layer``, which
  a torch kernel - launched without PDL, so fully ordered - always separates from the GEMM), and
  the SiLU and add + norm LoRA epilogues their token's adapter slot, rank and B rows, the fused
  RoPE + decode attention its sequence's context length and adapter slot and rank (the step's
  token -> slot map, the slots and the decode lengths are copied in or computed before the forward
  pass, so they are complete before its first kernel starts, and every later kernel starts after
  that one; the adapter manager's prefetch copies on its own stream only ever fill slots no token
  of a step in flight uses, which the reads after the wait relied on already);
- it lets its own dependents launch (``griddepcontrol.launch_dependents``): the CUDA GEMM right
  after its wait, the Triton kernels before it, as their first instruction. Either way the next
  kernel gets SMs as this grid's blocks retire and waits for it in turn. The earlier trigger changes
  only when the next kernel can launch (and start its weight reads), never what its wait
  guarantees: that wait returns once this grid has completed, which it does only after its own
  wait returned. Nor can it deadlock: a grid launches only once every block of the grid ahead has
  triggered, that is, has started, so no block of an earlier grid ever waits for an SM that a later
  grid's waiting blocks hold. Measured on an H100 (``docs/results/serving.md``): the Triton
  kernels' trigger moved before the wait took a batch-1 decode step from 3.46 to 3.05 ms and batch
  32 from 5.63-5.66 to 5.50-5.52 ms.

Kernels launched without PDL (torch's, cuBLAS's, the exllamav2 and Triton quantized GEMMs) wait for
everything ahead of them as usual, and a PDL kernel after one of them waits for it in-kernel, so
the two kinds mix freely. On by default on sm_90+ (``INLAID_BACKEND_PDL=off`` turns it off: the
dispatch row ``pdl``); the CPU path and older GPUs never use it.
"""

from __future__ import annotations

import functools

import torch

from inlaid.kernels import dispatch


@functools.lru_cache(maxsize=None)
def _sm(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def enabled(device: torch.device) -> bool:
    """Whether kernels on ``device`` are launched with PDL (the dispatch row ``pdl``)."""
    if device.type != "cuda":
        return False
    index = torch.cuda.current_device() if device.index is None else device.index
    return dispatch.choose("pdl", device, sm=_sm(index)) == "on"


def triton_args(device: torch.device) -> dict:
    """Launch arguments of a Triton kernel that calls ``inlaid.kernels.triton.pdl.start(PDL)`` (or
    its two halves, ``trigger`` and ``wait``): its ``PDL`` constexpr, and Triton's ``launch_pdl``
    option when it is on."""
    return {"PDL": True, "launch_pdl": True} if enabled(device) else {"PDL": False}
