"""Host cost of one scheduler step: ``Scheduler.schedule()`` + ``postprocess()`` with 64 requests
decoding and W more waiting (a queue under overload), for each policy.

    python scripts/bench_scheduler.py [--waiting 0,100,300,1000] [--steps 200]

The scheduler runs on the host between GPU steps, so its time adds to every step (serving.md:
1.65 ms of host time in an 11.2 ms batch-32 decode step). Pure Python, no model: five tasks, prompts
of 16-256 tokens, outputs that never end, 8 adapter slots.
"""

from __future__ import annotations

import argparse
import random
import time

from inlaid.engine.block_manager import BlockManager
from inlaid.engine.scheduler import Scheduler, SchedulerConfig
from inlaid.engine.sequence import SamplingParams, Sequence

TASKS = ("sql", "math", "chat", "summarize", "translate")


def ms_per_step(policy: str, waiting: int, steps: int) -> float:
    rng = random.Random(0)
    scheduler = Scheduler(SchedulerConfig(policy=policy, max_num_seqs=64, max_num_batched_tokens=2048,
                                          max_loras=8), BlockManager(20000, 16))
    endless = SamplingParams(temperature=0, max_tokens=100_000, ignore_eos=True)
    for i in range(64 + waiting):
        prompt = [rng.randint(1, 999) for _ in range(rng.randint(16, 256))]
        scheduler.add(Sequence(str(i), prompt, endless, rng.choice(TASKS)))

    def step() -> None:
        plan = scheduler.schedule()
        scheduler.postprocess(plan, [1] * len(plan.seqs))

    for _ in range(20):  # prefill the first 64; the rest keep waiting (max_num_seqs)
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--waiting", default="0,100,300,1000")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    print("| waiting | fcfs ms/step | inlaid ms/step |\n|---:|---:|---:|")
    for waiting in (int(w) for w in args.waiting.split(",")):
        fcfs, inlaid = (ms_per_step(p, waiting, args.steps) for p in ("fcfs", "inlaid"))
        print(f"| {waiting} | {fcfs:.3f} | {inlaid:.3f} |", flush=True)


if __name__ == "__main__":
    main()
