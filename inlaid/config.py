"""Validated configuration dataclasses. Flags become these; the library only reads these."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from inlaid.errors import ConfigError

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUP_SIZES = (-1, 32, 64, 128)
AGGREGATIONS = ("mix", "mean", "max")
PROPAGATIONS = ("fp", "quantized")
METHODS = ("gptq", "rtn")
# task names become directory names under adapters/, served model names and metric labels
TASK_NAME = re.compile(r"[A-Za-z0-9_-]{1,200}")


def check_task_name(name: object) -> str:
    if not isinstance(name, str) or not TASK_NAME.fullmatch(name):
        raise ConfigError(f"task name {name!r}: use 1-200 letters (A-Z, a-z), digits, '-' and '_'")
    return name


@dataclass(frozen=True)
class TaskSpec:
    """One task: a name, a PEFT LoRA adapter directory and a calibration data file."""

    name: str
    adapter: Path | None
    data: Path

    def __post_init__(self) -> None:
        check_task_name(self.name)

    @classmethod
    def parse(cls, text: str) -> "TaskSpec":
        """Parse ``name=ADAPTER:DATA`` (ADAPTER may be ``none`` for a base-only task)."""
        name, sep, rest = text.partition("=")
        adapter, sep2, data = rest.rpartition(":")
        if not sep or not sep2 or not name or not adapter or not data:
            raise ConfigError(f"--task {text!r}: expected NAME=ADAPTER_DIR:DATA_FILE")
        try:
            check_task_name(name)
        except ConfigError as exc:
            raise ConfigError(f"--task {text!r}: {exc}") from None
        return cls(name, None if adapter.lower() == "none" else Path(adapter), Path(data))


@dataclass(frozen=True)
class QuantConfig:
    """Everything that determines a quantized checkpoint (and must match for add-task)."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    static_groups: bool = False
    damp_percent: float = 0.01
    block_size: int = 128
    true_sequential: bool = True
    method: str = "gptq"
    aggregation: str = "mean"  # measured best with mix; max loses 4x (docs/results/quantize.md)
    propagation: str = "fp"
    with_adapters: bool = True
    samples: int = 128
    seq_len: int = 512
    min_tokens: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"--bits {self.bits}: supported bit widths are {SUPPORTED_BITS}")
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise ConfigError(
                f"--group-size {self.group_size}: supported group sizes are {SUPPORTED_GROUP_SIZES}"
            )
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"--aggregation {self.aggregation!r}: choose one of {AGGREGATIONS}")
        if self.propagation not in PROPAGATIONS:
            raise ConfigError(f"--propagation {self.propagation!r}: choose one of {PROPAGATIONS}")
        if self.method not in METHODS:
            raise ConfigError(f"--method {self.method!r}: choose one of {METHODS}")
        if not 0.0 < self.damp_percent < 1.0:
            raise ConfigError(f"--damp {self.damp_percent}: must be in (0, 1)")
        if self.samples < 1 or self.seq_len < 8:
            raise ConfigError("--samples must be >= 1 and --seq-len >= 8")
        if self.block_size < 1:
            raise ConfigError("block size must be >= 1")

    def settings(self) -> dict:
        """The fields that must agree between a checkpoint and a later add-task run."""
        keys = ("bits", "group_size", "sym", "desc_act", "static_groups", "damp_percent",
                "block_size", "true_sequential", "method", "aggregation", "propagation",
                "with_adapters", "samples", "seq_len", "seed")
        return {k: getattr(self, k) for k in keys}

    def to_dict(self) -> dict:
        return asdict(self)
