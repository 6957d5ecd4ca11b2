"""inlaid's own Llama-family model (Llama, Mistral, Qwen2, SmolLM2) for serving.

Flat token batches (no padding), a paged KV cache, fused q/k/v and gate/up projections, and every
projection a :class:`QuantLinear` with multi-LoRA slots: the base is a GPTQ checkpoint (2/3/4/8-bit,
through ``inlaid.kernels``) or dense fp16/fp32 weights. The math follows transformers' modeling_llama
(fp32 RMSNorm statistics, rotate-half RoPE, SiLU MLP), so greedy outputs are token-identical to HF
+ PEFT in fp32 — the engine tests check exactly that.

Weights come from an HF safetensors directory or an inlaid checkpoint (see :func:`load_weights`).
On the CPU a quantized checkpoint is dequantized once at load (``dequantize=True``): the reference
kernel would otherwise dequantize every weight on every step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from inlaid.errors import ModelLoadError
from inlaid.engine.attention import AttentionBatch, paged_attention, write_kv
from inlaid.kernels import dispatch
from inlaid.kernels.lora import LoraBatchMeta, lora_backend, lora_expand
from inlaid.kernels.qlinear import DenseLinear, LoraBank, LoraSlots, QuantLinear
from inlaid.kernels.quant_matmul import prepare, refresh_backend_state
from inlaid.model.arch import HESSIAN_GROUPS, module_path
from inlaid.quant.primitives import PackedLinear, concat_packed, dequantize_linear

# Fused modules: the projections that read one input (the same grouping as GPTQ's shared Hessians).
FUSED = dict(HESSIAN_GROUPS)


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    sliding_window: int | None

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        heads = config.num_attention_heads
        window = getattr(config, "sliding_window", None)
        if getattr(config, "use_sliding_window", True) is False:  # Qwen2 declares one but disables it
            window = None
        return cls(config.num_hidden_layers, config.hidden_size, heads,
                   getattr(config, "num_key_value_heads", None) or heads,
                   getattr(config, "head_dim", None) or config.hidden_size // heads,
                   config.vocab_size, config.rms_norm_eps, window)


@dataclass
class LoadedWeights:
    """Everything read from disk, on the CPU: dense tensors by HF name, quantized linears by module."""

    dense: dict[str, torch.Tensor]
    packed: dict[str, PackedLinear]

    def linear(self, name: str) -> PackedLinear | DenseLinear:
        if name in self.packed:
            return self.packed[name]
        try:
            return DenseLinear(self.dense[f"{name}.weight"], self.dense.get(f"{name}.bias"))
        except KeyError:
            raise ModelLoadError(f"weights for {name} are missing") from None


def _read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as fh:
                for key in fh.keys():
                    tensors[key] = fh.get_tensor(key)
        except (SafetensorError, OSError) as exc:  # truncated or overwritten weights
            raise ModelLoadError(f"{file}: not a readable safetensors file ({exc})") from None
    return tensors


def load_weights(path: Path, quantized: bool) -> LoadedWeights:
    """Read an HF safetensors dir (``quantized=False``) or an inlaid checkpoint."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path}: no *.safetensors weight files")
    tensors = _read_safetensors(files)
    packed = {}
    if quantized:
        bits = int(json.loads((Path(path) / "config.json").read_text())["quantization_config"]["bits"])
        for key in [k for k in tensors if k.endswith(".qweight")]:
            name = key[:-len(".qweight")]
            try:
                packed[name] = PackedLinear(
                    qweight=tensors.pop(key), qzeros=tensors.pop(f"{name}.qzeros"),
                    scales=tensors.pop(f"{name}.scales"), g_idx=tensors.pop(f"{name}.g_idx"), bits=bits,
                    bias=tensors.pop(f"{name}.bias", None))
            except KeyError as exc:
                raise ModelLoadError(f"{path}: {name} has a qweight but no {exc.args[0]}") from None
    return LoadedWeights(tensors, packed)


def _fuse(parts: list[PackedLinear | DenseLinear]) -> PackedLinear | DenseLinear:
    if all(isinstance(p, PackedLinear) for p in parts):
        return concat_packed(parts)
    dense = [p if isinstance(p, DenseLinear) else DenseLinear(dequantize_linear(p), p.bias)
             for p in parts]
    biases = [p.bias for p in dense]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([b if b is not None else torch.zeros(p.out_features, dtype=p.weight.dtype)
                          for p, b in zip(dense, biases)])
    return DenseLinear(torch.cat([p.weight for p in dense]), bias)


def _to_device(base: PackedLinear | DenseLinear, device, dtype, dequantize: bool):
    if isinstance(base, PackedLinear):
        if not dequantize:
            return prepare(base, device, dtype)
        base = DenseLinear(dequantize_linear(base), base.bias)
    bias = None if base.bias is None else base.bias.to(device=device, dtype=dtype)
    return DenseLinear(base.weight.to(device=device, dtype=dtype).contiguous(), bias)


class Ops:
    """The small ops between the projections: RMSNorm (with the residual add before it), RoPE with
    the KV-cache write, SiLU-and-mul. Torch, or fused Triton kernels (one launch each, see
    ``inlaid.kernels.triton.norm_rope``) by the dispatch table's ``norm_rope`` row."""

    def __init__(self, device: torch.device):
        self.fused = dispatch.choose("norm_rope", device) == "triton"
        if self.fused:
            from inlaid.kernels.triton import norm_rope

            self._k = norm_rope

    def norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return self._k.rms_norm_triton(x, weight, eps) if self.fused else rms_norm(x, weight, eps)

    def add_norm(self, h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 lora: PendingLora | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(h + delta), h + delta); ``delta`` None: (norm(h), h). With ``lora`` (the shrink
        output of the projection that made ``delta``) its LoRA update is expanded into ``delta``
        first: for decode-sized steps on the GPU inside the same kernel."""
        if lora is not None:
            if self._takes_expand(delta, "norm_lora"):
                slots = lora.slots
                return self._k.add_rms_norm_lora_triton(h, delta, weight, eps, lora.buf, slots.lora_b[0],
                                                        lora.meta.slot_of_token, slots.ranks)
            lora.expand_into(delta)
        if delta is None:
            return self.norm(h, weight, eps), h
        if self.fused:
            return self._k.add_rms_norm_triton(h, delta, weight, eps)
        h = h + delta
        return rms_norm(h, weight, eps), h

    def _takes_expand(self, y: torch.Tensor, op: str) -> bool:
        """Whether the fused kernel after a projection adds its LoRA update itself (the dispatch
        row ``op``: decode-sized steps on the GPU)."""
        return (self.fused and lora_backend(y) == "triton"
                and dispatch.choose(op, y.device, m=y.shape[0]) == "fused")

    def rope_write_kv(self, qkv: torch.Tensor, s: ModelShape, cos: torch.Tensor, sin: torch.Tensor,
                      kv: tuple[torch.Tensor, torch.Tensor], slot_mapping: torch.Tensor,
                      buf: torch.Tensor | None = None, slots: LoraSlots | None = None,
                      meta: LoraBatchMeta | None = None) -> torch.Tensor:
        """From the fused q/k/v output [T, (heads + 2 kv_heads) d]: rotated q [T, heads, d]; rotated
        k and v written to the cache slots. With ``buf`` (the projection's shrink output; ``slots``
        its adapters, ``meta`` the step's grouping) the LoRA update is expanded into q/k/v first:
        for decode-sized T on the GPU inside the same kernel."""
        fuse = buf is not None and self._takes_expand(qkv, "rope_lora")
        if buf is not None and not fuse:
            lora_expand(buf, slots.lora_b, meta, slots.ranks, qkv, slots.offsets)
        kv_width = s.num_kv_heads * s.head_dim
        q, k, v = qkv.split([s.num_heads * s.head_dim, kv_width, kv_width], dim=-1)
        heads = (-1, s.num_kv_heads, s.head_dim)
        q, k, v = q.reshape(-1, s.num_heads, s.head_dim), k.reshape(heads), v.reshape(heads)
        if fuse:
            return self._k.rope_write_kv_lora_triton(q, k, v, cos, sin, kv[0], kv[1], slot_mapping, buf,
                                                     slots.lora_b, meta.slot_of_token, slots.ranks)
        if self.fused:
            return self._k.rope_write_kv_triton(q, k, v, cos, sin, kv[0], kv[1], slot_mapping)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        write_kv(kv[0], kv[1], k, v, slot_mapping)
        return q

    def rope_attention(self, qkv: torch.Tensor, s: ModelShape, cos: torch.Tensor, sin: torch.Tensor,
                       kv: tuple[torch.Tensor, torch.Tensor], attn: AttentionBatch, scale: float,
                       buf: torch.Tensor | None = None, slots: LoraSlots | None = None,
                       meta: LoraBatchMeta | None = None) -> torch.Tensor:
        """Attention output [T, heads, d] from the fused q/k/v output: :meth:`rope_write_kv`, then
        attention over the paged cache. For all-decode steps on the GPU one kernel does both (the
        dispatch row ``rope_attention``), with q/k/v's LoRA update where ``rope_lora`` fuses it."""
        if (self.fused and attn.all_decode and attn.decode_tables is not None
                and dispatch.choose("decode_attention", qkv.device) == "mma"
                and dispatch.choose("rope_attention", qkv.device) == "fused"
                and (buf is None or self._takes_expand(qkv, "rope_lora"))):
            from inlaid.kernels.triton.rope_attention import rope_decode_attention

            lora = None if buf is None else (buf, slots.lora_b, meta.slot_of_token, slots.ranks)
            return rope_decode_attention(qkv, s.num_heads, s.num_kv_heads, cos, sin, kv[0], kv[1],
                                         attn.slot_mapping, attn.decode_tables, attn.decode_lens32,
                                         attn.block_size, scale, s.sliding_window, lora)
        q = self.rope_write_kv(qkv, s, cos, sin, kv, attn.slot_mapping, buf, slots, meta)
        return paged_attention(q, kv[0], kv[1], attn, scale, s.sliding_window)

    def silu_mul(self, gate_up: torch.Tensor, buf: torch.Tensor | None = None,
                 slots: LoraSlots | None = None, meta: LoraBatchMeta | None = None) -> torch.Tensor:
        """silu(gate) * up from the fused [T, 2I] gate/up output. With ``buf`` (the projection's
        shrink output; ``slots`` its adapters, ``meta`` the step's grouping) the LoRA update is
        expanded into gate/up first: for decode-sized T on the GPU inside the same kernel."""
        if buf is not None:
            if self._takes_expand(gate_up, "silu_lora"):
                return self._k.silu_mul_lora_triton(gate_up, buf, slots.lora_b, meta.slot_of_token,
                                                    slots.ranks)
            lora_expand(buf, slots.lora_b, meta, slots.ranks, gate_up, slots.offsets)
        if self.fused:
            return self._k.silu_mul_triton(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return nn.functional.silu(gate) * up


@dataclass(frozen=True)
class PendingLora:
    """A one-slice projection's LoRA update not yet added to its output: the shrink's buffer, the
    projection's adapter slots and the step's grouping. The next residual add + norm adds it."""

    buf: torch.Tensor
    slots: LoraSlots
    meta: LoraBatchMeta

    def expand_into(self, y: torch.Tensor) -> None:
        lora_expand(self.buf, self.slots.lora_b, self.meta, self.slots.ranks, y, self.slots.offsets)


def _pending(linear: QuantLinear, x: torch.Tensor, meta: LoraBatchMeta | None
             ) -> tuple[torch.Tensor, PendingLora | None]:
    """A one-slice projection's base output and its pending LoRA update (None without one)."""
    y, buf = linear.base_and_shrink(x, meta)
    return y, None if buf is None else PendingLora(buf, linear.lora, meta)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # statistics in fp32 then back to the activation dtype before the weight, as transformers does
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, d]; cos/sin [T, d]."""
    return x * cos[:, None, :] + _rotate_half(x) * sin[:, None, :]


class DecoderLayer(nn.Module):
    def __init__(self, shape: ModelShape, linears: dict[str, QuantLinear], norms: tuple[torch.Tensor, ...],
                 ops: Ops):
        super().__init__()
        self.shape, self.ops = shape, ops
        self.linears = linears  # fused module name (FUSED keys) -> QuantLinear
        self.input_norm, self.post_attention_norm = norms
        s = shape
        self.q_width = s.num_heads * s.head_dim
        self.scale = s.head_dim ** -0.5

    def forward(self, h: torch.Tensor, delta: torch.Tensor | None, pending: PendingLora | None,
                cos: torch.Tensor, sin: torch.Tensor, attn: AttentionBatch,
                kv: tuple[torch.Tensor, torch.Tensor], lora: LoraBatchMeta | None
                ) -> tuple[torch.Tensor, torch.Tensor, PendingLora | None]:
        """(h, delta, pending) -> (h', delta', pending'): the residual stream is h + delta, where
        delta still lacks the LoRA update ``pending``. The MLP's output is handed on unadded, with
        its update, so the next norm can add both in the same kernel (one launch, not three)."""
        s, lin, ops = self.shape, self.linears, self.ops
        x, h = ops.add_norm(h, delta, self.input_norm, s.rms_norm_eps, pending)
        qkv, buf = lin["qkv"].base_and_shrink(x, lora)
        o = ops.rope_attention(qkv, s, cos, sin, kv, attn, self.scale, buf, lin["qkv"].lora, lora)
        o, pending = _pending(lin["o"], o.reshape(-1, self.q_width), lora)
        x, h = ops.add_norm(h, o, self.post_attention_norm, s.rms_norm_eps, pending)
        gate_up, buf = lin["gateup"].base_and_shrink(x, lora)
        down, pending = _pending(lin["down"], ops.silu_mul(gate_up, buf, lin["gateup"].lora, lora), lora)
        return h, down, pending


class CausalLM(nn.Module):
    """Forward over a flat batch of tokens: embeddings -> decoder layers -> final norm."""

    def __init__(self, config, weights: LoadedWeights, device="cpu", dtype=torch.float32,
                 max_loras: int = 0, max_lora_rank: int = 0, dequantize: bool | None = None,
                 max_positions: int | None = None):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        self.config = config
        self.shape = s = ModelShape.from_config(config)
        self.device, self.dtype = torch.device(device), dtype
        self.retired_state: list[dict] = []  # see swap_layer
        if dequantize is None:
            dequantize = self.device.type == "cpu"
        self.is_quantized = bool(weights.packed) and not dequantize
        d = weights.dense

        def tensor(name):
            if name not in d:
                raise ModelLoadError(f"weight {name} is missing")
            return d[name].to(device=device, dtype=dtype)

        self.ops = Ops(self.device)
        self.embed = tensor("model.embed_tokens.weight")
        self.norm = tensor("model.norm.weight")
        self.lm_head = tensor("lm_head.weight") if "lm_head.weight" in d else self.embed  # tied
        # transformers computes cos/sin (and any rope_scaling: llama3, yarn, linear, ...) from the config
        self.rope = LlamaRotaryEmbedding(config=config).to(self.device)
        # sized by the engine's context: a 1M-position config serving 32K keeps a 32K table
        self.rope_table = self._rope_table(max_positions or config.max_position_embeddings)
        self.lora_slots: list[dict[str, LoraSlots]] = []  # per layer: views into lora_banks
        self.lora_banks: dict[str, LoraBank] = {}  # per fused group: every layer's slots
        layers = []
        for i in range(s.num_layers):
            linears, slots = {}, {}
            for group, projs in FUSED.items():
                base = _fuse([weights.linear(module_path(i, p)) for p in projs])
                base = _to_device(base, device, dtype, dequantize)
                widths = [base.out_features // 2] * 2 if group == "gateup" else None
                if group == "qkv":
                    widths = [s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim,
                              s.num_kv_heads * s.head_dim]
                lora = None
                if max_loras > 0:
                    if group not in self.lora_banks:
                        self.lora_banks[group] = LoraBank(s.num_layers, base.in_features,
                                                          widths or [base.out_features], max_loras,
                                                          max_lora_rank, device, dtype)
                    lora = slots[group] = self.lora_banks[group].layer(i)
                linears[group] = QuantLinear(base, lora)
            norms = (tensor(f"model.layers.{i}.input_layernorm.weight"),
                     tensor(f"model.layers.{i}.post_attention_layernorm.weight"))
            layers.append(DecoderLayer(s, linears, norms, self.ops))
            self.lora_slots.append(slots)
        self.layers = layers

    @torch.inference_mode()
    def swap_layer(self, layer: int, weights: LoadedWeights) -> None:
        """Copy layer ``layer``'s projections from ``weights`` into the live tensors, in place: CUDA
        graphs captured earlier keep pointing at the same memory. Shapes must match (a
        re-quantization of the same base with the same settings). The CUDA GEMM's re-laid-out copy
        is rebuilt in place too. Other backend state built from the old weights (exllamav2's
        q-matrix) is retired, not freed: graphs captured earlier may still read it until the
        caller re-captures them after the last layer (``release_retired``)."""
        for group, projs in FUSED.items():
            live = self.layers[layer].linears[group].quant
            new = _to_device(_fuse([weights.linear(module_path(layer, p)) for p in projs]),
                             self.device, self.dtype, dequantize=not self.is_quantized)
            names = ("weight", "bias") if isinstance(live, DenseLinear) else \
                ("qweight", "scales", "zeros", "g_idx", "qzeros", "bias")
            for name in names:
                old, value = getattr(live, name), getattr(new, name)
                if (old is None) != (value is None) or (old is not None and old.shape != value.shape):
                    raise ModelLoadError(f"layer {layer} {group}.{name}: new weights do not fit the "
                                         "served model")
                if old is not None:
                    old.copy_(value)
            if not isinstance(live, DenseLinear):
                live.group_size = new.group_size
                self.retired_state += refresh_backend_state(live)

    def release_retired(self) -> None:
        """Free backend state retired by ``swap_layer`` (after the graphs are re-captured)."""
        self.retired_state.clear()

    @torch.inference_mode()
    def warmup(self, max_tokens: int) -> None:
        """Run every projection once at a decode-sized and a prefill-sized M, so backends build
        their load-time state (exllamav2 q-matrices, Triton compiles) before free memory is
        measured for the KV cache."""
        for m in sorted({1, min(64, max_tokens), max_tokens}):
            for layer in self.layers:
                for linear in layer.linears.values():
                    linear(torch.zeros(m, linear.quant.in_features, device=self.device, dtype=self.dtype))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _rope_table(self, length: int) -> torch.Tensor | None:
        """cos and sin of every position below ``length``, [length, 2, head_dim], from transformers'
        own call: a step then gathers its rows in one kernel instead of running that call's chain of
        small ones (cast, position x frequency product, cat, cos, sin, scaling, casts: on the GPU
        each a dependent launch at the head of every decode step). Each row depends on
        its position alone (one fp32 product per frequency, then cos/sin), so the rows equal what the
        call gives for any batch of positions. Not for dynamic or longrope scaling, whose
        frequencies follow the batch's longest position: those keep the call."""
        if getattr(self.rope, "rope_type", "default") in ("dynamic", "longrope"):
            return None
        probe = torch.empty(0, device=self.device, dtype=self.dtype)
        cos, sin = self.rope(probe, torch.arange(length, device=self.device)[None, :])
        return torch.stack([cos[0], sin[0]], 1)

    def rope_cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [T, head_dim] of ``positions`` [T], each below ``max_positions`` (the engine's
        max_model_len)."""
        if self.rope_table is not None:
            rows = self.rope_table[positions]
            return rows[:, 0], rows[:, 1]
        probe = torch.empty(0, device=self.device, dtype=self.dtype)
        cos, sin = self.rope(probe, positions[None, :])
        return cos[0], sin[0]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBatch,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                lora: LoraBatchMeta | None = None) -> torch.Tensor:
        h, delta, pending = self.embed[input_ids], None, None
        cos, sin = self.rope_cos_sin(positions)
        for layer, kv in zip(self.layers, kv_caches):
            h, delta, pending = layer(h, delta, pending, cos, sin, attn, kv, lora)
        return self.ops.add_norm(h, delta, self.norm, self.shape.rms_norm_eps, pending)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return (hidden @ self.lm_head.t()).float()
