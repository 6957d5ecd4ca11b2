"""Models and adapters with real shapes and random weights, for GPU timing without checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from inlaid.model.arch import PROJECTIONS, module_path, projection_shapes
from inlaid.model.lora import LoraAdapter, LoraWeights

SHAPES = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, num_hidden_layers=32),
    "llama-2-13b": dict(hidden_size=5120, intermediate_size=13824, num_attention_heads=40,
                        num_key_value_heads=40, vocab_size=32000, num_hidden_layers=40),
}


def dummy_config(shape: str, num_layers: int | None = None):
    from transformers import LlamaConfig

    if shape not in SHAPES:
        raise ValueError(f"unknown dummy shape {shape!r}; known: {', '.join(SHAPES)}")
    kwargs = dict(SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=False)
    if num_layers is not None:
        kwargs["num_hidden_layers"] = num_layers
    return LlamaConfig(**kwargs)


def dummy_model(shape: str, num_layers: int | None = None, dtype=torch.float16, seed: int = 0):
    """A random-weight LlamaForCausalLM of real layer shapes (std 0.02, like HF init)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(dummy_config(shape, num_layers)).to(dtype)
    return model.eval()


def random_lora_tensors(config, rank: int, seed: int, targets=PROJECTIONS) -> dict[tuple[int, str], tuple]:
    """(layer, proj) -> (A [r, in], B [out, r]) with a visible effect (B is not zero as at PEFT init)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = projection_shapes(config)
    out = {}
    for layer in range(config.num_hidden_layers):
        for proj in targets:
            out_f, in_f = shapes[proj]
            out[(layer, proj)] = (torch.randn(rank, in_f, generator=gen) / in_f**0.5,
                                  torch.randn(out_f, rank, generator=gen) * 0.02)
    return out


def random_adapter(config, name: str, rank: int = 16, seed: int = 0, alpha: float | None = None) -> LoraAdapter:
    alpha = 2 * rank if alpha is None else alpha
    weights = {k: LoraWeights(a=a, b=b, scaling=alpha / rank)
               for k, (a, b) in random_lora_tensors(config, rank, seed).items()}
    return LoraAdapter(name=name, path=Path("<random>"), config={"r": rank, "lora_alpha": alpha},
                       weights=weights)


def save_random_adapter(path: Path, config, rank: int, seed: int) -> None:
    """Write a random adapter in PEFT format (fp16 safetensors + adapter_config.json)."""
    tensors = {}
    for (layer, proj), (a, b) in random_lora_tensors(config, rank, seed).items():
        key = f"base_model.model.{module_path(layer, proj)}"
        tensors[f"{key}.lora_A.weight"] = a.half().contiguous()
        tensors[f"{key}.lora_B.weight"] = b.half().contiguous()
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0, "bias": "none",
        "target_modules": list(PROJECTIONS), "task_type": "CAUSAL_LM", "use_rslora": False}, indent=2))
