"""The HF transformers + PEFT baseline: static batches through ``generate``.

Two batching modes, as in S-LoRA's comparison:
- ``per-adapter`` (``hf-peft``): a batch holds requests of one adapter — the oldest waiting request's
  — made active with ``set_adapter``;
- ``mixed`` (``hf-peft-mixed``): the oldest waiting requests whatever their adapters, through PEFT's
  ``generate(..., adapter_names=[...])``, which runs each LoRA layer once per distinct adapter.

A batch is left-padded to its longest prompt and decodes to its longest output
(``min_new_tokens = max_new_tokens``: no early stop); a request's first token is the batch's first
sampled token, and it finishes when ``generate`` returns — a static batch holds every result until
its longest member is done. Each sampled token is timed by a logits processor (after a device sync),
so the prefill step and every decode step are recorded as for the engine.

``dummy:<shape>`` builds a random-weight HF Llama of that shape directly on the device; its adapters
are PEFT LoRA modules on all 7 projections, at most 4 distinct ones shared under all the names (as the
engine's dummy adapters): PEFT's cost depends on the distinct names in a batch, not on their values.
"""

from __future__ import annotations

import time
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from inlaid.bench.metrics import RequestTimeline, StepRecord
from inlaid.bench.requests import Workload, map_adapters, prompt_ids
from inlaid.bench.workload import Request
from inlaid.errors import ConfigError
from inlaid.model.arch import PROJECTIONS

Progress = Callable[[int, int], None]
MODES = ("per-adapter", "mixed")
MAX_DISTINCT_DUMMY_ADAPTERS = 4


@dataclass(frozen=True)
class HfOptions:
    model: str  # "dummy:<shape>" or an HF safetensors dir / hub id (fp16 or fp32 weights)
    adapters: dict[str, str] = field(default_factory=dict)  # name -> PEFT dir (not for dummy models)
    mode: str = "per-adapter"
    batch_size: int = 8
    device: str | None = None
    dtype: str | None = None
    dummy_rank: int = 16
    dummy_layers: int | None = None
    realtime: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"hf-peft mode {self.mode!r}: choose one of {MODES}")
        if self.batch_size < 1:
            raise ConfigError("--hf-batch-size must be at least 1")


@dataclass
class HfModel:
    model: object  # a PeftModel
    tokenizer: object
    config: object
    adapter_names: list[str]
    device: torch.device
    rank_of: dict[str, int]


@dataclass
class HfRun:
    timelines: list[RequestTimeline]
    steps: list[StepRecord]
    wall_s: float = 0.0


def _device_dtype(options: HfOptions) -> tuple[torch.device, torch.dtype]:
    from inlaid.engine.llm_engine import DTYPES

    device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = options.dtype or ("float16" if device.type == "cuda" else "float32")
    if name not in DTYPES:
        raise ConfigError(f"--dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return device, DTYPES[name]


def load_hf_peft(options: HfOptions, num_adapters: int) -> HfModel:
    """The base model with PEFT adapters: ``num_adapters`` dummy ones, or every one of ``adapters``."""
    device, dtype = _device_dtype(options)
    with warnings.catch_warnings():  # PEFT calls a transformers method deprecated in v5
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        if options.model.startswith("dummy:"):
            return _dummy_peft(options, num_adapters, device, dtype)
        return _hf_peft(options, device, dtype)


def _hf_peft(options: HfOptions, device: torch.device, dtype: torch.dtype) -> HfModel:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not options.adapters:
        raise ConfigError("hf-peft on a real model needs its adapters (--adapter NAME=DIR)")
    try:
        base = AutoModelForCausalLM.from_pretrained(options.model, dtype=dtype).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(options.model)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"hf-peft cannot load {options.model!r} (it needs an HF fp16 model, not an "
                          f"inlaid checkpoint: see --fp16-model): {exc}") from exc
    names = list(options.adapters)
    model = PeftModel.from_pretrained(base, options.adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(options.adapters[name], adapter_name=name)
    ranks = {name: int(model.peft_config[name].r) for name in names}
    return HfModel(model.eval(), tokenizer, base.config, names, device, ranks)


def _dummy_peft(options: HfOptions, num_adapters: int, device: torch.device, dtype: torch.dtype) -> HfModel:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from inlaid.model.dummy import DummyTokenizer, dummy_config

    config = dummy_config(options.model.split(":", 1)[1], options.dummy_layers)
    torch.manual_seed(options.seed)
    with torch.device(device):
        base = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    names = [f"dummy-{i}" for i in range(max(num_adapters, 1))]
    lora = LoraConfig(r=options.dummy_rank, lora_alpha=2 * options.dummy_rank, target_modules=list(PROJECTIONS),
                      lora_dropout=0.0)
    model = get_peft_model(base, lora, adapter_name=names[0])
    distinct = min(len(names), MAX_DISTINCT_DUMMY_ADAPTERS)
    for name in names[1:distinct]:
        model.add_adapter(name, lora)
    for i, name in enumerate(names[distinct:], start=distinct):
        _alias_adapter(model, name, names[i % distinct])
    return HfModel(model.eval(), DummyTokenizer(), config, names, device, {n: options.dummy_rank for n in names})


def _alias_adapter(model, name: str, source: str) -> None:
    """Register ``name`` as another name of adapter ``source``: every per-adapter table of every LoRA
    layer gets an entry pointing at the same modules (no new weights)."""
    from peft.tuners.lora import LoraLayer

    model.peft_config[name] = model.peft_config[source]
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for attr in (*module.adapter_layer_names, *module.other_param_names, "lora_variant"):
                table = getattr(module, attr, None)
                if table is not None and source in table:
                    table[name] = table[source]


def memory(hf: HfModel) -> dict:
    """Bytes of the weights (base and every distinct adapter module) and the device peak."""
    seen, weights = set(), 0
    for p in hf.model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            weights += p.numel() * p.element_size()
    peak = torch.cuda.max_memory_allocated(hf.device) if hf.device.type == "cuda" else None
    return {"weights_bytes": weights, "device_peak_bytes": peak}


class _StepClock:
    """A logits processor that notes when each token's logits are ready (after a device sync)."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, []

    def __call__(self, input_ids, scores):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.monotonic())
        return scores


def _prompt(hf: HfModel, request: Request, seed: int) -> list[int]:
    if request.prompt:
        return list(hf.tokenizer(request.prompt)["input_ids"])
    return prompt_ids(request, seed)


@dataclass(frozen=True)
class BatchTiming:
    start: float
    token_times: list[float]  # when each decoding step's logits were ready
    end: float
    width: int  # padded prompt length


@torch.inference_mode()
def generate_batch(hf: HfModel, batch: list[Request], adapters: list[str], mixed: bool, seed: int) -> BatchTiming:
    """Run one static batch; ``adapters`` is aligned with ``batch``."""
    from transformers import LogitsProcessorList

    prompts = [_prompt(hf, r, seed) for r in batch]
    width = max(len(p) for p in prompts)
    pad = getattr(hf.config, "pad_token_id", None) or 0
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=hf.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=hf.device)
    new_tokens = max(r.output_len for r in batch)
    clock = _StepClock(hf.device)
    extra = {"adapter_names": adapters} if mixed else {}
    if not mixed:
        hf.model.set_adapter(adapters[0])
    start = time.monotonic()
    hf.model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new_tokens,
                      min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad,
                      logits_processor=LogitsProcessorList([clock]), **extra)
    if hf.device.type == "cuda":
        torch.cuda.synchronize(hf.device)
    return BatchTiming(start, clock.times, time.monotonic(), width)


def warm_up(hf: HfModel) -> None:
    """One short batch before timing (device set-up, kernel selection)."""
    request = Request(-1, 0.0, hf.adapter_names[0], 16, 4)
    generate_batch(hf, [request], [hf.adapter_names[0]], mixed=False, seed=0)


def batch_records(batch: list[Request], adapters: list[str], timing: BatchTiming) -> list[StepRecord]:
    """The prefill step and each decode step of one static batch (padding counts: it is computed)."""
    size, width, times = len(batch), timing.width, timing.token_times
    names = tuple(adapters)
    records = [StepRecord(times[0] - timing.start, size * width, 0, names, 0, size * width)]
    for k in range(1, len(times)):
        records.append(StepRecord(times[k] - times[k - 1], 0, size, names, 0, size * (width + k)))
    return records


def _next_batch(queue: deque[Request], options: HfOptions) -> list[Request]:
    if options.mode == "mixed":
        chosen = list(queue)[:options.batch_size]
    else:
        adapter = queue[0].adapter
        chosen = [r for r in queue if r.adapter == adapter][:options.batch_size]
    for request in chosen:
        queue.remove(request)
    return chosen


def run_hf_peft(hf: HfModel, workload: Workload, options: HfOptions,
                progress: Progress | None = None) -> HfRun:
    """Every request of ``workload``, arrivals honoured as for the engine."""
    names = map_adapters(workload.adapter_names, hf.adapter_names)
    pending = deque(sorted(workload.requests, key=lambda r: (r.arrival_s, r.request_id)))
    queue: deque[Request] = deque()
    run = HfRun([], [])
    t0 = time.monotonic()
    while pending or queue:
        now = time.monotonic()
        while pending and (not options.realtime or t0 + pending[0].arrival_s <= now):
            queue.append(pending.popleft())
        if not queue:
            time.sleep(max(0.0, t0 + pending[0].arrival_s - time.monotonic()))
            continue
        batch = _next_batch(queue, options)
        adapters = [names[r.adapter] for r in batch]
        timing = generate_batch(hf, batch, adapters, options.mode == "mixed", options.seed)
        run.steps.extend(batch_records(batch, adapters, timing))
        for r in batch:
            arrival = r.arrival_s if options.realtime else 0.0
            run.timelines.append(RequestTimeline(arrival, timing.token_times[0] - t0, timing.end - t0, r.input_len,
                                                 r.output_len, request_id=r.request_id, adapter=r.adapter))
            if progress is not None:
                progress(len(run.timelines), len(workload.requests))
    run.wall_s = time.monotonic() - t0
    run.timelines.sort(key=lambda t: t.request_id)
    return run
