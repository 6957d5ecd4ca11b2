"""The HF + PEFT baseline on the tiny test model with real PEFT adapters, and on a dummy shape."""

import pytest

from inlaid.bench.baselines import HfOptions, load_hf_peft, run_hf_peft
from inlaid.bench.runner import BenchConfig, run_variant

from ..conftest import save_adapter
from .conftest import tiny_engine_config, tiny_workload


@pytest.fixture(scope="module")
def hf_adapters(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-adapters")
    return {name: str(save_adapter(tiny_model, root / name, seed=seed, rank=2 + 2 * seed))
            for seed, name in enumerate(("sql", "math"))}


@pytest.fixture(scope="module")
def workload():
    return tiny_workload(num_requests=5, num_adapters=2, pattern="uniform", batch_size=4)


@pytest.mark.parametrize("mode", ["per-adapter", "mixed"])
def test_hf_peft_batches(tiny_model, hf_adapters, workload, mode):
    options = HfOptions(model=str(tiny_model), adapters=hf_adapters, mode=mode, batch_size=4, realtime=False)
    hf = load_hf_peft(options, num_adapters=2)
    assert hf.rank_of == {"sql": 2, "math": 4}
    run = run_hf_peft(hf, workload, options)
    assert [t.output_tokens for t in run.timelines] == [r.output_len for r in workload.requests]
    prefills = [s for s in run.steps if s.kind == "prefill"]
    batches = [set(s.adapters) for s in prefills]
    if mode == "mixed":  # the oldest 4 whatever their adapter, then the last one
        assert len(prefills) == 2 and max(len(b) for b in batches) == 2
    else:  # one adapter per batch
        assert all(len(b) == 1 for b in batches) and len(prefills) >= 2
    batch_sizes = [s.num_decode_tokens for s in run.steps if s.kind == "decode"]
    assert sum(batch_sizes) >= sum(r.output_len for r in workload.requests) - len(workload.requests)
    first = {t.first_token_s for t in run.timelines}
    assert len(first) == len(prefills)  # a batch's requests share their first token


def test_hf_peft_dummy_shares_weights_across_names():
    hf = load_hf_peft(HfOptions(model="dummy:tiny", dummy_rank=4), num_adapters=6)
    assert hf.adapter_names == [f"dummy-{i}" for i in range(6)]
    layer = hf.model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["dummy-4"] is layer.lora_A["dummy-0"] and layer.lora_A["dummy-1"] is not layer.lora_A["dummy-0"]
    config = BenchConfig(tiny_engine_config(), baselines=("hf-peft-mixed",), warmup_requests=0, hf_max_requests=3)
    result = run_variant(config, tiny_workload(num_requests=4, num_adapters=3), "hf-peft-mixed")
    assert result.summary["num_completed"] == 3 and result.params["num_requests"] == 3  # the first 3 only
    assert result.target == "hf-peft"
    assert result.roofline["num_decode_steps"] >= 1 and result.params["policy"] == "mixed"
