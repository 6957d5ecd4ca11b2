"""Engine on the GPU: the fast path against the reference path, then decode/prefill speed.

    python scripts/gpu_engine.py [--out DIR] [--skip-hf] [--batches 1,8,32,128] [--profile 32]
                                 [--decode-only]

1. Correctness: dummy Llama-2-7B shapes (2 layers, 4-bit, 4 random rank-16 adapters). The engine
   with the fast kernels (Triton / exllamav2 by the dispatch table) against the same engine with
   every op forced to the torch reference (INLAID_BACKEND_*=ref), both fp16 on the GPU: greedy
   tokens of the fast engine are teacher-forced through the reference engine, and the logprobs of
   every prompt and generated token are compared.
2. Decode tokens/s at batch 1, 8, 32, 128: dummy Llama-2-7B 4-bit, 100 registered adapters rank 16
   on all 7 projections, each request its own adapter (distinct), prompt 128, 64 new tokens.
   Roofline = bytes one decode step must read (packed base weights + lm_head, the step's distinct
   adapters, the KV cache of the batch) / 2.99 TB/s (measured H100 HBM, docs/results/kernels.md).
3. Prefill tokens/s (8 prompts of 512 tokens), then the HF + PEFT baseline's own workload
   (``matched_workload``: batch 32 over 8 adapters, prompt 128, 32 new tokens), decode alone and
   end to end.
4. Baselines in the same run: HF transformers fp16 generate without adapters, and HF + PEFT with 8
   adapters mixed in one batch (``adapter_names``), batch 32, prompt 128, 32 new tokens: end to
   end and decode alone. The ratios: like for like (step 3's workload against HF + PEFT), and
   step 2's batch 32 (32 distinct adapters: 4x the adapter bytes a step) against the same.
``--decode-only`` runs step 2 with CUDA graphs (and 3) only: the A/B runs of scripts/gpu_ab.sh.
5. ``--profile B [--profile-adapters A]`` (instead of 1-4): where a batch-B decode step's time goes
   (request r on adapter r mod A, default 100). Kernel GPU time per step by kernel (torch.profiler
   over eager steps; graph replays run the same kernels) against the step's wall time with and
   without CUDA graphs, so host overhead and launch gaps show up too. Then the step's wall time
   split over the kernels on its critical chain (scripts/timeline.py: under PDL and the LoRA side
   branch the kernel times above overlap), from a chrome trace left in --out as trace_MODE_bB.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from pathlib import Path

import torch

from inlaid.engine.llm import LLM
from inlaid.engine.sequence import SamplingParams

HBM_BYTES_PER_S = 2.99e12


def log(msg: str) -> None:
    print(msg, flush=True)


def correctness(out: dict) -> None:
    opts = dict(dummy_layers=2, dummy_adapters=4, dummy_rank=16, max_loras=4, max_lora_rank=16,
                num_kv_blocks=256, device="cuda")
    fast = LLM("dummy:llama-2-7b", **opts)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 32000, (n,), generator=gen).tolist() for n in (5, 37, 130, 64)]
    adapters = ["dummy-0", "dummy-1", None, "dummy-3"]
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)
    got = fast.generate(prompts, sp, adapters)
    del fast
    gc.collect()
    torch.cuda.empty_cache()
    forced = ("INLAID_BACKEND_QUANT_MATMUL", "INLAID_BACKEND_LORA", "INLAID_BACKEND_PAGED_ATTENTION",
              "INLAID_BACKEND_NORM_ROPE")
    for name in forced:
        os.environ[name] = "ref"
    os.environ["INLAID_BACKEND_LORA_OVERLAP"] = "serial"
    forced += ("INLAID_BACKEND_LORA_OVERLAP",)
    ref = LLM("dummy:llama-2-7b", **opts, enforce_eager=True)
    full = [p + o.output_token_ids for p, o in zip(prompts, got)]
    scored = ref.generate(full, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0), adapters)
    for name in forced:
        del os.environ[name]
    diffs = []
    for prompt, o, r in zip(prompts, got, scored):
        fast_lp = [lp.logprob for lp in o.logprobs]
        ref_lp = [lp.logprob for lp in r.prompt_logprobs[len(prompt):]]
        diffs.extend(abs(a - b) for a, b in zip(fast_lp, ref_lp))
    out["correctness"] = {"tokens_compared": len(diffs), "max_abs_logprob_diff": max(diffs),
                          "mean_abs_logprob_diff": statistics.fmean(diffs)}
    log(f"correctness: {len(diffs)} generated tokens, |logprob fast - ref| max {max(diffs):.4f} "
        f"mean {statistics.fmean(diffs):.5f}")
    del ref
    gc.collect()
    torch.cuda.empty_cache()


def model_bytes(engine) -> tuple[int, int]:
    """(base bytes a step reads, bytes of one rank-r adapter on every projection)."""
    model = engine.model
    base = model.lm_head.numel() * model.lm_head.element_size()
    for layer in model.layers:
        for linear in layer.linears.values():
            q = linear.quant
            tensors = [q.qweight, q.scales, q.zeros] if hasattr(q, "qweight") else [q.weight]
            base += sum(t.numel() * t.element_size() for t in tensors)
    s = model.shape
    cfg = engine.config
    inter = engine.hf_config.intermediate_size
    per_layer = cfg.dummy_rank * sum(i + o for i, o in [
        (s.hidden, s.num_heads * s.head_dim), (s.hidden, s.num_kv_heads * s.head_dim),
        (s.hidden, s.num_kv_heads * s.head_dim), (s.num_heads * s.head_dim, s.hidden),
        (s.hidden, inter), (s.hidden, inter), (inter, s.hidden)])
    return base, per_layer * s.num_layers * 2


def decode_speed(out: dict, batches: list[int], eager: bool) -> None:
    mode = "eager" if eager else "graphs"
    t0 = time.perf_counter()
    # the graphs engine also runs the matched workload (batch 32) whatever the batches timed
    seqs = max(batches) if eager else max(*batches, 32)
    llm = LLM("dummy:llama-2-7b", dummy_adapters=100, dummy_rank=16, max_loras=128, max_lora_rank=16,
              max_num_seqs=seqs, max_num_batched_tokens=8192, device="cuda", enforce_eager=eager)
    log(f"[{mode}] engine start-up (weights, adapters, warm-up, graph capture): "
        f"{time.perf_counter() - t0:.1f} s")
    engine = llm.engine
    base_bytes, adapter_bytes = model_bytes(engine)
    s = engine.model.shape
    kv_token_bytes = 2 * s.num_layers * s.num_kv_heads * s.head_dim * 2
    log(f"base bytes/step {base_bytes / 1e9:.2f} GB, adapter {adapter_bytes / 1e6:.1f} MB, "
        f"KV {kv_token_bytes / 1e6:.2f} MB/token, {engine.block_manager.num_blocks} KV blocks")
    gen = torch.Generator().manual_seed(1)
    rows = []
    for batch in batches:
        step, context = _time_decode(engine, batch, 32 if eager else 64, gen, adapters=100)
        distinct = min(batch, 100)
        bytes_step = base_bytes + distinct * adapter_bytes + context * kv_token_bytes
        roof = bytes_step / HBM_BYTES_PER_S
        rows.append({"mode": mode, "batch": batch, "step_ms": step * 1e3, "tok_s": batch / step,
                     "roofline_ms": roof * 1e3, "roofline_frac": roof / step, "bytes_gb": bytes_step / 1e9})
        log(f"[{mode}] decode batch {batch:4d}: {step * 1e3:7.2f} ms/step, {batch / step:8.0f} tok/s, "
            f"roofline {roof * 1e3:.2f} ms ({roof / step:.1%})")  # .1: 49.5% must not print as 50%
    out.setdefault("decode", []).extend(rows)
    if eager:
        del llm, engine
        gc.collect()
        torch.cuda.empty_cache()
        return
    # prefill: 8 prompts of 512 tokens in one step (max_num_batched_tokens 8192). Fresh prompts
    # each time: the warm-up's would hit the prefix cache (up to b1724af the timed run reused them,
    # so it timed a step that computed almost nothing but the last token of each prompt)
    for warm in (True, False):
        prompts = [torch.randint(3, 32000, (512,), generator=gen).tolist() for _ in range(8)]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1),
                            _adapter_names(8, 8))
        torch.cuda.synchronize()
        took = time.perf_counter() - t0
    cached = sum(o.num_cached_tokens for o in outs)
    if cached:
        raise RuntimeError(f"the timed prefill found {cached} cached tokens: it would not time a prefill")
    out["prefill"] = {"tokens": 8 * 512, "seconds": took, "tok_s": 8 * 512 / took}
    log(f"prefill 8x512 with 8 adapters: {took * 1e3:.1f} ms, {8 * 512 / took:.0f} tok/s")
    matched_workload(out, llm, gen, base_bytes, adapter_bytes, kv_token_bytes)
    del llm, engine
    gc.collect()  # runner <-> graphs reference each other: free the cache before the next engine
    torch.cuda.empty_cache()


def _time_decode(engine, batch: int, max_tokens: int, gen: torch.Generator, adapters: int) -> tuple[float, float]:
    """(median wall time of a decode step, mean tokens in the batch's KV cache over the timed steps)
    for ``batch`` fresh requests (``_add_requests``), run to completion."""
    _add_requests(engine, batch, max_tokens, gen, adapters)
    times, contexts = [], []
    while engine.has_unfinished_requests():
        running = list(engine.scheduler.running)
        all_decode = len(running) == batch and all(q.num_computed_tokens == q.num_tokens - 1 for q in running)
        ctx = sum(q.num_tokens for q in running)
        # no device sync around the call: a step returns once it has read its tokens back, and
        # under asynchronous scheduling the next step is already queued on the GPU by then (a
        # sync would drain it): in steady state a call's wall time is the cadence of steps
        t0 = time.perf_counter()
        engine.step(finished_only=True)  # the offline path (LLM.generate, inlaid bench)
        if all_decode:
            times.append(time.perf_counter() - t0)
            contexts.append(ctx)
    if not times:
        raise RuntimeError(f"no step ran all {batch} requests in decode: max_num_seqs "
                           f"{engine.config.max_num_seqs} < {batch}?")
    steady = times[3:] or times
    return statistics.median(steady), statistics.fmean(contexts)


def _adapter_names(batch: int, adapters: int) -> list[str | None]:
    """Request r's adapter: dummy-(r mod ``adapters``); the base alone (None) for ``adapters`` 0."""
    return [f"dummy-{r % adapters}" if adapters else None for r in range(batch)]


def _add_requests(engine, batch: int, max_tokens: int, gen: torch.Generator, adapters: int = 100) -> None:
    """``batch`` random 128-token prompts on ``_adapter_names(batch, adapters)``."""
    for name in _adapter_names(batch, adapters):
        prompt = torch.randint(3, 32000, (128,), generator=gen).tolist()
        engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), name)


def matched_workload(out: dict, llm, gen: torch.Generator, base_bytes: int, adapter_bytes: int,
                     kv_token_bytes: int, batch: int = 32, new_tokens: int = 32, adapters: int = 8) -> None:
    """The HF + PEFT baseline's own workload (hf_baselines): ``batch`` 128-token prompts over
    ``adapters`` adapters, ``new_tokens`` new tokens each. Timed both ways the baseline is:
    decode alone (median step), and end to end (``LLM.generate`` wall time, prefill included, as
    HF's ``generate``). The decode table above runs each request on its own adapter, which reads
    ``batch / adapters`` times more adapter weights a step than this workload does. The same decode
    without any adapter is timed too: the difference is what the LoRA path costs a step."""
    step, context = _time_decode(llm.engine, batch, new_tokens, gen, adapters)
    base_step, _ = _time_decode(llm.engine, batch, new_tokens, gen, adapters=0)
    roof = (base_bytes + adapters * adapter_bytes + context * kv_token_bytes) / HBM_BYTES_PER_S
    walls = []
    for _ in range(3):  # fresh prompts each time: nothing in the prefix cache
        prompts = [torch.randint(3, 32000, (128,), generator=gen).tolist() for _ in range(batch)]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True),
                     _adapter_names(batch, adapters))
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - t0)
    wall = statistics.median(walls)
    out["matched"] = {"batch": batch, "adapters": adapters, "new_tokens": new_tokens, "step_ms": step * 1e3,
                      "decode_tok_s": batch / step, "base_step_ms": base_step * 1e3, "roofline_ms": roof * 1e3,
                      "roofline_frac": roof / step,
                      "e2e_s": walls, "e2e_tok_s": batch * new_tokens / wall}
    log(f"[matched] batch {batch}, {adapters} adapters, {new_tokens} new tokens: decode {step * 1e3:.2f} ms/step, "
        f"{batch / step:.0f} tok/s, roofline {roof * 1e3:.2f} ms ({roof / step:.1%}); end to end "
        f"{' / '.join(f'{w * 1e3:.0f}' for w in walls)} ms, {batch * new_tokens / wall:.0f} tok/s; "
        f"no adapter: decode {base_step * 1e3:.2f} ms/step")


def _add_decode_batch(engine, batch: int, max_tokens: int, gen: torch.Generator, adapters: int = 100) -> None:
    _add_requests(engine, batch, max_tokens, gen, adapters)
    while any(q.num_computed_tokens < q.num_tokens - 1 for q in engine.scheduler.running) \
            or len(engine.scheduler.running) < batch:
        engine.step()  # prefill until every sequence decodes


def profile(out: dict, batch: int, out_dir: Path, adapters: int = 100, steps: int = 8) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    gen = torch.Generator().manual_seed(3)
    for eager in (False, True):
        mode = "eager" if eager else "graphs"
        llm = LLM("dummy:llama-2-7b", dummy_adapters=100, dummy_rank=16, max_loras=128, max_lora_rank=16,
                  max_num_seqs=batch, max_num_batched_tokens=8192, device="cuda", enforce_eager=eager)
        engine = llm.engine
        _add_decode_batch(engine, batch, 8 * steps + 8, gen, adapters)
        for _ in range(3):
            engine.step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps
        if not eager:
            _host_gap(engine, batch, steps, wall)
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                engine.step()
            torch.cuda.synchronize()
        busy, top = _kernel_table(prof, steps)
        log(f"[profile {mode}] batch {batch}: wall {wall * 1e3:.2f} ms/step, kernel time "
            f"{busy:.2f} ms/step, {sum(v['per_step'] for v in top.values()):.0f} kernels/step")
        _print_top(top, 30)
        charged = _timeline(prof, steps, out_dir / f"trace_{mode}_b{batch}.json")
        out.setdefault("profile", []).append({"mode": mode, "batch": batch, "wall_ms": wall * 1e3,
                                              "kernel_ms": busy, "kernels": top, "charged_ms": charged})
        while engine.has_unfinished_requests():
            engine.step()
        for prompts, length in ((1, 128), (8, 128), (8, 512)):  # eager too: the graphs' gain
            _profile_prefill(out, engine, prompts, gen, mode, length)
        del llm, engine
        gc.collect()
        torch.cuda.empty_cache()


def _host_gap(engine, batch: int, steps: int, wall: float) -> None:
    """Split a graphs step's wall time: the graph replay alone (back to back: the GPU's own time
    for the step) against ``step(finished_only=True)`` with and without asynchronous scheduling.
    Without it the GPU idles while the host reads tokens back, schedules and builds inputs."""
    runner = engine.runner
    b = next(size for size in runner.graphs.buckets if size >= batch)
    graph = runner.graphs.graphs[b]
    torch.cuda.synchronize()  # the step in flight is done: the replays below run alone
    t0 = time.perf_counter()
    for _ in range(steps):
        graph.replay()  # the last step's static inputs again: the same KV slots, the same tokens
    torch.cuda.synchronize()
    replay = (time.perf_counter() - t0) / steps
    took = {}
    for mode in (False, True, False, True):
        engine.async_scheduling = mode
        engine.step(finished_only=True)
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step(finished_only=True)
        took.setdefault(mode, []).append((time.perf_counter() - t0) / steps)
    engine.async_scheduling = True
    log(f"[profile graphs] batch {batch}: replay alone {replay * 1e3:.2f} ms; step(finished_only) "
        f"async {' / '.join(f'{t * 1e3:.2f}' for t in took[True])} ms, "
        f"sync {' / '.join(f'{t * 1e3:.2f}' for t in took[False])} ms; step() {wall * 1e3:.2f} ms")


def _timeline(prof, steps: int, path: Path) -> dict:
    """The steps' wall time split over the main chain's kernels and gaps (scripts/timeline.py);
    the chrome trace stays in ``path`` for a closer look."""
    import timeline

    prof.export_chrome_trace(str(path))
    intervals = timeline.kernels_from_trace(json.loads(path.read_text()))
    for line in timeline.table(intervals, steps):
        log("  " + line)
    span, charged = timeline.exposed(intervals)
    return {"span_ms": span / steps / 1e3, **{k: v / steps / 1e3 for k, v in charged.items()}}


def _kernel_table(prof, steps: int) -> tuple[float, dict]:
    """(kernel ms per step, {kernel: {ms_per_step, per_step}} slowest first) from a CUDA-only profile."""
    kernels = {}
    for evt in prof.key_averages():
        t = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0)
        if t and evt.count:
            kernels[evt.key] = {"ms_per_step": t / steps / 1e3, "per_step": evt.count / steps}
    top = dict(sorted(kernels.items(), key=lambda kv: -kv[1]["ms_per_step"]))
    return sum(v["ms_per_step"] for v in top.values()), top


def _print_top(top: dict, rows: int) -> None:
    for name, v in list(top.items())[:rows]:
        log(f"    {v['ms_per_step']:7.3f} ms {v['per_step']:6.0f}x  {name[:110]}")


def _profile_prefill(out: dict, engine, prompts: int, gen: torch.Generator, mode: str, length: int = 128,
                     reps: int = 3) -> None:
    """One prefill step of ``prompts`` random ``length``-token prompts (distinct adapters, nothing
    in the prefix cache): wall time of each of ``reps`` fresh batches of that shape, then a kernel
    profile of one more."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    walls = []
    for rep in range(reps + 1):
        ids = [engine.add_request(torch.randint(3, 32000, (length,), generator=gen).tolist(),
                                  SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), f"dummy-{i}",
                                  request_id=f"prefill-{prompts}-{rep}-{i}") for i in range(prompts)]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if rep < reps:
            engine.step()
        else:
            with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                engine.step()
                torch.cuda.synchronize()
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - t0)
        for rid in ids:
            engine.abort_request(rid)
    busy, top = _kernel_table(prof, 1)
    log(f"[profile prefill {mode}] {prompts} x {length} tokens: wall " + ", ".join(f"{w * 1e3:.1f}" for w in walls[:reps])
        + f" ms; profiled step: kernel time {busy:.2f} ms, {sum(v['per_step'] for v in top.values()):.0f} kernels")
    _print_top(top, 15)
    out.setdefault("profile_prefill", []).append({"mode": mode, "prompts": prompts, "prompt_len": length,
                                                  "wall_ms": [w * 1e3 for w in walls[:reps]],
                                                  "kernel_ms": busy, "kernels": top})


def hf_baselines(out: dict, batch: int = 32, new_tokens: int = 32) -> None:
    """HF's ``generate`` on the batch, end to end (tokens / wall time, prefill included) and decode
    alone: (new_tokens - 1) steps over the wall time of ``new_tokens`` new tokens less that of one
    (the prefill and the first token)."""
    from peft import LoraConfig, get_peft_model

    from inlaid.model.dummy import dummy_model

    model = dummy_model("llama-2-7b").cuda()
    ids = torch.randint(3, 32000, (batch, 128), generator=torch.Generator().manual_seed(2)).cuda()

    def rates(generate, **extra) -> tuple[float, float]:
        took = {}
        for n in (2, 1, new_tokens):  # 2: the warm-up
            kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                          min_new_tokens=n, do_sample=False, pad_token_id=0, **extra)
            with torch.no_grad():
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                generate(**kwargs)
                torch.cuda.synchronize()
            took[n] = time.perf_counter() - t0
        return batch * new_tokens / took[new_tokens], batch * (new_tokens - 1) / (took[new_tokens] - took[1])

    hf, hf_decode = rates(model.generate)
    log(f"HF fp16 generate, no adapter, batch {batch}: {hf:.0f} tok/s end to end, {hf_decode:.0f} decode")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets), adapter_name="a0")
    for i in range(1, 8):
        peft.add_adapter(f"a{i}", LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    peft.half().eval()
    mixed, mixed_decode = rates(peft.generate, adapter_names=[f"a{i % 8}" for i in range(batch)])
    log(f"HF + PEFT, 8 adapters mixed, batch {batch}: {mixed:.0f} tok/s end to end, {mixed_decode:.0f} decode")
    out["hf"] = {"batch": batch, "new_tokens": new_tokens, "hf_fp16_no_lora_tok_s": hf,
                 "hf_fp16_no_lora_decode_tok_s": hf_decode, "hf_peft_mixed8_tok_s": mixed,
                 "hf_peft_mixed8_decode_tok_s": mixed_decode}


def ratios(results: dict) -> None:
    """Our batch-32 rates over HF's. Like for like: the matched workload (8 adapters, as HF's)
    against HF + PEFT, decode against decode and end to end against end to end; and the decode
    table's batch 32 (32 distinct adapters, the ratio quoted up to stop 22) against the same
    baselines."""
    hf = results["hf"]
    m = results.get("matched")
    if m:
        log(f"matched workload (batch {m['batch']}, {m['adapters']} adapters): decode "
            f"{m['decode_tok_s'] / hf['hf_peft_mixed8_decode_tok_s']:.1f}x "
            f"HF+PEFT decode, end to end {m['e2e_tok_s'] / hf['hf_peft_mixed8_tok_s']:.1f}x HF+PEFT end to end")
    b32 = next((r for r in results["decode"] if r["batch"] == 32 and r["mode"] == "graphs"), None)
    if b32:
        log(f"batch 32 decode, 32 distinct adapters: {b32['tok_s'] / hf['hf_peft_mixed8_tok_s']:.1f}x HF+PEFT "
            f"mixed, {b32['tok_s'] / hf['hf_fp16_no_lora_tok_s']:.2f}x HF fp16 no-LoRA (end to end); "
            f"{b32['tok_s'] / hf['hf_fp16_no_lora_decode_tok_s']:.2f}x HF fp16 decode")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")))
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--batches", default="1,8,32,128")
    parser.add_argument("--decode-only", action="store_true",
                        help="only decode (and prefill) speed with CUDA graphs: no correctness, eager, HF")
    parser.add_argument("--profile", type=int, default=0, metavar="B", help="only profile a batch-B decode step")
    parser.add_argument("--profile-adapters", type=int, default=100, metavar="A",
                        help="--profile: request r runs on adapter r mod A (8: the HF + PEFT baseline's workload)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    args.out.mkdir(parents=True, exist_ok=True)
    if args.profile:
        profile(results, args.profile, args.out, args.profile_adapters)
        (args.out / "gpu_profile.json").write_text(json.dumps(results, indent=2))
        return
    batches = [int(b) for b in args.batches.split(",")]
    if not args.decode_only:
        correctness(results)
    decode_speed(results, batches, eager=False)
    if not args.decode_only:
        decode_speed(results, batches, eager=True)
    if not (args.skip_hf or args.decode_only):
        hf_baselines(results)
    if "hf" in results:
        ratios(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_engine.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
