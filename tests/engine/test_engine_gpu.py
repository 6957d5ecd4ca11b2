"""The engine on a CUDA device (GPU only): adapter prefetch on its side stream changes no output.

fp32 on the GPU, so the comparisons can demand identical tokens (the Triton kernels run in fp32 too,
with IEEE dots); the prefetch copies, their events and the slot evictions are the same code as in
fp16 serving. Also: the CUDA engine with every kernel gives the CPU engine's greedy tokens."""

import pytest
import torch

from inlaid.engine.llm import LLM
from inlaid.engine.sequence import SamplingParams

from ..conftest import save_adapter, save_tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_prefetch_on_a_side_stream_changes_no_output(tmp_path):
    base = save_tiny_model(tmp_path / "base", seed=5)
    adapters = {n: str(save_adapter(base, tmp_path / n, seed=s, rank=4))
                for n, s in (("a", 21), ("b", 31), ("c", 32), ("d", 33))}
    prompts = ["hello world", "the quick brown fox", "abc", "select sum from"] * 2
    names = ["a", "b", "c", "d", "d", "c", "b", "a"]
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outs = {}
    for prefetch in (True, False):
        # two slots, one request at a time: each prefetch lands in a slot evicted from a finished
        # request's adapter, and the next step waits for its copy event
        llm = LLM(str(base), adapters, max_loras=2, max_lora_rank=4, num_kv_blocks=128, max_num_seqs=1,
                  prefetch_adapters=prefetch, device="cuda", dtype="float32")
        outs[prefetch] = [o.output_token_ids for o in llm.generate(prompts, greedy, names)]
        assert (llm.engine.stats()["adapter_prefetches"] > 0) == prefetch
    assert outs[True] == outs[False]


def test_cuda_kernels_generate_the_cpu_reference_tokens(tmp_path):
    """The whole CUDA path (Triton LoRA, varlen prefill and paged decode attention, fused norm/RoPE,
    CUDA graphs) against the CPU engine (torch SDPA, torch LoRA), both fp32: identical greedy tokens.
    Prompts longer than one prefill tile (64 rows), and a token budget of 48 so long prompts arrive
    in chunks that attend to their cached prefix."""
    base = save_tiny_model(tmp_path / "base", seed=7)
    adapters = {n: str(save_adapter(base, tmp_path / n, seed=s, rank=4)) for n, s in (("a", 41), ("b", 42))}
    words = "the quick brown fox jumps over the lazy dog and then some more words follow here".split()
    prompts = [" ".join(words[: 3 + 6 * i] * (1 + i // 2)) for i in range(6)]
    names = ["a", "b", None, "a", "b", None]
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = {}
    for device in ("cpu", "cuda"):
        llm = LLM(str(base), adapters, max_loras=2, max_lora_rank=4, num_kv_blocks=256, max_num_seqs=4,
                  max_num_batched_tokens=48, device=device, dtype="float32")
        outs[device] = [o.output_token_ids for o in llm.generate(prompts, greedy, names)]
    assert outs["cuda"] == outs["cpu"]


def test_async_scheduling_gives_the_sync_tokens_and_launches_never_wait(tmp_path):
    """Asynchronous scheduling on the GPU, fp16 as served (CUDA graphs for decode, Triton LoRA):
    the same tokens and logprobs as synchronous stepping for greedy, seeded sampling and logprobs
    requests; and no launch (inputs, graph replay or eager forward, sampling) makes the host wait
    for the device: torch's sync debug mode turns such a wait inside ``launch`` into an error.
    Requests end by length only, so both modes run the same batches and must agree bit for bit
    (a stop found a step late shifts admissions: tests/engine/test_engine.py covers that on the
    CPU)."""
    base = save_tiny_model(tmp_path / "base", seed=5)
    adapters = {n: str(save_adapter(base, tmp_path / n, seed=s, rank=4)) for n, s in (("a", 51), ("b", 52))}
    prompts = ["hello world", "the quick brown fox jumps", "abc", "select sum from where", "z y x"] * 2
    names = ["a", "b", None, "a", "b"] * 2
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.8, max_tokens=9, seed=3, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=7, logprobs=2, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)] * 2
    outs = {}
    for asynchronous in (False, True):
        llm = LLM(str(base), adapters, max_loras=2, max_lora_rank=4, num_kv_blocks=256, max_num_seqs=4,
                  max_num_batched_tokens=24, device="cuda", async_scheduling=asynchronous)
        engine = llm.engine
        assert engine.runner.graphs is not None
        launch, launches = engine.runner.launch, []

        def strict_launch(plan, launch=launch, launches=launches):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return launch(plan)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                launches.append(engine.runner.graphs.accepts(plan))

        engine.runner.launch = strict_launch
        outs[asynchronous] = llm.generate(prompts, params, names)
        assert True in launches and False in launches  # graph (decode) and eager (mixed) steps
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    for a, b in zip(outs[True], outs[False]):
        assert a.output_token_ids == b.output_token_ids and a.finish_reason == b.finish_reason
        assert [(x.token_id, x.logprob, x.top) for x in a.logprobs or []] == \
            [(x.token_id, x.logprob, x.top) for x in b.logprobs or []]
