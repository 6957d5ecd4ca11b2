"""Where the host's time goes in an engine step run op by op (no CUDA graph): prefill steps and
decode steps. GPU only (the kernels' launch paths are what is measured).

    python scripts/host_profile.py [--layers 32] [--batch 32] [--prompts 1 8] [--graphs] [--out DIR]

``--graphs``: the engine as served (CUDA graphs for decode and prefill steps), to compare the same
step shapes' wall time against the op-by-op run.

A prefill step of one 128-token prompt took ~120 ms of wall time for ~11 ms of kernels
(docs/results/gpu_profile_56a90ca.log): the host, not the GPU, sets its pace. This prints, per
step shape, the wall time without a profiler, then the functions with the most own time (cProfile,
``tottime``) and the most time below them (``cumtime``). Steps run synchronously (no asynchronous
scheduling), so a step's wall time is its host time plus whatever it waits for.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from pathlib import Path

import torch

from inlaid.engine.llm import LLM, SamplingParams


def _prompt(llm: LLM, gen: torch.Generator, n: int = 128) -> list[int]:
    return torch.randint(3, llm.engine.hf_config.vocab_size, (n,), generator=gen).tolist()


def _mode(llm: LLM) -> str:
    return "graphs" if llm.engine.runner.uses_graphs else "eager"


def _report(name: str, prof: cProfile.Profile, steps: int, out: Path | None, rows: int) -> None:
    for key in ("tottime", "cumtime"):
        buf = io.StringIO()
        stats = pstats.Stats(prof, stream=buf)
        stats.sort_stats(key).print_stats(rows)
        text = buf.getvalue()
        print(f"--- {name}: top {rows} by {key} ({steps} steps profiled)")
        print("\n".join(line for line in text.splitlines() if line.strip())[-12000:])
        if out is not None:
            (out / f"host_{name}_{key}.txt").write_text(text)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed_steps(engine, steps: int, prof: cProfile.Profile | None) -> float:
    _sync()
    t0 = time.perf_counter()
    if prof is not None:
        prof.enable()
    for _ in range(steps):
        engine.step()
    if prof is not None:
        prof.disable()
    _sync()
    return (time.perf_counter() - t0) / steps


def decode(llm: LLM, batch: int, steps: int, out: Path | None, rows: int) -> None:
    engine, gen = llm.engine, torch.Generator().manual_seed(1)
    for r in range(batch):
        engine.add_request(_prompt(llm, gen), SamplingParams(temperature=0, max_tokens=4 * steps + 8,
                                                        ignore_eos=True), f"dummy-{r}")
    while any(q.num_computed_tokens < q.num_tokens - 1 for q in engine.scheduler.running):
        engine.step()
    for _ in range(2):
        engine.step()
    wall = _timed_steps(engine, steps, None)
    prof = cProfile.Profile()
    profiled = _timed_steps(engine, steps, prof)
    print(f"[decode {_mode(llm)}] batch {batch}: wall {wall * 1e3:.2f} ms/step ({profiled * 1e3:.2f} under cProfile)")
    _report(f"decode{batch}", prof, steps, out, rows)
    for rid in list(engine._requests):
        engine.abort_request(rid)
    while engine.has_unfinished_requests():
        engine.step()


def prefill(llm: LLM, prompts: int, reps: int, out: Path | None, rows: int) -> None:
    engine, gen = llm.engine, torch.Generator().manual_seed(2)
    prof = cProfile.Profile()
    walls = []
    for rep in range(reps + 1):
        ids = [engine.add_request(_prompt(llm, gen), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                                  f"dummy-{i}", request_id=f"p{prompts}-{rep}-{i}") for i in range(prompts)]
        walls.append(_timed_steps(engine, 1, prof if rep == reps else None))
        for rid in ids:
            engine.abort_request(rid)
        while engine.has_unfinished_requests():
            engine.step()
    print(f"[prefill {_mode(llm)}] {prompts} x 128 tokens: wall " + ", ".join(f"{w * 1e3:.1f}" for w in walls[:reps])
          + f" ms ({walls[-1] * 1e3:.1f} under cProfile)")
    _report(f"prefill{prompts}", prof, 1, out, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--prompts", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--shape", default="llama-2-7b", help="dummy model shape (tiny: a CPU dry run)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--graphs", action="store_true", help="capture CUDA graphs (the served engine)")
    args = parser.parse_args()
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    llm = LLM(f"dummy:{args.shape}", dummy_layers=args.layers, dummy_adapters=100, dummy_rank=16,
              max_loras=128, max_lora_rank=16, max_num_seqs=max(args.batch, 8), max_num_batched_tokens=8192,
              device=args.device, enforce_eager=not args.graphs, async_scheduling=False)
    for n in args.prompts:
        prefill(llm, n, 3, args.out, args.rows)
    if args.batch:
        decode(llm, args.batch, args.steps, args.out, args.rows)


if __name__ == "__main__":
    main()
