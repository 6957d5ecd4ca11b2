import json
import shutil

import pytest
import torch

from inlaid.errors import AdapterError
from inlaid.model.lora import load_adapter, lora_active, validate_adapter

from ..conftest import save_adapter, save_tiny_model


@pytest.mark.parametrize("rslora", [False, True])
def test_hooks_reproduce_peft_forward(tmp_path, tiny_model, rslora):
    """Our adapter application (used during calibration) equals PEFT's own forward."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_dir = save_adapter(tiny_model, tmp_path / "a", seed=3, rank=4,
                               targets=("q_proj", "v_proj", "down_proj"), rslora=rslora)
    adapter = load_adapter(adapter_dir, "a")
    assert adapter.target_modules == ["down_proj", "q_proj", "v_proj"] and adapter.max_rank == 4
    expected_scale = 8 / 2 if rslora else 8 / 4
    assert all(w.scaling == expected_scale for w in adapter.weights.values())
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    validate_adapter(adapter, base.config)
    ids = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter_dir)(ids).logits
        with lora_active(base.model.layers[0], 0, adapter), lora_active(base.model.layers[1], 1, adapter):
            got = base(ids).logits
        plain = base(ids).logits  # hooks removed on exit
    assert torch.allclose(got, ref, atol=1e-5)
    assert not torch.allclose(plain, ref, atol=1e-3)


def test_adapter_errors(tmp_path, tiny_model):
    good = save_adapter(tiny_model, tmp_path / "good", seed=1, rank=2)
    other_base = save_tiny_model(tmp_path / "wide", hidden_size=96, intermediate_size=192)
    from transformers import AutoConfig

    with pytest.raises(AdapterError, match="made for another base"):
        validate_adapter(load_adapter(good, "g"), AutoConfig.from_pretrained(other_base))
    with pytest.raises(AdapterError, match="not a directory"):
        load_adapter(tmp_path / "missing", "m")

    pickled = tmp_path / "pickled"
    shutil.copytree(good, pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(AdapterError, match="safetensors only"):
        load_adapter(pickled, "p")

    dora = tmp_path / "dora"
    shutil.copytree(good, dora)
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(AdapterError, match="DoRA"):
        load_adapter(dora, "d")

    rank0 = tmp_path / "rank0"
    shutil.copytree(good, rank0)
    (rank0 / "adapter_config.json").write_text(json.dumps({**cfg, "r": 0}))
    with pytest.raises(AdapterError, match="rank"):
        load_adapter(rank0, "r")

    from safetensors.torch import load_file, save_file

    unknown = tmp_path / "unknown"
    shutil.copytree(good, unknown)
    tensors = load_file(str(unknown / "adapter_model.safetensors"))
    tensors["base_model.model.model.layers.0.self_attn.rotary.lora_A.weight"] = torch.zeros(2, 64)
    save_file(tensors, str(unknown / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="unknown module"):
        load_adapter(unknown, "u")

    corrupt = tmp_path / "corrupt"
    shutil.copytree(good, corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterError, match="cannot read"):
        load_adapter(corrupt, "c")


@pytest.mark.parametrize("change,match", [
    (lambda cfg: [cfg], "JSON object"),
    (lambda cfg: {**cfg, "r": "abc"}, "positive integer"),
    (lambda cfg: {**cfg, "r": True}, "positive integer"),
    (lambda cfg: {**cfg, "peft_type": None}, "not LORA"),
    (lambda cfg: {**cfg, "peft_type": 3}, "not LORA"),
    (lambda cfg: {**cfg, "lora_alpha": "x"}, "lora_alpha"),
    (lambda cfg: {**cfg, "alpha_pattern": []}, "alpha_pattern"),
    (lambda cfg: {**cfg, "alpha_pattern": {"q_proj": "x"}}, "alpha_pattern"),
    (lambda cfg: {**cfg, "rank_pattern": {"(": 4}}, "not a valid pattern"),
    (lambda cfg: {**cfg, "lora_alpha": 1e308, "use_rslora": False, "r": 2}, None),  # finite: loads
])
def test_malformed_adapter_configs_fail_with_adapter_errors(tmp_path, tiny_model, change, match):
    """A hand-edited or foreign adapter_config.json gives an AdapterError naming the field (the
    server turns it into a 400), never a TypeError or AttributeError from deep inside."""
    good = save_adapter(tiny_model, tmp_path / "good", seed=1, rank=2)
    cfg = json.loads((good / "adapter_config.json").read_text())
    (good / "adapter_config.json").write_text(json.dumps(change(cfg)))
    if match is None:
        load_adapter(good, "g")
        return
    with pytest.raises(AdapterError, match=match):
        load_adapter(good, "g")


@pytest.mark.parametrize("poison,match", [
    (lambda a: a.fill_(float("nan")), "NaN or Inf"),
    (lambda a: a.fill_(float("inf")), "NaN or Inf"),
    (lambda a: a.to(torch.int32), "floating point"),
    (lambda a: a[0, 0].clone(), "bad LoRA shapes"),  # a 0-d tensor
])
def test_adapter_tensors_that_would_poison_serving_are_refused(tmp_path, tiny_model, poison, match):
    from safetensors.torch import load_file, save_file

    good = save_adapter(tiny_model, tmp_path / "good", seed=1, rank=2)
    weights = good / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = next(k for k in sorted(tensors) if "lora_A" in k)
    changed = poison(tensors[key].clone())
    tensors[key] = changed if changed is not None else tensors[key]
    save_file(tensors, str(weights))
    with pytest.raises(AdapterError, match=match):
        load_adapter(good, "g")
