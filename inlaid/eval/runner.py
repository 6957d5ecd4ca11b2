"""``inlaid eval``: score model variants on the task suite, each task with its own LoRA adapter.

    config = EvalConfig(variants=[Variant.parse("fp16=default"), Variant.parse("w4=out/ckpt")],
                        tasks=[get_task("arithmetic")], limit=32)
    result = run_eval(config)          # EvalResult; inlaid.eval.report turns it into tables/files

Every variant is loaded once and runs every task: the task's test rows (a committed
``DATA_DIR/<task>/test.jsonl`` when there is one, else generated with ``seed``) are sent as one
batch of greedy requests, each prompt one user turn under the model's chat template, with
``max_tokens = task.max_new_tokens`` and the adapter ``ADAPTERS_DIR/<task>``. A task without an
adapter is skipped, with the reason, for every variant alike.

The generation backend is one small interface (:class:`Backend`): the inlaid engine (any variant:
fp16 dir, ``default``, inlaid checkpoint), or HF transformers + PEFT (fp16 only), the baseline the
demo adapters were scored with.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from inlaid.errors import ConfigError, ModelLoadError
from inlaid.eval.tasks import Example, Task, read_examples

BACKENDS = ("engine", "hf")
DEFAULT_ADAPTERS = Path("examples/adapters")
DEFAULT_DATA = Path("examples/tasks")
_CHECKOUT = Path(__file__).resolve().parents[2]  # the source checkout, when inlaid runs from one
GENERATED_ROWS = 64  # test rows generated per task when no data file exists and no --limit is given
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.+")


@dataclass(frozen=True)
class Variant:
    """One model to evaluate: a label for the tables and what the engine loads."""

    name: str
    source: str

    @classmethod
    def parse(cls, text: str) -> "Variant":
        """``NAME=SOURCE`` or ``SOURCE`` (named after its last path component)."""
        name, sep, source = text.partition("=")
        if sep and name and source and set(name) <= _NAME_CHARS:
            return cls(name, source)
        return cls(Path(text.rstrip("/")).name or text, text)


def unique_variants(texts: list[str]) -> list[Variant]:
    """Parse variants; repeated names get ``-2``, ``-3``... so every column is distinct."""
    out, seen = [], {}
    for text in texts:
        v = Variant.parse(text)
        seen[v.name] = seen.get(v.name, 0) + 1
        out.append(v if seen[v.name] == 1 else Variant(f"{v.name}-{seen[v.name]}", v.source))
    return out


def example_dir(default: Path) -> Path:
    """``default`` (relative) under the working directory, else under the source checkout: examples/
    is not packaged, and a run outside the repository root should still find the demo adapters."""
    if default.exists() or not (_CHECKOUT / default).is_dir():
        return default
    return _CHECKOUT / default


@dataclass
class EvalConfig:
    variants: list[Variant]
    tasks: list[Task]
    adapters_dir: Path = field(default_factory=lambda: example_dir(DEFAULT_ADAPTERS))
    data_dir: Path = field(default_factory=lambda: example_dir(DEFAULT_DATA))
    limit: int | None = None  # first N test rows per task
    seed: int = 0  # only for tasks whose rows are generated
    reference: str | None = None  # variant name; default the first
    device: str | None = None
    backend: str = "engine"
    engine_options: dict = field(default_factory=dict)  # EngineConfig fields (max_num_seqs, ...)

    def __post_init__(self) -> None:
        if not self.variants:
            raise ConfigError("give at least one model or checkpoint to evaluate")
        if not self.tasks:
            raise ConfigError("give at least one task")
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ConfigError(f"variant names must be distinct: {', '.join(names)}")
        if self.reference is None:
            self.reference = names[0]
        elif self.reference not in names:
            raise ConfigError(f"--reference {self.reference!r} is not one of the variants: {', '.join(names)}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit {self.limit}: must be >= 1")
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend {self.backend!r}: choose one of {', '.join(BACKENDS)}")
        self.adapters_dir, self.data_dir = Path(self.adapters_dir), Path(self.data_dir)


@dataclass
class TaskResult:
    task: str
    metrics: tuple[str, ...]  # the primary metric first
    num_examples: int
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # variant -> metric -> score
    seconds: dict[str, float] = field(default_factory=dict)  # variant -> generation wall time
    predictions: dict[str, list[str]] = field(default_factory=dict)  # variant -> one per example
    prompts: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    higher_is_better: bool = True


@dataclass
class EvalResult:
    variants: list[Variant]
    reference: str
    tasks: dict[str, TaskResult]
    skipped: dict[str, str] = field(default_factory=dict)  # task -> why it did not run
    settings: dict = field(default_factory=dict)

    @property
    def variant_names(self) -> list[str]:
        return [v.name for v in self.variants]


class EvalReporter:
    """Progress hooks; the CLI draws rich progress bars, the default does nothing."""

    def skip(self, task: str, reason: str) -> None: ...
    def start(self, variant: str, task: str, total: int) -> None: ...
    def advance(self, done: int, total: int) -> None: ...
    def done(self, variant: str, task: str, scores: dict[str, float], seconds: float) -> None: ...


# --- inputs --------------------------------------------------------------------------------------
def adapter_rank(path: Path) -> int:
    """The largest LoRA rank an adapter directory declares (``r`` and ``rank_pattern``)."""
    try:
        cfg = json.loads((Path(path) / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return 0
    return max([int(cfg.get("r") or 0), *map(int, (cfg.get("rank_pattern") or {}).values())])


def find_adapters(tasks: list[Task], adapters_dir: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """(task -> adapter dir, task -> why skipped) for adapters at ``adapters_dir/<task>``."""
    found, skipped = {}, {}
    for task in tasks:
        path = Path(adapters_dir) / task.name
        if (path / "adapter_config.json").is_file():
            found[task.name] = path
        elif path.is_dir():
            skipped[task.name] = f"no adapter at {path} (the directory has no adapter_config.json)"
        else:
            skipped[task.name] = (f"no adapter at {path} (no such directory; train the demo adapters with "
                                  "scripts/train_adapters.py, or pass --adapters DIR)")
    return found, skipped


def load_examples(task: Task, data_dir: Path, limit: int | None, seed: int) -> list[Example]:
    """The first ``limit`` rows of ``data_dir/<task>/test.jsonl``, else ``limit`` generated rows."""
    path = Path(data_dir) / task.name / "test.jsonl"
    if path.is_file():
        rows = read_examples(path)
        return rows[:limit] if limit else rows
    return task.examples("test", limit or GENERATED_ROWS, seed)


def check_model_source(source: str) -> None:
    """Fail in a second, before anything loads, on a model path that does not exist or an inlaid
    checkpoint whose config does not match its weights."""
    from inlaid.quant.checkpoint import find_checkpoint

    path = Path(source).expanduser()
    is_hub_id = source.count("/") == 1 and not source.startswith((".", "/", "~")) and not path.exists()
    if not (source == "default" or source.startswith("dummy:") or path.exists() or is_hub_id):
        raise ModelLoadError(f"model not found: {source}")
    find_checkpoint(source)


def max_rank(adapters: dict[str, Path], source: str) -> int:
    """The slot rank an engine needs: our adapters and those a checkpoint carries."""
    paths = list(adapters.values())
    own = Path(source) / "adapters"
    if own.is_dir():
        paths += [p for p in own.iterdir() if p.is_dir()]
    return max([8, *(adapter_rank(p) for p in paths)])


# --- backends ------------------------------------------------------------------------------------
class Backend(Protocol):
    def generate(self, prompts: list[str], adapter: str | None, max_new_tokens: int,
                 progress: Callable[[int, int], None] | None = None) -> list[str]: ...

    def close(self) -> None: ...


class EngineBackend:
    """Greedy batches on the inlaid engine's offline API."""

    def __init__(self, source: str, adapters: dict[str, Path], device: str | None = None, **options):
        from inlaid.engine.llm import LLM

        defaults = {"max_loras": max(1, min(len(adapters), 8)), "max_lora_rank": max_rank(adapters, source)}
        self.llm = LLM(source, {k: str(v) for k, v in adapters.items()}, device=device,
                       **{**defaults, **options})

    def generate(self, prompts, adapter, max_new_tokens, progress=None):
        from inlaid.engine.sequence import SamplingParams

        ids = [self.llm.chat_prompt(p) for p in prompts]
        room = self.llm.engine.max_model_len
        # a prompt near the context length gets fewer new tokens rather than an error
        params = [SamplingParams(temperature=0, max_tokens=max(1, min(max_new_tokens, room - len(i))))
                  for i in ids]
        outs = self.llm.generate(ids, params, adapter, progress=progress)
        return [o.text.strip() for o in outs]

    def close(self) -> None:
        del self.llm
        _free_memory()


class HFBackend:
    """HF transformers + PEFT greedy generation (``inlaid.eval.hf_generate``); fp16 models only."""

    def __init__(self, source: str, adapters: dict[str, Path], device: str | None = None):
        import torch

        from inlaid.model.loader import load_base

        config = Path(source) / "config.json"
        if config.is_file() and "inlaid" in (json.loads(config.read_text()).get("quantization_config") or {}):
            raise ConfigError(f"--backend hf reads fp16 models only; {source} is an inlaid checkpoint")
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        base = load_base(source, dtype=torch.float16 if dev.type == "cuda" else torch.float32)
        self.tokenizer, self.model = base.tokenizer, base.model.to(dev)
        if adapters:
            from peft import PeftModel

            (first, path), *rest = adapters.items()
            self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=first)
            for name, path in rest:
                self.model.load_adapter(str(path), adapter_name=name)
        self.model.eval()

    def generate(self, prompts, adapter, max_new_tokens, progress=None):
        import contextlib

        from inlaid.eval.hf_generate import generate

        if adapter is not None:
            self.model.set_adapter(adapter)
            scope = contextlib.nullcontext()
        else:
            scope = self.model.disable_adapter() if hasattr(self.model, "disable_adapter") \
                else contextlib.nullcontext()
        with scope:
            texts = generate(self.model, self.tokenizer, prompts, max_new_tokens)
        if progress is not None:
            progress(len(prompts), len(prompts))
        return texts

    def close(self) -> None:
        del self.model
        _free_memory()


def _free_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def make_backend(config: EvalConfig, variant: Variant, adapters: dict[str, Path]) -> Backend:
    if config.backend == "hf":
        return HFBackend(variant.source, adapters, config.device)
    return EngineBackend(variant.source, adapters, config.device, **config.engine_options)


# --- the run -------------------------------------------------------------------------------------
def prepare(config: EvalConfig, reporter: EvalReporter):
    """Checked and loaded before the first model: model paths, then (task -> adapter dir,
    task -> test rows, task -> why skipped); tasks without an adapter are reported and left out."""
    for variant in config.variants:
        check_model_source(variant.source)
    adapters, skipped = find_adapters(config.tasks, config.adapters_dir)
    for name, reason in skipped.items():
        reporter.skip(name, reason)
    if not adapters:
        missing = "" if config.adapters_dir.is_dir() else " (no such directory: pass --adapters DIR)"
        raise ConfigError(f"nothing to evaluate: no task adapter found under {config.adapters_dir}{missing}")
    rows = {t.name: load_examples(t, config.data_dir, config.limit, config.seed)
            for t in config.tasks if t.name in adapters}
    return adapters, rows, skipped


def run_eval(config: EvalConfig, reporter: EvalReporter | None = None,
             backend_factory: Callable[[EvalConfig, Variant, dict[str, Path]], Backend] = make_backend,
             ) -> EvalResult:
    """Every variant on every task that has an adapter; variants are loaded one at a time."""
    reporter = reporter or EvalReporter()
    adapters, rows, skipped = prepare(config, reporter)
    tasks = [t for t in config.tasks if t.name in adapters]
    results = {t.name: TaskResult(t.name, tuple(t.metrics), len(rows[t.name]),
                                  prompts=[e.prompt for e in rows[t.name]],
                                  references=[e.reference for e in rows[t.name]]) for t in tasks}
    for variant in config.variants:
        backend = backend_factory(config, variant, adapters)
        try:
            for task in tasks:
                examples, result = rows[task.name], results[task.name]
                reporter.start(variant.name, task.name, len(examples))
                started = time.perf_counter()
                texts = backend.generate([e.prompt for e in examples], task.name, task.max_new_tokens,
                                         progress=reporter.advance)
                result.seconds[variant.name] = time.perf_counter() - started
                result.predictions[variant.name] = texts
                result.scores[variant.name] = task.score(texts, examples)
                reporter.done(variant.name, task.name, result.scores[variant.name],
                              result.seconds[variant.name])
        finally:
            backend.close()
    settings = {"adapters_dir": str(config.adapters_dir), "data_dir": str(config.data_dir),
                "limit": config.limit, "seed": config.seed, "device": config.device,
                "backend": config.backend, "engine_options": config.engine_options,
                "adapters": {k: str(v) for k, v in adapters.items()}}
    return EvalResult(list(config.variants), config.reference, results, skipped, settings)
