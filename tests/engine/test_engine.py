"""The engine against HF transformers + PEFT on tiny random models (CPU, fp32).

Greedy outputs must be token-identical for a batch that mixes adapters, base requests and prompt
lengths — also when the KV cache is so small that requests are preempted and recomputed, when
prefill is chunked, and when prompts share cached prefixes. Prompt logprobs (teacher forcing) must
match HF's log-softmax to 1e-4: a stronger check than argmax agreement on random models.
"""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from inlaid.engine.llm import LLM
from inlaid.engine.sequence import SamplingParams
from inlaid.errors import AdapterError, RequestError

from ..conftest import save_adapter, save_tiny_model

PROMPTS = ["hello world", "the quick brown fox jumps over the lazy dog", "abc",
           "select sum from where count", "hello world, again and again", "z"]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def family(request, tmp_path_factory):
    """(base dir, {adapter name: dir}) for one model family."""
    model_type, overrides = request.param
    root = tmp_path_factory.mktemp(model_type)
    base = save_tiny_model(root / "base", model_type, seed=3, **overrides)
    adapters = {
        "a": save_adapter(base, root / "a", seed=11, rank=4),
        "b": save_adapter(base, root / "b", seed=12, rank=8, targets=("q_proj", "v_proj", "down_proj")),
        "c": save_adapter(base, root / "c", seed=13, rank=2, targets=("o_proj", "gate_proj"), rslora=True),
    }
    return base, adapters


def peft_greedy(peft, tok, prompts, names, max_tokens=10):
    """Greedy continuations from a PeftModel, one request at a time (None = adapters disabled)."""
    out = []
    for prompt, name in zip(prompts, names):
        ids = torch.tensor([tok(prompt)["input_ids"]])
        kwargs = dict(input_ids=ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
        if name is None:
            with peft.disable_adapter():
                gen = peft.generate(**kwargs)
        else:
            peft.set_adapter(name)
            gen = peft.generate(**kwargs)
        out.append(gen[0, ids.shape[1]:].tolist())
    return out


def multi_adapter_peft(model, adapters: dict):
    from peft import PeftModel

    first, *rest = adapters
    peft = PeftModel.from_pretrained(model, adapters[first], adapter_name=first)
    for name in rest:
        peft.load_adapter(adapters[name], adapter_name=name)
    return peft


def hf_greedy(base, adapters, prompts, names, max_tokens=10):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return peft_greedy(multi_adapter_peft(model, adapters), AutoTokenizer.from_pretrained(base),
                       prompts, names, max_tokens)


FAMILIES = [("llama", {}), ("qwen2", {"tie_word_embeddings": False}),
            ("mistral", {"sliding_window": 8}),  # window shorter than the prompts: the mask matters
            # Llama 3's frequency-dependent RoPE scaling, with an original context the prompts pass
            ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8}})]
FAMILY_IDS = ["llama", "qwen2", "mistral", "llama3-rope"]
ENGINE_SETUPS = {
    "plain": dict(num_kv_blocks=256, block_size=4),
    # 16 blocks of 4 cannot hold six requests: preemption and recompute must keep outputs exact
    "preempt+chunked": dict(num_kv_blocks=16, block_size=4, max_num_batched_tokens=16),
    "two-slots": dict(num_kv_blocks=256, block_size=4, max_loras=2),  # 3 adapters, 2 slots: swaps
    # step N + 1 launched before step N's tokens are read: they are fed as placeholders
    "async": dict(num_kv_blocks=256, block_size=4, async_scheduling=True),
    "async+preempt+chunked": dict(num_kv_blocks=16, block_size=4, max_num_batched_tokens=16,
                                  async_scheduling=True),
}
ASYNC = pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])


@pytest.mark.parametrize("family", FAMILIES, indirect=True, ids=FAMILY_IDS)
def test_greedy_matches_hf_peft_mixed_batch(family):
    base, adapters = family
    names = ["a", None, "b", "c", "a", None]
    expect = hf_greedy(base, adapters, PROMPTS, names)
    for setup, options in ENGINE_SETUPS.items():
        llm = LLM(str(base), {k: str(v) for k, v in adapters.items()},
                  **{"max_loras": 4, "max_lora_rank": 8, **options})
        outs = llm.generate(PROMPTS, GREEDY, names)
        got = [o.output_token_ids for o in outs]
        assert got == expect, setup
        bm = llm.engine.block_manager
        assert bm.num_free_blocks == bm.num_blocks, f"{setup}: KV blocks leaked"
        if setup == "two-slots":
            assert llm.engine.adapters.num_loads >= 3  # three adapters went through two slots


@pytest.mark.parametrize("family", FAMILIES[:1], indirect=True, ids=["llama"])
@ASYNC
def test_prompt_logprobs_match_hf_teacher_forcing(family, asynchronous):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, adapters = family
    tok = AutoTokenizer.from_pretrained(base)
    # chunked: logprobs assembled over chunks
    llm = LLM(str(base), {"b": str(adapters["b"])}, max_loras=2, max_lora_rank=8, num_kv_blocks=64,
              block_size=4, max_num_batched_tokens=8, async_scheduling=asynchronous)
    prompt = PROMPTS[1]
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=3), "b")[0]
    ids = torch.tensor([tok(prompt)["input_ids"]])
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapters["b"])
    with torch.no_grad():
        ref = torch.log_softmax(peft(ids).logits[0].float(), -1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == ids.shape[1]
    for pos in range(1, ids.shape[1]):
        lp = out.prompt_logprobs[pos]
        token = ids[0, pos].item()
        assert lp.token_id == token
        assert abs(lp.logprob - ref[pos - 1, token].item()) < 1e-4
        assert set(lp.top) == set(torch.topk(ref[pos - 1], 3).indices.tolist())


@pytest.mark.parametrize("settings", [
    dict(bits=4, group_size=32),
    dict(bits=2, group_size=32),
    dict(bits=3, group_size=32, desc_act=True),  # act-order: g_idx is not monotone
    dict(bits=8, group_size=-1, sym=False),  # one group per column, asymmetric zeros
], ids=["4bit", "2bit", "3bit-act-order", "8bit-asym-nogroups"])
def test_quantized_checkpoint_matches_dequantized_hf(tmp_path, tiny_model, tiny_tasks, settings):
    from transformers import AutoTokenizer

    from inlaid.config import QuantConfig, TaskSpec
    from inlaid.quant import pipeline
    from inlaid.quant.checkpoint import load_dense_model

    out = tmp_path / "q"
    pipeline.quantize(str(tiny_model), out, [TaskSpec(n, *tiny_tasks[n]) for n in ("sql", "math")],
                      QuantConfig(samples=4, seq_len=32, **settings))
    names = ["sql", "math", None]
    prompts = PROMPTS[:3]
    peft = multi_adapter_peft(load_dense_model(out), {n: out / "adapters" / n for n in ("sql", "math")})
    expect = peft_greedy(peft, AutoTokenizer.from_pretrained(out), prompts, names)
    # the checkpoint's own adapters are registered under their task names
    for dequantize in (True, False):  # False: every step through the quant_matmul reference kernel
        llm = LLM(str(out), max_loras=2, max_lora_rank=8, num_kv_blocks=64, block_size=4,
                  dequantize_on_cpu=dequantize)
        assert sorted(llm.engine.adapters.names) == ["math", "sql"]
        assert llm.engine.model.is_quantized is not dequantize
        got = [o.output_token_ids for o in llm.generate(prompts, GREEDY, names)]
        assert got == expect, f"dequantize_on_cpu={dequantize}"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama-engine")
    base = save_tiny_model(root / "base", seed=5)
    return base, save_adapter(base, root / "a", seed=21, rank=4)


@ASYNC
def test_sampling_seeded_and_filters(llama, asynchronous):
    base, adapter = llama
    llm = LLM(str(base), {"a": str(adapter)}, max_loras=2, max_lora_rank=4, num_kv_blocks=128,
              async_scheduling=asynchronous)
    seeded = SamplingParams(temperature=1.0, max_tokens=12, seed=7, ignore_eos=True)
    alone = llm.generate(PROMPTS[0], seeded, "a")[0].output_token_ids
    # the same seeded request inside a different batch draws the same tokens
    unseeded = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    batch = llm.generate([PROMPTS[1], PROMPTS[2], PROMPTS[0]], [unseeded, unseeded, seeded], [None, "a", "a"])
    assert batch[2].output_token_ids == alone
    greedy = llm.generate(PROMPTS[1], GREEDY, "a")[0].output_token_ids
    for filtered in (SamplingParams(temperature=2.0, top_k=1, max_tokens=10, ignore_eos=True),
                     SamplingParams(temperature=0.7, top_p=1e-6, max_tokens=10, ignore_eos=True)):
        assert llm.generate(PROMPTS[1], filtered, "a")[0].output_token_ids == greedy
    # many unseeded draws at high temperature are not all equal (the sampler really samples)
    hot = SamplingParams(temperature=5.0, max_tokens=6, ignore_eos=True)
    draws = {tuple(o.output_token_ids) for o in llm.generate([PROMPTS[1]] * 6, hot)}
    assert len(draws) > 1


@ASYNC
def test_logprobs_are_consistent_with_greedy(llama, asynchronous):
    base, adapter = llama
    llm = LLM(str(base), {"a": str(adapter)}, max_loras=2, max_lora_rank=4, num_kv_blocks=128,
              async_scheduling=asynchronous)
    out = llm.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=5, logprobs=3,
                                                  ignore_eos=True), "a")[0]
    assert [lp.token_id for lp in out.logprobs] == out.output_token_ids
    for lp in out.logprobs:
        best = max(lp.top, key=lp.top.get)
        assert best == lp.token_id and lp.logprob == pytest.approx(lp.top[best]) and lp.logprob <= 0


@ASYNC
def test_stop_strings_eos_and_length(llama, asynchronous):
    base, _ = llama
    llm = LLM(str(base), num_kv_blocks=128, max_loras=0, async_scheduling=asynchronous)
    free = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    assert free.finish_reason == "length" and len(free.output_token_ids) == 12
    stop = free.text[3:5]
    cut = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=12, stop=[stop, "\0never"],
                                                  ignore_eos=True))[0]
    assert cut.finish_reason == "stop" and cut.text == free.text[:free.text.index(stop)]
    # a random model rarely emits its real eos: declare a token it does emit to be eos instead
    eos = free.output_token_ids[4]
    scheduler = llm.engine.scheduler
    scheduler.config = dataclasses.replace(scheduler.config, eos_token_ids=(eos,))
    ended = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=12))[0]
    first = free.output_token_ids.index(eos)
    assert ended.finish_reason == "stop" and ended.output_token_ids == free.output_token_ids[:first + 1]
    # the step launched after the EOS (asynchronous) has nothing to read: it is not kept
    assert llm.engine._in_flight is None


def test_bad_requests_raise_clear_errors(llama):
    base, adapter = llama
    llm = LLM(str(base), {"a": str(adapter)}, max_loras=1, max_lora_rank=4, num_kv_blocks=64,
              max_model_len=32)
    assert llm.engine.model.rope_table.shape[0] == 32  # RoPE rows for the engine's context, not the config's
    with pytest.raises(AdapterError, match="not registered"):
        llm.generate("hi", GREEDY, "nope")
    with pytest.raises(RequestError, match="context length"):
        llm.generate("x" * 30, GREEDY)
    with pytest.raises(RequestError, match="empty"):
        llm.generate([[]], GREEDY)
    with pytest.raises(RequestError, match="vocabulary"):
        llm.generate([[1, 10_000]], GREEDY)
    with pytest.raises(AdapterError, match="max_lora_rank"):
        llm.engine.register_adapter("big", save_adapter(base, base.parent / "big", seed=1, rank=8))
    # generate(prompts, sampling, adapters) with the two swapped: the error names the order
    with pytest.raises(RequestError, match="sampling must be SamplingParams"):
        llm.generate(["hi"], "a")
    with pytest.raises(RequestError, match="adapters must be adapter names"):
        llm.generate(["hi"], None, GREEDY)
    assert not llm.engine.has_unfinished_requests()  # nothing half-queued after the errors


@ASYNC
def test_abort_frees_blocks_and_engine_keeps_serving(llama, asynchronous):
    base, adapter = llama
    llm = LLM(str(base), {"a": str(adapter)}, max_loras=1, max_lora_rank=4, num_kv_blocks=64,
              async_scheduling=asynchronous)
    engine = llm.engine
    keep = engine.add_request(PROMPTS[1], GREEDY, "a")
    drop = engine.add_request(PROMPTS[0], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    engine.step()
    assert engine.abort_request(drop)
    outs = {}
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o for o in engine.step()})
    assert set(outs) == {keep} and outs[keep].finished
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_thousand_registered_adapters(llama, tmp_path):
    base, adapter = llama
    names = {f"task{i:04d}": str(adapter) for i in range(1000)}
    llm = LLM(str(base), names, max_loras=4, max_lora_rank=4, num_kv_blocks=256)
    assert len(llm.engine.adapters.names) == 1000
    picked = [f"task{i:04d}" for i in range(0, 1000, 97)]  # 11 adapters through 4 slots
    outs = llm.generate([PROMPTS[0]] * len(picked), GREEDY, picked)
    # every name points at the same weights, so every output equals the single-adapter one
    assert len({tuple(o.output_token_ids) for o in outs}) == 1
    assert llm.engine.adapters.num_loads >= len(picked)


def test_replacing_an_adapter_drops_its_stale_prefix_cache(llama, tmp_path):
    base, adapter = llama
    other = save_adapter(base, tmp_path / "other", seed=99, rank=4)
    llm = LLM(str(base), {"a": str(adapter)}, max_loras=1, max_lora_rank=4, num_kv_blocks=64, block_size=4)
    before = llm.generate(PROMPTS[1], GREEDY, "a")[0].output_token_ids
    llm.engine.register_adapter("a", other)
    after = llm.generate(PROMPTS[1], GREEDY, "a")[0].output_token_ids
    fresh = LLM(str(base), {"a": str(other)}, max_loras=1, max_lora_rank=4, num_kv_blocks=64, block_size=4)
    assert after == fresh.generate(PROMPTS[1], GREEDY, "a")[0].output_token_ids != before
    shutil.rmtree(other)


def test_prefetch_loads_waiting_adapters_ahead_and_changes_no_output(llama, tmp_path):
    """One request runs at a time: the adapters of the waiting ones are loaded between steps into free
    slots (prefetches), so only the first adapter loads on a step's critical path; tokens are the same
    as without prefetch."""
    base, adapter = llama
    adapters = {"a": str(adapter), **{n: str(save_adapter(base, tmp_path / n, seed=s, rank=4))
                                      for n, s in (("b", 31), ("c", 32), ("d", 33))}}
    names = ["a", "b", "c", "d"]
    outs = {}
    for prefetch in (True, False):
        llm = LLM(str(base), adapters, max_loras=4, max_lora_rank=4, num_kv_blocks=128, max_num_seqs=1,
                  prefetch_adapters=prefetch)
        outs[prefetch] = [o.output_token_ids for o in llm.generate(PROMPTS[:4], GREEDY, names)]
        stats = llm.engine.stats()
        assert stats["adapter_loads"] == 4
        assert stats["adapter_prefetches"] == (3 if prefetch else 0)
    assert outs[True] == outs[False]
    assert len({tuple(o) for o in outs[True]}) > 1  # the adapters really differ


def test_prefetch_never_evicts_adapters_of_running_requests(llama):
    base, adapter = llama
    llm = LLM(str(base), {n: str(adapter) for n in "abcd"}, max_loras=2, max_lora_rank=4, num_kv_blocks=64)
    manager = llm.engine.adapters
    slots = manager.activate({"a", "b"})
    assert manager.prefetch(["c", "d"], keep={"a", "b"}) == 0  # every slot is needed
    assert manager.prefetch(["c", "d"], keep={"a"}) == 1  # b's slot goes to c; d finds none left
    assert manager.slot_of("a") == slots["a"] and manager.slot_of("c") == slots["b"]
    assert manager.slot_of("b") is None and manager.slot_of("d") is None
    assert manager.num_prefetches == 1


@pytest.mark.parametrize("family", FAMILIES[:1], indirect=True, ids=["llama"])
def test_adapters_with_rank_patterns_and_layer_subsets_match_peft(family, tmp_path):
    """Adapters whose slices have different ranks (rank_pattern, alpha_pattern) or that cover only
    some layers (layers_to_transform) go through the slots stacked over layers, zero-padded to each
    slice's largest rank; four adapters of different ranks and targets share two slots, so slots
    are reloaded over adapters of other shapes."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base, adapters = family
    torch.manual_seed(21)
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj",
                                                      "down_proj"],
                   rank_pattern={"q_proj": 8, "up_proj": 2}, alpha_pattern={"v_proj": 3},
                   layers_to_transform=[1], lora_dropout=0.0))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    peft_model.save_pretrained(tmp_path / "patterned", safe_serialization=True)
    mixed = {"p": tmp_path / "patterned", **adapters}
    names = ["b", "c", None, "p", "a", "p"]  # b (rank 8 on v) leaves rows that p (rank 4 on v) must clear
    expect = hf_greedy(base, mixed, PROMPTS, names)
    llm = LLM(str(base), {k: str(v) for k, v in mixed.items()}, max_loras=2, max_lora_rank=8,
              num_kv_blocks=256, block_size=4)
    assert [o.output_token_ids for o in llm.generate(PROMPTS, GREEDY, names)] == expect
    assert llm.engine.adapters.num_loads >= 3


def test_prefill_warm_up_writes_only_the_sink_block(llama):
    """The start-up prefill warm-up (run on GPUs) sends every K/V to the spare sink block: the real
    cache is untouched and later outputs are unchanged. Run here on the CPU path."""
    base, adapter = llama
    llm = LLM(str(base), {"a": str(adapter)}, max_loras=2, max_lora_rank=4, num_kv_blocks=64,
              max_num_batched_tokens=300)
    before = llm.generate(PROMPTS[:2], GREEDY, ["a", None])
    runner = llm.engine.runner
    real = runner.sink_slot  # slots below it belong to the block manager's blocks
    kept = [(k[:real].clone(), v[:real].clone()) for k, v in runner.kv_caches]
    runner.warm_prefill(300)
    for (k, v), (k0, v0) in zip(runner.kv_caches, kept):
        assert torch.equal(k[:real], k0) and torch.equal(v[:real], v0)
        assert k[real:].abs().sum() > 0  # the warm-up did write its K/V (to the sink)
    after = llm.generate(PROMPTS[:2], GREEDY, ["a", None])
    assert [o.output_token_ids for o in after] == [o.output_token_ids for o in before]


def test_async_scheduling_launches_the_next_step_before_reading_the_last(llama):
    base, adapter = llama
    llm = LLM(str(base), {"a": str(adapter)}, max_loras=1, max_lora_rank=4, num_kv_blocks=64,
              async_scheduling=True)
    runner, events = llm.engine.runner, []
    launch = runner.launch

    def logged(plan):
        pending = launch(plan)
        events.append(("launch", plan.step))
        result = pending.result

        def read():
            events.append(("read", plan.step))
            return result()

        pending.result = read
        return pending

    runner.launch = logged
    outs = llm.generate(PROMPTS[:3], GREEDY, ["a", None, "a"])
    assert all(len(o.output_token_ids) == GREEDY.max_tokens for o in outs)
    launched = [step for kind, step in events if kind == "launch"]
    # one prefill step and nine decode steps: nothing is launched past max_tokens
    assert len(launched) == GREEDY.max_tokens
    for i, (kind, step) in enumerate(events):
        if kind == "read" and step != launched[-1]:
            assert events.index(("launch", step + 1)) < i  # step + 1 was queued first
    assert [kind for kind, _ in events].count("read") == len(launched)


def test_async_failed_step_fails_its_requests_and_the_engine_serves_on(llama):
    base, adapter = llama
    llm = LLM(str(base), {"a": str(adapter)}, max_loras=1, max_lora_rank=4, num_kv_blocks=64,
              async_scheduling=True)
    engine = llm.engine
    expect = llm.generate(PROMPTS[1], GREEDY, "a")[0].output_token_ids
    assert engine._in_flight is None  # a drained engine keeps no step to read
    launch, calls = engine.runner.launch, []

    def failing_read(plan):
        pending = launch(plan)
        calls.append(plan.step)
        if len(calls) == 3:
            def boom():
                raise RuntimeError("device fell over")
            pending.result = boom
        return pending

    engine.runner.launch = failing_read
    for prompt, name in zip(PROMPTS[:2], ["a", None]):
        engine.add_request(prompt, GREEDY, name)
    with pytest.raises(RuntimeError, match="fell over"):
        while engine.has_unfinished_requests():
            engine.step()
    del engine.runner.launch
    # the engine itself failed the requests of the unread steps (LLM.generate would abort all)
    assert not engine.has_unfinished_requests() and engine._in_flight is None
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert llm.generate(PROMPTS[1], GREEDY, "a")[0].output_token_ids == expect


def test_kv_blocks_and_adapter_slots_share_one_memory_budget(tiny_model):
    """Without num_kv_blocks the KV cache is sized from one budget (kv_cache_gib on the CPU) that
    the adapter slots come out of first: each slot costs its bytes in KV blocks, and slots that
    leave no KV block are a clear ConfigError."""
    from inlaid.engine.block_manager import kv_block_bytes
    from inlaid.engine.llm_engine import EngineConfig, LLMEngine
    from inlaid.errors import ConfigError

    def engine(max_loras, gib=0.01):
        return LLMEngine(EngineConfig(model=str(tiny_model), max_loras=max_loras, max_lora_rank=16,
                                      kv_cache_gib=gib, block_size=4, max_num_seqs=4, enforce_eager=True))

    plain = engine(0)
    s = plain.model.shape
    per_block = kv_block_bytes(s.num_layers, s.num_kv_heads, s.head_dim, 4, plain.model.dtype.itemsize)
    budget = int(0.01 * 2**30)
    assert plain.block_manager.num_blocks == budget // per_block - 1  # less the graph padding sink
    four = engine(4)
    slot = sum(t.numel() * t.element_size() for bank in four.model.lora_banks.values()
               for t in (*bank.lora_a, *bank.lora_b, bank.ranks, bank.scalings)) // 4
    assert slot > per_block  # the test means something: a slot costs whole blocks
    assert four.block_manager.num_blocks == (budget - 4 * slot) // per_block - 1
    with pytest.raises(ConfigError, match="adapter slots"):
        engine(4, gib=3.5 * slot / 2**30)



@pytest.mark.parametrize("rope_scaling", [
    None, {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    {"rope_type": "dynamic", "factor": 2.0}], ids=["default", "linear", "llama3", "yarn", "dynamic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_rows_equal_transformers_call(rope_scaling, dtype):
    """A step's cos/sin come from a table made once (one gather a step instead of transformers'
    kernels); its rows are bit-identical to transformers' call on any batch of positions. Dynamic
    scaling, whose frequencies follow the batch, keeps the call."""
    from types import SimpleNamespace

    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from inlaid.engine.model import CausalLM

    from ..conftest import tiny_config

    config = tiny_config(**({"rope_scaling": rope_scaling} if rope_scaling else {}))
    model = SimpleNamespace(rope=LlamaRotaryEmbedding(config=config), device=torch.device("cpu"), dtype=dtype)
    model.rope_table = CausalLM._rope_table(model, config.max_position_embeddings)
    assert (model.rope_table is None) == (rope_scaling is not None and rope_scaling["rope_type"] == "dynamic")
    probe = torch.empty(0, dtype=dtype)
    for positions in (torch.tensor([0, 5, 5, 200, 31, 255]), torch.randperm(256)[:40], torch.tensor([7])):
        cos, sin = CausalLM.rope_cos_sin(model, positions)
        want_cos, want_sin = model.rope(probe, positions[None, :])
        assert cos.dtype == dtype and torch.equal(cos, want_cos[0]) and torch.equal(sin, want_sin[0])
