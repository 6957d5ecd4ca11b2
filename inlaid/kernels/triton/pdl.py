"""The in-kernel half of programmatic dependent launch (the contract: ``inlaid.kernels.pdl``)."""

import triton
import triton.language as tl


@triton.jit
def start(PDL: tl.constexpr):
    """First statement of a kernel launched with ``**pdl.triton_args(device)``: wait for the grids
    ahead on the stream, then let the next kernel launch. Compiles to nothing when PDL is off (the
    CPU interpreter, older GPUs)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
