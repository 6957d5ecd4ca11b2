"""PEFT LoRA adapters: read (safetensors only), validate against the base, apply during calibration.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` as written by
``peft``. Supported: any subset of the seven Llama projections, per-module ranks (``rank_pattern``)
and alphas (``alpha_pattern``), rsLoRA scaling. Refused with a clear error: pickled weights, DoRA,
biases, embedding/lm_head LoRA, ``modules_to_save``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from inlaid.errors import AdapterError
from inlaid.model.arch import PROJECTIONS, get_projection, projection_shapes

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")


@dataclass
class LoraWeights:
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scaling: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class LoraAdapter:
    name: str
    path: Path
    config: dict
    weights: dict[tuple[int, str], LoraWeights] = field(default_factory=dict)
    # what drop_weights keeps of the weights: the metadata the engine still reads
    kept_targets: list[str] = field(default_factory=list)
    kept_rank: int = 0

    @property
    def target_modules(self) -> list[str]:
        return sorted({proj for _, proj in self.weights}) or self.kept_targets

    @property
    def max_rank(self) -> int:
        return max((w.rank for w in self.weights.values()), default=self.kept_rank)

    def drop_weights(self) -> None:
        """Free the weights once a copy of them serves (the engine's host copy), keeping
        ``target_modules`` and ``max_rank``."""
        self.kept_targets, self.kept_rank = self.target_modules, self.max_rank
        self.weights = {}

    def for_layer(self, layer: int) -> dict[str, LoraWeights]:
        return {proj: w for (i, proj), w in self.weights.items() if i == layer}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _pattern_value(pattern: dict, key: str, default):
    for pat, value in (pattern or {}).items():
        if re.search(rf"(^|\.){pat}$", key) or key.endswith(pat):
            return value
    return default


def load_adapter(path: Path, name: str) -> LoraAdapter:
    """Read a PEFT LoRA directory. Errors name the file and the problem in one line."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"adapter {name!r}: {path} is not a directory")
    weights_file = path / ADAPTER_WEIGHTS
    if not weights_file.is_file():
        if any((path / f).exists() for f in ("adapter_model.bin", "adapter_model.pt")):
            raise AdapterError(f"adapter {name!r}: {path} has only pickled weights (adapter_model.bin); "
                               "inlaid reads safetensors only: re-save it with safe_serialization=True")
        raise AdapterError(f"adapter {name!r}: {weights_file} not found")
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
    except FileNotFoundError:
        raise AdapterError(f"adapter {name!r}: {path / ADAPTER_CONFIG} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"adapter {name!r}: cannot read {ADAPTER_CONFIG}: {exc}") from exc
    _check_supported(name, config)
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError) as exc:
        raise AdapterError(f"adapter {name!r}: cannot read {weights_file}: {exc}") from exc

    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.search(key)
        if m is None:
            raise AdapterError(f"adapter {name!r}: unsupported tensor {key!r} (only LoRA A/B of "
                               f"{', '.join(PROJECTIONS)} are supported)")
        layer, proj, ab = int(m.group(1)), m.group(2), m.group(3)
        if proj not in PROJECTIONS:
            raise AdapterError(f"adapter {name!r}: unknown module {proj!r} in {key!r}")
        pairs.setdefault((layer, proj), {})[ab] = tensor
    if not pairs:
        raise AdapterError(f"adapter {name!r}: {weights_file} holds no LoRA weights")

    adapter = LoraAdapter(name=name, path=path, config=config)
    for (layer, proj), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"adapter {name!r}: layer {layer} {proj} lacks lora_A or lora_B")
        a, b = ab["A"], ab["B"]
        where = f"adapter {name!r}: layer {layer} {proj}"
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] == 0 or b.shape[1] != a.shape[0]:
            raise AdapterError(f"{where}: bad LoRA shapes A{tuple(a.shape)} B{tuple(b.shape)}")
        if not (a.is_floating_point() and b.is_floating_point()):
            raise AdapterError(f"{where}: LoRA weights must be floating point, got {a.dtype} / {b.dtype}")
        # one NaN or Inf would poison every token routed to the adapter, and a sampled request
        # on it fails inside the batch it shares with others: refuse it at load
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterError(f"{where}: LoRA weights hold NaN or Inf")
        rank = a.shape[0]
        key = f"layers.{layer}.{proj}"
        alpha = _pattern_value(config.get("alpha_pattern"), key, config.get("lora_alpha", rank))
        if not _is_number(alpha):
            raise AdapterError(f"adapter {name!r}: lora_alpha for {key} must be a number, got {alpha!r}")
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        if not math.isfinite(scale):
            raise AdapterError(f"adapter {name!r}: lora_alpha {alpha!r} gives a non-finite scaling")
        adapter.weights[(layer, proj)] = LoraWeights(a=a, b=b, scaling=float(scale))
    return adapter


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_supported(name: str, config) -> None:
    """The config's fields that inlaid reads, checked for type as well as value: a hand-edited or
    foreign config must give a clear error, never a TypeError from deep inside."""
    if not isinstance(config, dict):
        raise AdapterError(f"adapter {name!r}: {ADAPTER_CONFIG} must hold a JSON object, got "
                           f"{type(config).__name__}")
    peft_type = config.get("peft_type", "LORA")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        raise AdapterError(f"adapter {name!r}: peft_type {peft_type!r} is not LORA")
    if config.get("use_dora"):
        raise AdapterError(f"adapter {name!r}: DoRA adapters are not supported")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"adapter {name!r}: LoRA bias={config['bias']!r} is not supported")
    if config.get("modules_to_save"):
        raise AdapterError(f"adapter {name!r}: modules_to_save is not supported")
    if config.get("fan_in_fan_out"):
        raise AdapterError(f"adapter {name!r}: fan_in_fan_out is not supported for Llama models")
    r = config.get("r")
    if r is not None and (not isinstance(r, int) or isinstance(r, bool) or r <= 0):
        raise AdapterError(f"adapter {name!r}: rank r={r!r} must be a positive integer")
    for field_name in ("alpha_pattern", "rank_pattern"):
        pattern = config.get(field_name)
        if pattern is not None and not (isinstance(pattern, dict)
                                        and all(_is_number(v) for v in pattern.values())):
            raise AdapterError(f"adapter {name!r}: {field_name} must map module names to numbers")
        for key in pattern or {}:
            try:
                re.compile(key)
            except re.error as exc:
                raise AdapterError(f"adapter {name!r}: {field_name} key {key!r} is not a valid "
                                   f"pattern: {exc}") from None
    alpha = config.get("lora_alpha")
    if alpha is not None and not _is_number(alpha):
        raise AdapterError(f"adapter {name!r}: lora_alpha must be a number, got {alpha!r}")


def validate_adapter(adapter: LoraAdapter, model_config) -> None:
    """Every LoRA pair must name an existing layer and match that projection's shape."""
    shapes = projection_shapes(model_config)
    layers = model_config.num_hidden_layers
    for (layer, proj), w in adapter.weights.items():
        if layer >= layers:
            raise AdapterError(f"adapter {adapter.name!r}: layer {layer} does not exist "
                               f"(the base has {layers} layers)")
        out_f, in_f = shapes[proj]
        if w.a.shape[1] != in_f or w.b.shape[0] != out_f:
            raise AdapterError(
                f"adapter {adapter.name!r}: layer {layer} {proj} expects A[r, {in_f}] and "
                f"B[{out_f}, r], got A{tuple(w.a.shape)} B{tuple(w.b.shape)}: made for another base?")


@contextlib.contextmanager
def lora_active(layer_module, layer_index: int, adapter: LoraAdapter | None):
    """Apply ``adapter`` to one decoder layer's projections (y += s * B A x) while inside."""
    if adapter is None:
        yield
        return
    handles = []
    for proj, w in adapter.for_layer(layer_index).items():
        module = get_projection(layer_module, proj)
        a = w.a.to(device=module.weight.device, dtype=module.weight.dtype)
        b = w.b.to(device=module.weight.device, dtype=module.weight.dtype)

        def hook(_mod, inputs, output, a=a, b=b, s=w.scaling):
            return output + s * ((inputs[0] @ a.t()) @ b.t())

        handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
