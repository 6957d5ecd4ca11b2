"""Fixtures: a tiny random Llama saved as an HF safetensors dir, a byte-level tokenizer with a chat
template, PEFT LoRA adapters made by peft itself, and calibration data files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def make_tokenizer():
    """Byte-level BPE without merges: every byte is one token, vocab 256 + 3 specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in ("<s>", "</s>", "<pad>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(model_type: str = "llama", **overrides):
    from transformers import AutoConfig

    kwargs = dict(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=256, eos_token_id=257,
                  pad_token_id=258)
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def save_tiny_model(path: Path, model_type: str = "llama", seed: int = 0, **overrides) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=torch.float32)
    # Random init of a tiny model is nearly linear; larger weights make activations (and Hessians)
    # less isotropic, closer to what real models show.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(path, safe_serialization=True)
    make_tokenizer().save_pretrained(path)
    return path


def save_adapter(base_dir: Path, out: Path, seed: int, rank: int = 4,
                 targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                 rslora: bool = False) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets),
                                                  lora_dropout=0.0, use_rslora=rslora))
    with torch.no_grad():  # B is zero at init; give the adapter a real effect
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    peft_model.save_pretrained(out, safe_serialization=True)
    return out


def write_data(path: Path, seed: int, rows: int = 24, kind: str = "text") -> Path:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "sql", "select", "from", "where", "sum", "count",
             "paris", "berlin", "madrid", "seven", "nine", "plus", "minus", "equals"]
    with open(path, "w") as fh:
        for _ in range(rows):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(6, 14)))
            if kind == "text":
                row = {"text": text}
            elif kind == "prompt":
                row = {"prompt": text, "response": text[::-1]}
            else:
                row = {"messages": [{"role": "user", "content": text},
                                    {"role": "assistant", "content": text.upper()}]}
            fh.write(json.dumps(row) + "\n")
    return path


def load_script(name: str):
    """Import ``scripts/<name>.py`` as a module (the scripts are not a package)."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_cli(args) -> int:
    """Run ``inlaid ARGS`` through main(), so errors take the real one-line + exit-code path."""
    import sys

    from inlaid.cli import main as cli_main

    old, sys.argv = sys.argv, ["inlaid", *map(str, args)]
    try:
        cli_main.main()
    except SystemExit as exc:
        return exc.code
    finally:
        sys.argv = old
    return 0


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_tasks(tmp_path_factory, tiny_model) -> dict[str, tuple[Path, Path]]:
    """Three tasks: name -> (adapter dir, data file), each with a different data shape."""
    root = tmp_path_factory.mktemp("tasks")
    kinds = {"sql": "text", "math": "prompt", "chat": "messages"}
    out = {}
    for seed, (name, kind) in enumerate(kinds.items()):
        adapter = save_adapter(tiny_model, root / f"adapter-{name}", seed=seed + 1, rank=2 + 2 * seed)
        data = write_data(root / f"{name}.jsonl", seed=seed, kind=kind)
        out[name] = (adapter, data)
    return out


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INLAID_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
