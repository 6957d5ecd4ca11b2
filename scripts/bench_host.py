"""Host cost of an engine decode step, by part: what the CPU does between two GPU steps.

    python scripts/bench_host.py [--model default] [--batch 32] [--steps 40] [--finished-only]

On the GPU the decode step is a CUDA-graph replay. Without asynchronous scheduling the host's work
around it is idle GPU time (serving.md: 1.41 ms of a 10.6 ms batch-32 step at 6fd2746); with it
(the default on CUDA) that work overlaps the next step's GPU time, as long as it is shorter. The
host work does not depend on the device, so it is measured here on the CPU, with the embedded
SmolLM2 model and its real BPE tokenizer: greedy decoding of ``--batch`` requests, 128-token
prompts, one step per token. Each part is timed around its own call; "model"
(``ModelRunner.launch``: inputs, forward, sampling) runs on the CPU here and is shown only for
scale. Prints one table row per part, in ms per step. ``--finished-only`` steps the
engine as offline generation and the benchmark do (outputs of finished requests only; text decoded
when read); the default is the server's way (every request's output, every step).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

MODEL = "model (launch: inputs, CPU forward, sampling)"
PARTS = [  # (module, class, method, label)
    ("inlaid.engine.scheduler", "Scheduler", "schedule", "scheduler.schedule"),
    ("inlaid.engine.scheduler", "Scheduler", "advance", "scheduler.advance"),
    ("inlaid.engine.scheduler", "Scheduler", "resolve", "scheduler.resolve"),
    ("inlaid.engine.detokenizer", "IncrementalDetokenizer", "push", "detokenizer.push"),
    ("inlaid.engine.llm_engine", "LLMEngine", "_output", "request outputs"),
    ("inlaid.engine.llm_engine", "LLMEngine", "_prefetch_adapters", "adapter prefetch"),
    ("inlaid.engine.runner", "ModelRunner", "_sample", "sampling (launch)"),
    ("inlaid.engine.runner", "PendingStep", "result", "reading tokens back"),
    ("inlaid.engine.runner", "ModelRunner", "launch", MODEL),
]


def instrument(totals: dict) -> None:
    import importlib

    for module, cls_name, method, label in PARTS:
        cls = getattr(importlib.import_module(module), cls_name)
        original = getattr(cls, method)

        def timed(*args, _original=original, _label=label, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                totals[_label] += time.perf_counter() - start

        setattr(cls, method, timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--finished-only", action="store_true")
    args = parser.parse_args()

    from inlaid.engine.llm_engine import EngineConfig, LLMEngine
    from inlaid.engine.sequence import SamplingParams

    engine = LLMEngine(EngineConfig(model=args.model, device="cpu", max_num_seqs=args.batch))
    params = SamplingParams(temperature=0, max_tokens=args.steps + 10, ignore_eos=True)
    words = "the quick brown fox jumps over the lazy dog and keeps running".split()
    for i in range(args.batch):
        prompt = engine.tokenize(" ".join(words[(i + j) % len(words)] for j in range(200)))[:128]
        engine.add_request(prompt, params)
    while any(r.seq.num_computed_tokens < r.seq.num_prompt_tokens for r in engine._requests.values()):
        engine.step()  # prefill everything first: the timed steps are all-decode
    totals: dict[str, float] = defaultdict(float)
    instrument(totals)
    start = time.perf_counter()
    for _ in range(args.steps):
        engine.step(finished_only=args.finished_only)
    wall = (time.perf_counter() - start) / args.steps * 1e3
    per_step = {label: totals[label] / args.steps * 1e3 for *_, label in PARTS}
    host = wall - per_step[MODEL]
    mode = "finished outputs only" if args.finished_only else "every output"
    print(f"| part (batch {args.batch}, {mode}) | ms per step |\n|---|---:|")
    for *_, label in PARTS:
        print(f"| {label} | {per_step[label]:.3f} |")
    print(f"| **host total (step wall time minus launch)** | **{host:.3f}** |")


if __name__ == "__main__":
    main()
