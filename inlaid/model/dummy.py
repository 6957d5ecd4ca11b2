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
    # CPU tests of the dummy path
    "tiny": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=300, num_hidden_layers=2),
}


def dummy_config(shape: str, num_layers: int | None = None):
    from transformers import LlamaConfig

    if shape not in SHAPES:
        raise ValueError(f"unknown dummy shape {shape!r}; known: {', '.join(SHAPES)}")
    kwargs = dict(SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2)
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


def dummy_weights(config, bits: int | None, device="cpu", seed: int = 0):
    """Random weights in the form the engine loads (:class:`inlaid.engine.model.LoadedWeights`),
    made directly on ``device`` so a 7B model takes seconds: dense fp16 (``bits=None``) or packed
    GPTQ with symmetric zero points and scales chosen so weights have std ≈ 0.02, like HF init."""
    from inlaid.engine.model import LoadedWeights
    from inlaid.quant.primitives import PackedLinear, group_index, max_code, pack_rows

    gen = torch.Generator(device=device).manual_seed(seed)
    fp16 = dict(device=device, dtype=torch.float16)
    dense = {"model.embed_tokens.weight": torch.randn(config.vocab_size, config.hidden_size, generator=gen, **fp16) * 0.02,
             "lm_head.weight": torch.randn(config.vocab_size, config.hidden_size, generator=gen, **fp16) * 0.02,
             "model.norm.weight": torch.ones(config.hidden_size, **fp16)}
    packed = {}
    shapes = projection_shapes(config)
    for layer in range(config.num_hidden_layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            dense[f"model.layers.{layer}.{norm}.weight"] = torch.ones(config.hidden_size, **fp16)
        for proj in PROJECTIONS:
            out_f, in_f = shapes[proj]
            name = module_path(layer, proj)
            if bits is None:
                dense[f"{name}.weight"] = torch.randn(out_f, in_f, generator=gen, **fp16) * 0.02
                continue
            group = 128 if in_f % 128 == 0 else in_f
            groups = in_f // group
            levels = max_code(bits) + 1
            codes_per_word = 32 // bits if 32 % bits == 0 else None
            if codes_per_word:  # any int32 is a valid word of codes: draw words directly
                qweight = torch.randint(-2**31, 2**31, (in_f // codes_per_word, out_f), generator=gen,
                                        device=device, dtype=torch.int64).to(torch.int32)
            else:  # 3-bit codes straddle words: pack real codes
                codes = torch.randint(0, levels, (in_f, out_f), generator=gen, device=device)
                qweight = pack_rows(codes.cpu(), bits).to(device)
            zero = levels // 2
            qzeros = pack_rows(torch.full((out_f, groups), zero - 1, dtype=torch.int64), bits).t()
            std_codes = levels / 12 ** 0.5  # uniform codes
            scales = torch.full((groups, out_f), 0.02 / std_codes, **fp16)
            packed[name] = PackedLinear(qweight=qweight, qzeros=qzeros.contiguous().to(device),
                                        scales=scales, g_idx=group_index(in_f, group).to(device), bits=bits)
    return LoadedWeights(dense, packed)


class DummyTokenizer:
    """Random-weight models have no vocabulary. Text maps to byte ids (3..258) and ids decode to
    characters (ids outside that range to ``<id>``), so prompts, streaming and stop strings still
    run end to end; the text itself means nothing."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0
    OFFSET = 3

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = [b + self.OFFSET for b in text.encode()]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        data, out = bytearray(), []
        for i in ids:
            if self.OFFSET <= i < 256 + self.OFFSET:
                data.append(i - self.OFFSET)
            elif not (skip_special_tokens and i < self.OFFSET):
                out.append(data.decode(errors="replace") + f"<{i}>")
                data = bytearray()
        return "".join(out) + data.decode(errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True, **_):
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        text += "assistant:" if add_generation_prompt else ""
        return self(text)["input_ids"] if tokenize else text
