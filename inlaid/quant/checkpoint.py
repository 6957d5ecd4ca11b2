"""The inlaid checkpoint: a GPTQ v1 model directory with every task's adapter inlaid.

```
OUT/
  config.json             base config + quantization_config (gptq fields + an "inlaid" block)
  quantize_config.json    the same quantization fields (AutoGPTQ/GPTQModel convention)
  model.safetensors       qweight/qzeros/scales/g_idx per projection; embeddings, norms, lm_head fp16
  tokenizer files
  tasks.json              per task: adapter path + sha256, data path + sha256, samples, tokens
  adapters/<task>/        PEFT copies (adapter_config.json + adapter_model.safetensors)
  state/layer_NNN.safetensors   aggregation state per Hessian group (upper triangle, fp32)
  report.json             per-layer, per-task reconstruction error and timings of the last run
```
Writes go to a hidden temp directory beside OUT and are renamed into place at the end, so an
interrupted or failed run leaves OUT as it was (absent, or the previous checkpoint).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from inlaid.config import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, QuantConfig
from inlaid.errors import CheckpointError, ConfigError
from inlaid.quant.hessian import AggregationState
from inlaid.quant.primitives import PACKED_FIELDS, PackedLinear, dequantize_linear, packed_shape_mismatch

WEIGHTS = "model.safetensors"
TASKS = "tasks.json"
STATE_DIR = "state"
ADAPTERS_DIR = "adapters"
REPORT = "report.json"
FORMAT_VERSION = 1


class CheckpointWriter:
    """Stage a checkpoint in a temp dir; ``commit`` swaps it into place, anything else removes it."""

    def __init__(self, out_dir: Path, *, replace: bool, keep_previous: Path | None = None):
        """``keep_previous``: on commit, the checkpoint being replaced is moved there (replacing
        what was there) instead of deleted, for a caller that may still have to roll back."""
        self.out_dir = Path(out_dir)  # as given, for messages
        dest = self.out_dir.resolve()  # "." has no name to stage a sibling by
        self.replace = replace
        self.keep_previous = None if keep_previous is None else Path(keep_previous)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            self.path = Path(tempfile.mkdtemp(prefix=f".{dest.name}.inlaid-tmp-", dir=dest.parent))
        except OSError as exc:
            raise CheckpointError(f"cannot write {self.out_dir}: {exc.strerror or exc}") from None
        # mkdtemp makes it 0700; a checkpoint is read by other users and containers, as mkdir's
        # usual 0755 allows
        os.chmod(self.path, 0o755)
        (self.path / STATE_DIR).mkdir()
        self._dest = dest
        self.committed = False

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, *exc) -> None:
        if not self.committed:
            shutil.rmtree(self.path, ignore_errors=True)

    def write_state(self, layer: int, states: dict[str, AggregationState]) -> None:
        tensors: dict[str, torch.Tensor] = {}
        for group, state in states.items():
            tensors.update(state.to_tensors(group))
        save_file(tensors, str(self.path / STATE_DIR / f"layer_{layer:03d}.safetensors"))

    def commit(self) -> None:
        dest = self._dest
        if dest.exists():
            if not self.replace:
                raise CheckpointError(f"{self.out_dir} already exists")
            backup = self.keep_previous or dest.with_name(f".{dest.name}.inlaid-old")
            shutil.rmtree(backup, ignore_errors=True)
            dest.rename(backup)
            self.path.rename(dest)
            if self.keep_previous is None:
                shutil.rmtree(backup, ignore_errors=True)
        else:
            self.path.rename(dest)
        self.committed = True


def quantization_config(cfg: QuantConfig, inlaid_block: dict) -> dict:
    return {
        "quant_method": "gptq", "bits": cfg.bits, "group_size": cfg.group_size,
        "desc_act": cfg.desc_act, "sym": cfg.sym, "static_groups": cfg.static_groups,
        "damp_percent": cfg.damp_percent, "true_sequential": cfg.true_sequential,
        "checkpoint_format": "gptq", "inlaid": inlaid_block,
    }


def write_model(path: Path, model, packed: dict[str, PackedLinear], qconfig: dict) -> None:
    """model.safetensors + config.json + quantize_config.json into ``path``."""
    tensors: dict[str, torch.Tensor] = {}
    quantized_weights = {f"{name}.weight" for name in packed}
    quantized_biases = {f"{name}.bias" for name in packed}
    for name, tensor in model.state_dict().items():
        if name in quantized_weights or name in quantized_biases:
            continue
        if name == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False):
            continue
        tensors[name] = tensor.detach().to("cpu", torch.float16).contiguous()
    for name, p in packed.items():
        tensors.update({k: v.contiguous() for k, v in p.tensors(name).items()})
    save_file(tensors, str(path / WEIGHTS), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = qconfig
    config["torch_dtype"] = "float16"
    config["dtype"] = "float16"
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    quantize_config = {k: v for k, v in qconfig.items() if k != "quant_method"}
    (path / "quantize_config.json").write_text(json.dumps(quantize_config, indent=2, sort_keys=True))


@dataclass
class Checkpoint:
    """Read side of an inlaid checkpoint."""

    path: Path
    config: dict
    tasks: list[dict]

    @property
    def qconfig(self) -> dict:
        return self.config["quantization_config"]

    @property
    def inlaid(self) -> dict:
        return self.qconfig["inlaid"]

    @property
    def bits(self) -> int:
        return int(self.qconfig["bits"])

    def quant_config(self) -> QuantConfig:
        settings = self.inlaid.get("settings")
        try:
            return QuantConfig(**settings)
        except (TypeError, ConfigError) as exc:  # a hand-edited block: unknown keys or bad values
            raise CheckpointError(f"{self.path}/config.json: quantization_config.inlaid.settings is "
                                  f"not valid ({exc})") from None

    def packed(self) -> dict[str, PackedLinear]:
        tensors = load_file(str(self.path / WEIGHTS))
        out = {}
        for key in tensors:
            if key.endswith(".qweight"):
                name = key[: -len(".qweight")]
                out[name] = PackedLinear(
                    qweight=tensors[f"{name}.qweight"], qzeros=tensors[f"{name}.qzeros"],
                    scales=tensors[f"{name}.scales"], g_idx=tensors[f"{name}.g_idx"], bits=self.bits,
                    bias=tensors.get(f"{name}.bias"))
        return out

    def adapter_dirs(self) -> dict[str, Path]:
        """The task adapters the engine serves with this checkpoint: tasks with a stored adapter."""
        dirs = {t["name"]: self.path / ADAPTERS_DIR / t["name"] for t in self.tasks}
        return {name: path for name, path in dirs.items() if path.is_dir()}

    def dense_state_dict(self) -> dict[str, torch.Tensor]:
        """Every weight as a dense fp32 tensor (quantized projections dequantized)."""
        dense = {}
        with safe_open(str(self.path / WEIGHTS), framework="pt") as fh:
            for key in fh.keys():
                if not key.endswith(tuple(f".{f}" for f in PACKED_FIELDS)):
                    dense[key] = fh.get_tensor(key).float()
        for name, p in self.packed().items():
            dense[f"{name}.weight"] = dequantize_linear(p)
            if p.bias is not None:
                dense[f"{name}.bias"] = p.bias.float()
        return dense

    def load_state(self, layer: int, device="cpu") -> dict[str, AggregationState]:
        file = self.path / STATE_DIR / f"layer_{layer:03d}.safetensors"
        if not file.is_file():
            raise CheckpointError(f"{self.path}: incremental state for layer {layer} is missing")
        try:
            tensors = load_file(str(file))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{file}: incremental state unreadable ({exc})") from None
        rule = self.inlaid["settings"]["aggregation"]
        groups = {k.split(".")[0] for k in tensors}
        return {g: AggregationState.from_tensors(rule, tensors, g, device) for g in groups}



def read_checkpoint(path: Path, *, check_weights: bool = True) -> Checkpoint:
    """``check_weights``: also check config.json's quantization fields against the stored tensors
    (off only to ask whether a directory is an inlaid checkpoint at all)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory")
    try:
        config = json.loads((path / "config.json").read_text())
        tasks = json.loads((path / TASKS).read_text())["tasks"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{path} is not an inlaid checkpoint (config.json / tasks.json missing "
                              "or unreadable)") from None
    if not isinstance(tasks, list) or not all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                              for t in tasks):
        raise CheckpointError(f"{path}/{TASKS}: 'tasks' must be a list of objects with a 'name'")
    qconfig = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(qconfig, dict) or qconfig.get("quant_method") != "gptq" \
            or not isinstance(qconfig.get("inlaid"), dict):
        raise CheckpointError(f"{path} is not an inlaid checkpoint (no inlaid quantization_config)")
    if qconfig["inlaid"].get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported inlaid format version "
                              f"{qconfig['inlaid'].get('format_version')!r}")
    if not (path / WEIGHTS).is_file():
        raise CheckpointError(f"{path}: {WEIGHTS} is missing")
    ckpt = Checkpoint(path=path, config=config, tasks=tasks)
    if check_weights:
        _check_quantization(ckpt)
    return ckpt


def _check_quantization(ckpt: Checkpoint) -> None:
    """config.json's bits and group_size against the stored tensors' shapes (read from the header
    only) and against the settings add-task re-quantizes with, so a hand-edited field is one line
    here instead of a shape error deep inside unpacking."""
    config_file = f"{ckpt.path}/config.json"
    qconfig, settings = ckpt.qconfig, ckpt.quant_config()
    fields = {"bits": SUPPORTED_BITS, "group_size": SUPPORTED_GROUP_SIZES}
    for key, allowed in fields.items():
        value = qconfig.get(key)
        if type(value) is not int or value not in allowed:
            raise CheckpointError(f"{config_file}: quantization_config.{key} is {value!r}; expected one of "
                                  f"{', '.join(map(str, allowed))}")
    weights = ckpt.path / WEIGHTS
    try:
        with safe_open(str(weights), framework="pt") as fh:
            shapes = {key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({exc})") from None
    for key in shapes:
        if not key.endswith(".qweight"):
            continue
        name = key[: -len(".qweight")]
        missing = [f for f in PACKED_FIELDS if f"{name}.{f}" not in shapes]
        if missing:
            raise CheckpointError(f"{weights}: {name} has a qweight but no {missing[0]}")
        problem = packed_shape_mismatch(ckpt.bits, {f: shapes[f"{name}.{f}"] for f in PACKED_FIELDS},
                                        qconfig["group_size"])
        if problem:
            raise CheckpointError(f"{weights}: {name}.{problem} (bits and group_size from "
                                  f"{config_file})")
    for key in fields:  # the tensors agree with config.json; add-task re-quantizes with these
        if qconfig[key] != getattr(settings, key):
            raise CheckpointError(f"{config_file}: quantization_config.{key} is {qconfig[key]} but "
                                  f"quantization_config.inlaid.settings.{key} is {getattr(settings, key)}")


def find_checkpoint(source: str | Path) -> Checkpoint | None:
    """The inlaid checkpoint ``source`` names, read and checked; None when it names anything else
    (an fp16 directory, a .gguf, a hub id, ``default``), which the model loaders report on."""
    config_file = Path(source).expanduser() / "config.json"
    try:
        qconfig = json.loads(config_file.read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(qconfig, dict) or "inlaid" not in qconfig:
        return None
    return read_checkpoint(config_file.parent)


def load_dense_model(path: Path, dtype: torch.dtype = torch.float32):
    """An HF model whose quantized projections hold the dequantized weights (eval and tests)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    ckpt = read_checkpoint(path)
    config_dict = {k: v for k, v in ckpt.config.items() if k != "quantization_config"}
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(ckpt.dense_state_dict(), strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the config (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.to(dtype).eval()
