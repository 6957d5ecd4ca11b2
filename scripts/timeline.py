"""Where a step's wall time goes on the GPU timeline, from a profiler's kernel intervals.

A kernel table (the profiler's summed kernel times) cannot say this: under programmatic dependent
launch a kernel starts while the one ahead of it still runs and its profiled time includes that
wait, and the LoRA shrink runs on a side branch beside the GEMM, so kernel times overlap and sum
past the step. Here the step's time is split instead. Kernels whose names match a ``side`` pattern
run on a side branch; every other kernel is on the main chain. Each main-chain kernel, in order of
its end, is charged the stretch between the previous main-chain kernel's end and its own: the time
the chain's progress waited on it. A stretch where no main-chain kernel runs is a gap, charged to
the side kernel that ended last inside it (the join waited on it) or else to "idle" (launch
latency, the host). The charges add up exactly to the main chain's span, first start to last end.
Names, not streams, tell the branches apart: a CUDA graph's replay spreads its kernels over many
streams (129 in a decode step's trace), whatever stream they were captured on.

    python scripts/timeline.py trace.json [--steps N] [--side NAME,...]   # a torch.profiler chrome trace
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Iterable, Sequence

Interval = tuple[str, float, float]  # (name, start, end), times in µs


def kernels_from_trace(trace: dict) -> list[Interval]:
    """The GPU kernel, memcpy and memset events of a chrome trace (``prof.export_chrome_trace``)."""
    out = []
    for e in trace.get("traceEvents", []):
        if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            start = float(e["ts"])
            out.append((str(e["name"]), start, start + float(e.get("dur", 0.0))))
    return out


# The engine's LoRA shrink branch (inlaid.kernels.qlinear): the shrink and the fill that zeroes its
# output. The pattern takes every torch fill; in a decode step the shrinks' are the only ones (4 a
# layer in the profile), elsewhere check the trace before reading a fill's charge.
SIDE = ("FillFunctor", "_lora_shrink_kernel")


def exposed(intervals: Iterable[Interval], side: Sequence[str] = SIDE) -> tuple[float, dict[str, float]]:
    """(span of the main chain in µs, {name: µs charged}); names of gap charges are prefixed
    ``gap: `` (``gap: idle`` where no side kernel ended in the gap)."""
    ours, theirs = [], []
    for iv in intervals:
        (theirs if any(pattern in iv[0] for pattern in side) else ours).append(iv)
    if not ours:
        raise ValueError("no main-chain kernel intervals")
    ours.sort(key=lambda iv: (iv[2], iv[1]))
    theirs.sort(key=lambda iv: iv[2])
    # the earliest start among the kernels from i on (in order of end): a stretch is a gap only
    # up to there, since a kernel ending later may have started before the one at i
    starts = [iv[1] for iv in ours]
    for i in range(len(starts) - 2, -1, -1):
        starts[i] = min(starts[i], starts[i + 1])
    charged: dict[str, float] = defaultdict(float)
    first = frontier = starts[0]
    for (name, _, end), start in zip(ours, starts):
        if start > frontier:
            waited = [iv[0] for iv in theirs if frontier < iv[2] <= start]
            charged["gap: " + (waited[-1] if waited else "idle")] += start - frontier
            frontier = start
        if end > frontier:
            charged[name] += end - frontier
            frontier = end
    return frontier - first, dict(charged)


def table(intervals: Iterable[Interval], steps: int = 1, rows: int = 25, side: Sequence[str] = SIDE) -> list[str]:
    intervals = list(intervals)
    span, charged = exposed(intervals, side)
    lines = [f"main-chain span {span / steps / 1e3:.3f} ms/step (side branch: {', '.join(side) or 'none'}); "
             "charged per step (ms, share, per launch):"]
    counts: dict[str, int] = defaultdict(int)
    for iv in intervals:
        counts[iv[0]] += 1
    for name, us in sorted(charged.items(), key=lambda kv: -kv[1])[:rows]:
        each = f"{us / counts[name]:6.2f} µs" if counts.get(name) else " " * 9
        lines.append(f"    {us / steps / 1e3:7.3f} ms {100 * us / span:5.1f}%  {each}  {name[:100]}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", help="chrome trace JSON from torch.profiler")
    parser.add_argument("--steps", type=int, default=1, help="steps in the trace (figures per step)")
    parser.add_argument("--side", default=",".join(SIDE),
                        help="comma-separated name substrings of the side branch's kernels ('' for none)")
    args = parser.parse_args()
    with open(args.trace) as f:
        intervals = kernels_from_trace(json.load(f))
    print("\n".join(table(intervals, args.steps, side=[p for p in args.side.split(",") if p])))


if __name__ == "__main__":
    main()
