"""The engine loop: requests in, one scheduler step + one forward pass per ``step()``, outputs out.

Split as in nano-vllm: the scheduler (torch-free) decides what runs, the runner executes it, this
module glues them and owns everything textual — tokenization, incremental detokenization, stop
strings — plus request bookkeeping (timings, logprobs) and the adapter registry.

Single-threaded by design: an async server drives ``step()`` from one background thread and
serialises ``add_request``/``abort_request``/adapter changes onto it (see ``inlaid.server``).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from inlaid.device import pick_device
from inlaid.engine.adapters import AdapterManager, PreparedAdapter
from inlaid.engine.block_manager import BlockManager, MemoryBudget, kv_block_bytes
from inlaid.engine.detokenizer import IncrementalDetokenizer
from inlaid.engine.model import CausalLM, load_weights
from inlaid.engine.predictor import OutputLengthPredictor
from inlaid.engine.runner import NO_TOKEN, ModelRunner, PendingStep
from inlaid.engine.sampler import TokenLogprobs
from inlaid.engine.scheduler import Scheduler, SchedulerConfig, StepPlan, check_slo_target
from inlaid.engine.sequence import SamplingParams, Sequence
from inlaid.errors import AdapterError, ConfigError, ModelLoadError, RequestError
from inlaid.model.lora import load_adapter

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class EngineConfig:
    # HF safetensors dir, hub id, .gguf, "default", an inlaid checkpoint, or "dummy:<shape>"
    # (random weights of real shapes, see inlaid.model.dummy: GPU timing without a checkpoint)
    model: str = "default"
    adapters: dict[str, str] = field(default_factory=dict)  # name -> PEFT dir (checkpoint tasks are added)
    device: str | None = None  # None: cuda when available
    dtype: str | None = None  # None: float16 on cuda, float32 on cpu
    max_loras: int = 8  # device adapter slots; a step mixes at most this many adapters
    max_lora_rank: int = 64
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: from kv_cache_gib (cpu) / gpu_memory_utilization (cuda)
    kv_cache_gib: float = 1.0  # cpu: one budget for the KV blocks and the max_loras adapter slots
    gpu_memory_utilization: float = 0.85
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    policy: str = "fcfs"
    max_tasks_per_step: int = 10
    # inlaid: SLO targets in seconds; requests that can no longer meet them are served last (None: off)
    ttft_slo_s: float | None = None
    latency_slo_s: float | None = None
    enable_prefix_caching: bool = True
    prefetch_adapters: bool = True  # load waiting requests' adapters into free slots between steps
    enforce_eager: bool = False  # GPU: no CUDA graphs, every step op by op (debugging, profiling)
    # GPU: graphs for steps that prefill too (False: only all-decode steps replay graphs; for
    # measuring what the prefill graphs buy, and a fallback should their capture misbehave)
    prefill_graphs: bool = True
    # launch step N + 1 before reading step N's tokens back, so the host's work overlaps the GPU's
    # (see LLMEngine.step); None: on for CUDA, off for the CPU, where there is nothing to overlap
    async_scheduling: bool | None = None
    dequantize_on_cpu: bool = True  # dequantize once at load rather than on every CPU step
    dummy_bits: int | None = 4  # dummy models: base bits (None = fp16)
    dummy_layers: int | None = None  # dummy models: fewer layers than the shape has
    dummy_adapters: int = 0  # dummy models: random adapters "dummy-0".. registered at start
    dummy_rank: int = 16

    def __post_init__(self) -> None:  # before the model loads, not after
        check_slo_target("ttft_slo_s", self.ttft_slo_s)
        check_slo_target("latency_slo_s", self.latency_slo_s)
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"gpu_memory_utilization {self.gpu_memory_utilization!r}: must be in (0, 1]")
        if not self.kv_cache_gib > 0:
            raise ConfigError(f"kv_cache_gib {self.kv_cache_gib!r}: must be > 0")
        if self.block_size < 1:
            raise ConfigError(f"block_size {self.block_size!r}: must be >= 1")


@dataclass
class RequestOutput:
    request_id: str
    adapter: str | None
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    text: str  # the whole output so far (stop string excluded)
    delta_text: str  # new since the last output of this request
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort"
    logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # position 0 has none
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None
    num_cached_tokens: int = 0


class _Request:
    """Engine-side state of one request next to its scheduler ``Sequence``."""

    def __init__(self, seq: Sequence, detok: IncrementalDetokenizer):
        self.seq, self.detok = seq, detok
        self.prompt_token_ids = seq.prompt_token_ids  # copied once, not on every step's output
        self.logprobs: list[TokenLogprobs] | None = [] if seq.sampling.logprobs is not None else None
        self.prompt_logprobs: dict[int, TokenLogprobs] = {}
        self.first_token_time: float | None = None


def _resolve_model(source: str) -> tuple[Path, bool]:
    """(local dir, is an inlaid checkpoint)."""
    from inlaid.model.loader import resolve_source

    path = Path(source).expanduser()
    config_file = path / "config.json"
    if config_file.is_file():
        qconfig = json.loads(config_file.read_text()).get("quantization_config") or {}
        if "inlaid" in qconfig:
            from inlaid.quant.checkpoint import read_checkpoint

            read_checkpoint(path)  # its config against its tensors: one line here, not a shape error later
            return path, True
        if qconfig:
            raise ModelLoadError(f"{path}: quantized checkpoints of other tools ({qconfig.get('quant_method')})"
                                 " are not supported; serve an fp16 model or an inlaid checkpoint")
    resolved = resolve_source(source)
    if isinstance(resolved, str):
        try:
            from huggingface_hub import snapshot_download

            resolved = Path(snapshot_download(resolved, allow_patterns=["*.json", "*.safetensors",
                                                                         "*.model", "*.txt"]))
        except Exception as exc:  # offline, unknown id, gated: one clear line
            raise ModelLoadError(f"cannot fetch {source!r} from the hub: {exc}") from exc
    return Path(resolved), False


def _eos_ids(path: Path, config, tokenizer) -> tuple[int, ...]:
    ids = set()
    sources = [getattr(config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)]
    gen_file = path / "generation_config.json"
    if gen_file.is_file():
        sources.append(json.loads(gen_file.read_text()).get("eos_token_id"))
    for value in sources:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return tuple(sorted(ids))


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, **overrides):
        from transformers import AutoConfig, AutoTokenizer

        from inlaid.model.loader import check_architecture

        config = config or EngineConfig()
        if overrides:
            config = EngineConfig(**{**config.__dict__, **overrides})
        self.config = cfg = config
        device = pick_device(cfg.device)
        dtype_name = cfg.dtype or ("float16" if device.type == "cuda" else "float32")
        if dtype_name not in DTYPES:
            raise ConfigError(f"--dtype {dtype_name!r}: choose one of {', '.join(DTYPES)}")
        self.is_dummy = cfg.model.startswith("dummy:")
        if self.is_dummy:
            hf_config, weights = self._dummy_model(device)
            path, self.is_checkpoint = None, False
        else:
            path, self.is_checkpoint = _resolve_model(cfg.model)
            try:
                hf_config = AutoConfig.from_pretrained(path)
                self.tokenizer = AutoTokenizer.from_pretrained(path)
            except (OSError, ValueError) as exc:
                raise ModelLoadError(f"cannot load {cfg.model!r}: {exc}") from exc
            check_architecture(hf_config)
            weights = load_weights(path, quantized=self.is_checkpoint)
        self.model_path, self.hf_config = path, hf_config
        self.max_model_len = min(cfg.max_model_len or hf_config.max_position_embeddings,
                                 hf_config.max_position_embeddings)
        self.model = CausalLM(hf_config, weights, device, DTYPES[dtype_name], cfg.max_loras,
                              cfg.max_lora_rank, dequantize=cfg.dequantize_on_cpu and device.type == "cpu",
                              max_positions=self.max_model_len)
        del weights
        self.adapters = AdapterManager(self.model, cfg.max_loras, cfg.max_lora_rank)
        for name, adapter_path in self._initial_adapters().items():
            self.adapters.register(name, adapter_path)
        if self.is_dummy and cfg.dummy_adapters:
            self._register_dummy_adapters()
        if device.type == "cuda":
            self.model.warmup(cfg.max_num_batched_tokens)
        num_blocks = cfg.num_kv_blocks or self._auto_num_blocks()
        self.block_manager = BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.eos_token_ids = _eos_ids(path, hf_config, self.tokenizer) if path else (2,)
        sched_config = SchedulerConfig(
            policy=cfg.policy, max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=cfg.max_num_batched_tokens, max_loras=max(cfg.max_loras, 1),
            max_tasks_per_step=cfg.max_tasks_per_step, eos_token_ids=self.eos_token_ids,
            ttft_slo_s=cfg.ttft_slo_s, latency_slo_s=cfg.latency_slo_s)
        self.predictor = OutputLengthPredictor()
        self.scheduler = Scheduler(sched_config, self.block_manager, self.predictor)
        self.runner = ModelRunner(self.model, self.adapters, num_blocks, cfg.block_size,
                                  cfg.max_num_batched_tokens, cfg.max_num_seqs, self.max_model_len,
                                  cuda_graphs=not cfg.enforce_eager, prefill_graphs=cfg.prefill_graphs)
        self._requests: dict[str, _Request] = {}
        self._next_id = 0
        self.async_scheduling = cfg.async_scheduling if cfg.async_scheduling is not None \
            else device.type == "cuda"
        self._in_flight: tuple[StepPlan, PendingStep] | None = None  # launched, tokens not read yet
        self.num_steps = 0
        log.info("engine ready: %s on %s (%s), %d KV blocks of %d tokens, %d adapters, %d slots",
                 cfg.model, device, dtype_name, num_blocks, cfg.block_size, len(self.adapters.names),
                 cfg.max_loras)

    # --- set-up ---------------------------------------------------------------------------------
    def _dummy_model(self, device):
        from inlaid.model.dummy import SHAPES, DummyTokenizer, dummy_config, dummy_weights

        shape = self.config.model.split(":", 1)[1]
        if shape not in SHAPES:
            raise ConfigError(f"--model dummy:{shape}: unknown shape; known: {', '.join(SHAPES)}")
        config = dummy_config(shape, self.config.dummy_layers)
        self.tokenizer = DummyTokenizer()
        return config, dummy_weights(config, self.config.dummy_bits, device)

    def _register_dummy_adapters(self) -> None:
        """``dummy_adapters`` names over at most 4 distinct random adapters: every name gets its own
        device slot when used (so timing sees distinct slots), the host copies are shared."""
        from inlaid.model.dummy import random_adapter

        cfg = self.config
        distinct = min(cfg.dummy_adapters, 4)
        for k in range(distinct):
            names = [f"dummy-{i}" for i in range(k, cfg.dummy_adapters, distinct)]
            self.adapters.register_weights(names, random_adapter(self.hf_config, names[0], cfg.dummy_rank, seed=k))

    def _initial_adapters(self) -> dict[str, str]:
        adapters = {}
        if self.is_checkpoint:
            tasks = json.loads((self.model_path / "tasks.json").read_text()).get("tasks", [])
            for task in tasks:
                task_dir = self.model_path / "adapters" / task["name"]
                if task_dir.is_dir():
                    adapters[task["name"]] = str(task_dir)
        adapters.update(self.config.adapters)
        return adapters

    def _auto_num_blocks(self) -> int:
        """KV blocks from one byte budget shared with the adapter slots (S-LoRA's unified memory,
        ``MemoryBudget``): on a GPU what is free once the weights are loaded, less (1 -
        gpu_memory_utilization) of the card; on the CPU ``kv_cache_gib``. The ``max_loras`` slots
        are taken out first (each costs ``blocks_per_adapter_slot`` blocks), KV gets the rest."""
        s, cfg = self.model.shape, self.config
        per_block = kv_block_bytes(s.num_layers, s.num_kv_heads, s.head_dim, cfg.block_size,
                                   self.model.dtype.itemsize)
        slots_bytes = sum(t.numel() * t.element_size() for bank in self.model.lora_banks.values()
                          for t in (*bank.lora_a, *bank.lora_b, bank.ranks, bank.scalings))
        if self.model.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.model.device)
            # the slots are allocated already (with the model): count them back into the budget
            budget = free + slots_bytes - (1 - cfg.gpu_memory_utilization) * total
        else:
            budget = cfg.kv_cache_gib * 2 ** 30
        sink = 1  # one block for CUDA-graph padding rows
        if budget < (sink + 1) * per_block + slots_bytes:
            slots = f" and {cfg.max_loras} adapter slots ({slots_bytes / 2**30:.2f} GiB)" if slots_bytes else ""
            raise ConfigError(f"no memory left for the KV cache{slots}: the budget is {budget / 2**30:.2f} "
                              "GiB; lower max_loras / max_lora_rank or raise the memory setting")
        if not slots_bytes:
            return int(budget // per_block) - sink
        plan = MemoryBudget(int(budget), per_block, slots_bytes // cfg.max_loras).split(
            cfg.max_loras, min_blocks=sink + 1)
        log.info("memory budget %.2f GiB: %d adapter slots (%.1f KV blocks each) + %d KV blocks",
                 budget / 2**30, plan.num_adapter_slots, slots_bytes / cfg.max_loras / per_block,
                 plan.num_blocks)
        return plan.num_blocks - sink

    # --- requests -------------------------------------------------------------------------------
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        return list(prompt)

    def add_request(self, prompt: str | list[int], sampling: SamplingParams | None = None,
                    adapter: str | None = None, request_id: str | None = None,
                    arrival_time: float | None = None) -> str:
        """Queue one request; returns its id. Raises RequestError / AdapterError on bad input."""
        sampling = sampling or SamplingParams()
        if adapter is not None and adapter not in self.adapters:
            raise AdapterError(f"adapter {adapter!r} is not registered")
        token_ids = self.tokenize(prompt)
        if request_id is None:
            request_id = f"req-{self._next_id}"
            self._next_id += 1
        if token_ids and max(token_ids) >= self.model.shape.vocab_size:
            raise RequestError(f"request {request_id!r}: token id {max(token_ids)} is outside the "
                               f"vocabulary ({self.model.shape.vocab_size})")
        total = len(token_ids) + sampling.max_tokens
        if total > self.max_model_len:
            raise RequestError(f"request {request_id!r}: prompt ({len(token_ids)} tokens) + max_tokens "
                               f"({sampling.max_tokens}) exceeds the context length {self.max_model_len}")
        seq = Sequence(request_id, token_ids, sampling, adapter, arrival_time)
        self.scheduler.add(seq)
        self._requests[request_id] = _Request(
            seq, IncrementalDetokenizer(self.tokenizer, token_ids, sampling.stop))
        return request_id

    def abort_request(self, request_id: str) -> bool:
        req = self._requests.pop(request_id, None)
        self.runner.release(request_id)
        return req is not None and self.scheduler.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return not self.scheduler.is_finished()

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._requests)

    # --- adapters -------------------------------------------------------------------------------
    def register_adapter(self, name: str, source: str | Path | PreparedAdapter) -> None:
        """Register (or replace) adapter ``name`` from a directory, or from what
        ``self.adapters.prepare`` made of one off the engine thread."""
        if any(r.seq.adapter == name for r in self._requests.values()):
            raise AdapterError(f"adapter {name!r} has requests in flight; replace it when they finish")
        self.adapters.register(name, source)
        self.block_manager.invalidate_prefix_cache()  # cached KV under this name is stale

    def check_adapter(self, name: str, path: str | Path) -> None:
        """Raise AdapterError unless the adapter at ``path`` could be registered (read and checked,
        not registered; safe off the engine thread: it reads only start-up settings)."""
        self.adapters.check(name, load_adapter(Path(path), name))

    def swap_layer(self, layer: int, weights) -> None:
        """Live task addition: put re-quantized layer ``layer`` in place (between two steps)."""
        self.model.swap_layer(layer, weights)
        self.block_manager.invalidate_prefix_cache()  # cached KV came from the old weights

    def finish_weight_swap(self) -> None:
        """After the last swapped layer: rebuild what depended on the old weights."""
        if self.runner.uses_graphs:
            if self.model.device.type == "cuda":
                torch.cuda.synchronize(self.model.device)  # a step in flight may still replay a graph
            self.runner.capture_graphs()
        self.model.release_retired()

    def unregister_adapter(self, name: str) -> None:
        if any(r.seq.adapter == name for r in self._requests.values()):
            raise AdapterError(f"adapter {name!r} has requests in flight")
        self.adapters.unregister(name)

    # --- the loop -------------------------------------------------------------------------------
    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """One engine step; returns an output per request that got a token (``finished_only``: per
        request that finished: callers that only collect final results skip building the rest, and
        the text of requests without stop strings is then decoded once, at the end).

        With ``async_scheduling`` a step schedules and launches step N + 1, then reads back step
        N's tokens and returns their outputs: the host's bookkeeping and scheduling run while the
        GPU computes, instead of between two GPU steps. Step N + 1 feeds step N's tokens from the
        device (placeholders, see ``Sequence``). A request that step N's token stops (EOS, a stop
        string) was fed once more in step N + 1: that work is dropped. Outputs come one call later;
        a call launches nothing once every request is done, and returns the last outputs."""
        plan = self.scheduler.schedule()
        in_flight, self._in_flight = self._in_flight, None  # not retried if reading it fails
        try:
            pending = None
            if not plan.is_empty:
                self.num_steps += 1
                pending = self.runner.launch(plan)
                self.scheduler.advance(plan)
            outputs = self._complete(*in_flight, finished_only) if in_flight is not None else []
            if pending is not None:
                if not self.async_scheduling:
                    outputs += self._complete(plan, pending, finished_only)
                elif not all(s.seq.is_finished for s in plan.scheduled):
                    # (a step whose requests all finished meanwhile has nothing left to read)
                    self._in_flight = (plan, pending)
        except BaseException:
            # The failed steps' samples will never be read: their requests cannot go on (their
            # placeholders would never resolve). Fail them, so the engine itself stays usable.
            failed = plan.scheduled + (in_flight[0].scheduled if in_flight else [])
            for s in failed:
                if not s.seq.is_finished:
                    self.abort_request(s.seq.request_id)
            raise
        if self.config.prefetch_adapters:
            self._prefetch_adapters()
        return outputs

    def _complete(self, plan: StepPlan, pending: PendingStep, finished_only: bool) -> list[RequestOutput]:
        """Read a launched step's tokens back and record them."""
        result = pending.result()
        now = time.monotonic()
        ours = {s.seq.request_id: s.seq for s in plan.scheduled}
        for request_id, positions in result.prompt_logprobs.items():
            req = self._requests.get(request_id)
            if req is not None and req.seq is ours.get(request_id):  # not a reused id's new request
                req.prompt_logprobs.update(positions)
        self.scheduler.resolve(plan, result.token_ids)
        outputs = []
        for s, token, lp in zip(plan.scheduled, result.token_ids, result.logprobs):
            seq = s.seq
            req = self._requests.get(seq.request_id)
            if token == NO_TOKEN or req is None or req.seq is not seq:
                # a prefill chunk; aborted while the step ran; or (asynchronous scheduling) fed
                # once more after the previous step's token finished it: that token is dropped
                continue
            if req.first_token_time is None:
                req.first_token_time = now
            if req.logprobs is not None and lp is not None:
                req.logprobs.append(lp)
            if req.detok.push(token) and not seq.is_finished:
                self.scheduler.finish(seq, "stop")
            if seq.is_finished or not finished_only:
                outputs.append(self._output(req, now))
        return outputs

    def _prefetch_adapters(self) -> None:
        """Load the adapters of the requests next in line for admission (the scheduler's own order)
        into slots the running requests do not hold, so their first step does not wait for a load."""
        scheduler, manager = self.scheduler, self.adapters
        if not scheduler.waiting or manager.max_loras == 0:
            return
        keep = {s.adapter for s in scheduler.running if s.adapter is not None}
        upcoming: list[str] = []
        for seq in scheduler.next_in_line:  # this step's order; no second sort of the queue
            if len(keep) + len(upcoming) >= manager.max_loras:
                break
            if seq.adapter is not None and seq.adapter not in keep and seq.adapter not in upcoming:
                upcoming.append(seq.adapter)
        manager.prefetch(upcoming, keep)

    def _output(self, req: _Request, now: float) -> RequestOutput:
        seq = req.seq
        if seq.is_finished:
            del self._requests[seq.request_id]
            self.runner.release(seq.request_id)
        prompt_logprobs = None
        if seq.sampling.prompt_logprobs is not None:
            prompt_logprobs = [None] + [req.prompt_logprobs.get(p) for p in range(1, seq.num_prompt_tokens)]
        return RequestOutput(
            request_id=seq.request_id, adapter=seq.adapter, prompt_token_ids=req.prompt_token_ids,
            output_token_ids=seq.output_token_ids, text=req.detok.text,
            delta_text=req.detok.delta(seq.is_finished), finished=seq.is_finished,
            finish_reason=seq.finish_reason, logprobs=req.logprobs, prompt_logprobs=prompt_logprobs,
            arrival_time=seq.arrival_time, first_token_time=req.first_token_time,
            finish_time=now if seq.is_finished else None, num_cached_tokens=seq.num_cached_tokens)

    def stats(self) -> dict:
        bm = self.block_manager
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "kv_blocks_total": bm.num_blocks, "kv_blocks_used": bm.num_used_blocks,
                "adapters_registered": len(self.adapters.names), "adapter_loads": self.adapters.num_loads,
                "adapter_prefetches": self.adapters.num_prefetches,
                "steps": self.num_steps}
