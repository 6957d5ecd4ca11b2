"""The engine on a CUDA device (GPU only): adapter prefetch on its side stream changes no output.

fp32 on the GPU, so the comparisons can demand identical tokens (the Triton kernels run in fp32 too,
with IEEE dots); the prefetch copies, their events and the slot evictions are the same code as in
fp16 serving. Also: the CUDA engine with every kernel gives the CPU engine's greedy tokens."""

import pytest
import torch

from inlaid.engine.graphs import DecodeGraphs
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


@pytest.mark.parametrize("graphs", [None, "all", "decode"], ids=["adapters", "graphs", "decode-graphs"])
def test_cuda_kernels_generate_the_cpu_reference_tokens(tmp_path, graphs):
    """The CUDA path against the CPU engine (torch SDPA, torch LoRA), both fp32: identical greedy
    tokens. Prompts longer than one prefill tile (64 rows), and a token budget of 48 so long prompts
    arrive in chunks that attend to their cached prefix.

    - ``adapters``: Triton varlen prefill and paged decode attention, fused norm/RoPE, two adapters
      and the base mixed. The LoRA kernels take fp16/bf16 only, so fp32 LoRA runs torch's
      reference, which reads group sizes back to the host: no graph can hold it, every step runs
      op by op.
    - ``graphs``: no adapter slots, so every step replays a CUDA graph: decode steps and prefill
      steps (chunks and decodes mixed), in three token buckets.
    - ``decode-graphs``: the same with ``prefill_graphs=False``: decode steps replay graphs,
      prefill steps run op by op."""
    base = save_tiny_model(tmp_path / "base", seed=7)
    words = "the quick brown fox jumps over the lazy dog and then some more words follow here".split()
    prompts = [" ".join(words[: 3 + 6 * i] * (1 + i // 2)) for i in range(6)]
    adapters, names, slots = {}, None, 0
    if not graphs:
        adapters = {n: str(save_adapter(base, tmp_path / n, seed=s, rank=4)) for n, s in (("a", 41), ("b", 42))}
        names, slots = ["a", "b", None, "a", "b", None], 2
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = {}
    for device in ("cpu", "cuda"):
        llm = LLM(str(base), adapters, max_loras=slots, max_lora_rank=4, num_kv_blocks=256, max_num_seqs=4,
                  max_num_batched_tokens=48, device=device, dtype="float32",
                  prefill_graphs=graphs != "decode")
        kinds = _record_graph_sets(llm.engine) if device == "cuda" else []
        outs[device] = [o.output_token_ids for o in llm.generate(prompts, greedy, names)]
    assert outs["cuda"] == outs["cpu"]
    ran = {kind for kind, _ in kinds}
    if graphs == "all":  # only graphs, and prefill steps in more than one token bucket (16, 32, 48)
        assert ran == {"DecodeGraphs", "MixedGraphs"}
        assert len({bucket for kind, bucket in kinds if kind == "MixedGraphs"}) > 1
    elif graphs == "decode":
        assert ran == {"DecodeGraphs", "eager"}
    else:
        assert ran == {"eager"}


@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "4bit"])
def test_step_graphs_agree_with_eager_steps_in_fp16(tmp_path, quantized):
    """fp16 as served, with adapters: the engine with CUDA graphs (decode and prefill steps) against
    the same engine op by op. Both run the same kernels except where a graph's bucket (padded M)
    picks another GEMM variant (``4bit``: a 4-bit dummy base, so the CUDA GEMM, the Triton
    quantized GEMM) or a decode inside a prefill step goes through the prefill kernel, so sums may
    round differently: every request's tokens must agree until a near-tie, each chosen token's
    logprob within 0.05 of the other run's, and where the runs part, the other run's token must be
    in this run's top 2 within 0.05 of its best."""
    words = "one two three four five six seven eight nine ten eleven twelve".split()
    prompts = [" ".join(words[: 2 + 5 * i] * (1 + i // 3)) for i in range(8)]
    if quantized:
        source, adapters, options = "dummy:tiny", {}, dict(dummy_bits=4, dummy_adapters=2, dummy_rank=4)
        names = ["dummy-0", "dummy-1", None] * 3
    else:
        base = save_tiny_model(tmp_path / "base", seed=9)
        source, options = str(base), {}
        adapters = {n: str(save_adapter(base, tmp_path / n, seed=s, rank=4)) for n, s in (("a", 61), ("b", 62))}
        names = ["a", "b", None] * 3
    params = SamplingParams(temperature=0, max_tokens=10, logprobs=2, ignore_eos=True)
    outs, kinds = {}, []
    for eager in (True, False):
        llm = LLM(source, adapters, max_loras=2, max_lora_rank=4, num_kv_blocks=256, max_num_seqs=4,
                  max_num_batched_tokens=64, device="cuda", enforce_eager=eager, **options)
        if not eager:
            kinds = _record_graph_sets(llm.engine)
        outs[eager] = llm.generate(prompts, params, names[:len(prompts)])
    assert {kind for kind, _ in kinds} == {"DecodeGraphs", "MixedGraphs"}
    compared = 0
    for g, e in zip(outs[False], outs[True]):
        for lg, le in zip(g.logprobs, e.logprobs):
            if lg.token_id != le.token_id:
                assert lg.token_id in le.top and le.top[le.token_id] - le.top[lg.token_id] < 0.05
                break
            assert abs(lg.logprob - le.logprob) < 0.05
            compared += 1
    assert compared >= 40  # of 80: the runs part at near-ties only, not from the start


def _record_graph_sets(engine, strict: bool = False) -> list[tuple[str, int | None]]:
    """Wrap the runner's launch: (graph set or "eager", bucket) of every step it runs, in order;
    with ``strict``, under torch's sync debug mode "error" (a launch that waits for the GPU fails)."""
    runner = engine.runner
    launch, kinds = runner.launch, []

    def recorded(plan):
        graphs = runner.graph_set(plan)
        if graphs is None:
            kinds.append(("eager", None))
        else:
            n = len(plan.scheduled) if isinstance(graphs, DecodeGraphs) else plan.num_batched_tokens
            kinds.append((type(graphs).__name__, graphs.bucket(n)))
        if strict:
            torch.cuda.set_sync_debug_mode("error")
        try:
            return launch(plan)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    runner.launch = recorded
    return kinds


@pytest.mark.parametrize("eager", [False, True], ids=["graphs", "eager"])
def test_async_scheduling_gives_the_sync_tokens_and_launches_never_wait(tmp_path, eager):
    """Asynchronous scheduling on the GPU, fp16 as served (CUDA graphs for decode and prefill steps,
    or every step op by op; Triton LoRA): the same tokens and logprobs as synchronous stepping for
    greedy, seeded sampling and logprobs requests; and no launch (inputs, graph replay or eager
    forward, sampling) makes the host wait for the device: torch's sync debug mode turns such a
    wait inside ``launch`` into an error. Requests end by length only, so both modes run the same
    batches and must agree bit for bit (a stop found a step late shifts admissions:
    tests/engine/test_engine.py covers that on the CPU)."""
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
                  max_num_batched_tokens=24, device="cuda", async_scheduling=asynchronous,
                  enforce_eager=eager)
        engine = llm.engine
        assert engine.runner.uses_graphs != eager
        kinds = _record_graph_sets(engine, strict=True)
        outs[asynchronous] = llm.generate(prompts, params, names)
        ran = {kind for kind, _ in kinds}
        assert ran == ({"eager"} if eager else {"DecodeGraphs", "MixedGraphs"})
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    for a, b in zip(outs[True], outs[False]):
        assert a.output_token_ids == b.output_token_ids and a.finish_reason == b.finish_reason
        assert [(x.token_id, x.logprob, x.top) for x in a.logprobs or []] == \
            [(x.token_id, x.logprob, x.top) for x in b.logprobs or []]
