"""What the Llama family looks like to inlaid: the seven projections, their shapes, their order."""

from __future__ import annotations

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTN + MLP

# Linears that read the same input share one Hessian; the order is GPTQ's true-sequential order.
HESSIAN_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("qkv", ("q_proj", "k_proj", "v_proj")),
    ("o", ("o_proj",)),
    ("gateup", ("gate_proj", "up_proj")),
    ("down", ("down_proj",)),
)


def module_path(layer: int, proj: str) -> str:
    parent = "self_attn" if proj in ATTN else "mlp"
    return f"model.layers.{layer}.{parent}.{proj}"


def projection_shapes(config) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each projection for an HF Llama/Mistral/Qwen2 config."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    inter = config.intermediate_size
    return {
        "q_proj": (heads * head_dim, hidden),
        "k_proj": (kv_heads * head_dim, hidden),
        "v_proj": (kv_heads * head_dim, hidden),
        "o_proj": (hidden, heads * head_dim),
        "gate_proj": (inter, hidden),
        "up_proj": (inter, hidden),
        "down_proj": (hidden, inter),
    }


def get_projection(layer_module, proj: str):
    return getattr(layer_module.self_attn if proj in ATTN else layer_module.mlp, proj)
