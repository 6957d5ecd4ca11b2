"""The in-kernel half of programmatic dependent launch (the contract: ``inlaid.kernels.pdl``)."""

import triton
import triton.language as tl


@triton.jit
def _launch_dependents():
    # Triton's own gdc_launch_dependents is a pure op, which the compiler may move past the wait
    # below; a side effect keeps it first.
    tl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def start(PDL: tl.constexpr):
    """First statement of a kernel launched with ``**pdl.triton_args(device)``: let the next kernel
    launch, then wait for the grids ahead on the stream. Compiles to nothing when PDL is off (the
    CPU interpreter, older GPUs).

    Letting the next kernel launch before this one's wait (not after it) lets that kernel's
    launch, and its reads of weights before its own wait, overlap the kernel ahead of this one too:
    on an H100 a batch-1 decode step took 3.05 ms instead of 3.46 (docs/results/serving.md)."""
    trigger(PDL)
    wait(PDL)


@triton.jit
def trigger(PDL: tl.constexpr):
    """``start``'s first half, for a kernel that reads something before its wait: the first
    statement, then those reads (only of what no kernel of the forward pass writes:
    ``inlaid.kernels.pdl``), then :func:`wait`."""
    if PDL:
        _launch_dependents()


@triton.jit
def wait(PDL: tl.constexpr):
    """``start``'s second half: wait for the grids ahead."""
    if PDL:
        tl.extra.cuda.gdc_wait()
