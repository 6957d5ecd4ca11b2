"""Run a workload on a target — the in-process engine, a server URL, or the HF + PEFT baseline — and
turn what was observed into a :class:`RunResult`.

A benchmark is a main run plus baselines on the same workload, each one change away from the main
run (BASELINES): the other scheduling policy, the fp16 base, no adapters at all (the no-LoRA
ceiling: every request on the bare base), or HF transformers + PEFT. Every engine run builds its own
engine, warms it up, then resets the output-length predictor so each run learns from scratch.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from inlaid.bench import baselines, http_target
from inlaid.bench.engine_target import EngineRun, run_engine, warm_up
from inlaid.bench.metrics import RequestTimeline, StepRecord, summarize, summarize_steps
from inlaid.bench.requests import Workload, map_adapters
from inlaid.bench.results import RunResult
from inlaid.bench.roofline import HBM_BYTES_PER_S, decode_roofline, model_bytes
from inlaid.engine.llm_engine import EngineConfig, LLMEngine
from inlaid.engine.scheduler import check_slo_target
from inlaid.errors import ConfigError

BASELINES = ("inlaid", "fcfs", "fp16", "no-lora", "hf-peft", "hf-peft-mixed")
HTTP_BASELINES = ("no-lora",)

# (variant, done, total) -> None; a progress bar per variant
Progress = Callable[[str, int, int], None]
# called with each finished run, so a long sweep keeps what it finished when it is cut short
OnResult = Callable[[RunResult], None]


@dataclass(frozen=True)
class BenchConfig:
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(policy="inlaid"))
    url: str | None = None  # a server instead of the in-process engine
    baselines: tuple[str, ...] = ()
    fp16_model: str | None = None  # the fp16 base for 'fp16' / 'hf-peft' when the model is a checkpoint
    max_concurrency: int = 64
    api_key: str | None = None
    realtime: bool = True  # False: every request arrives at 0 (as fast as possible)
    ttft_slo_s: float | None = None
    latency_slo_s: float | None = None
    slo_aware: bool = True  # inlaid engine runs: the scheduler gets the SLO targets too
    hf_batch_size: int = 8
    hf_max_requests: int | None = None  # hf-peft runs the first N requests only (it is slow)
    warmup_requests: int = 2
    hbm_bandwidth: float = HBM_BYTES_PER_S
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "baselines", tuple(self.baselines))
        unknown = [b for b in self.baselines if b not in BASELINES]
        if unknown:
            raise ConfigError(f"--baseline {unknown[0]!r}: choose from {', '.join(BASELINES)}")
        if len(set(self.baselines)) != len(self.baselines):
            raise ConfigError("a baseline is given twice")
        if self.url is None and self.engine.policy in self.baselines:
            raise ConfigError(f"--baseline {self.engine.policy} is the main run's policy already")
        if self.url is not None and set(self.baselines) - set(HTTP_BASELINES):
            raise ConfigError(f"against --url only {', '.join(HTTP_BASELINES)} can be a baseline: the other "
                              "baselines change the server, so run them in process (--model)")
        is_dummy = self.engine.model.startswith("dummy:")
        if self.url is None and not is_dummy and self.fp16_model is None and "fp16" in self.baselines:
            raise ConfigError("--baseline fp16 on a real model needs --fp16-model (the unquantized base)")
        hf = [b for b in self.baselines if b in ("hf-peft", "hf-peft-mixed")]
        # PEFT loads only the --adapter dirs, never a checkpoint's own adapters; without any, the
        # baseline would fail after the main run had taken all its time
        if self.url is None and not is_dummy and hf and not self.engine.adapters:
            raise ConfigError(f"--baseline {hf[0]} on a real model needs its adapters (--adapter NAME=DIR)")
        if self.url is None and not is_dummy and hf and self.fp16_model is None and _is_checkpoint(self.engine.model):
            raise ConfigError(f"--baseline {hf[0]} runs HF transformers, which cannot load the inlaid checkpoint "
                              f"{self.engine.model}: give its unquantized base with --fp16-model")
        if self.hf_max_requests is not None and self.hf_max_requests < 1:
            raise ConfigError("--hf-max-requests must be at least 1")
        check_slo_target("--ttft-slo", self.ttft_slo_s)
        check_slo_target("--latency-slo", self.latency_slo_s)

    @property
    def main_name(self) -> str:
        return "server" if self.url else self.engine.policy

    @property
    def variants(self) -> tuple[str, ...]:
        return (self.main_name, *self.baselines)


def run_all(config: BenchConfig, workload: Workload, progress: Progress | None = None,
            extra_params: dict | None = None, on_result: OnResult | None = None) -> list[RunResult]:
    """The main run then each baseline, on the same workload."""
    results = []
    for variant in config.variants:
        results.append(run_variant(config, workload, variant, progress, extra_params))
        if on_result is not None:
            on_result(results[-1])
    return results


def run_variant(config: BenchConfig, workload: Workload, variant: str, progress: Progress | None = None,
                extra_params: dict | None = None) -> RunResult:
    def tick(done: int, total: int) -> None:
        if progress is not None:
            progress(variant, done, total)

    params = {**workload.params, **(extra_params or {}), "variant": variant}
    if variant == "server" or (config.url and variant in HTTP_BASELINES):
        return _http_result(config, workload, variant, tick, params)
    if variant in ("hf-peft", "hf-peft-mixed"):
        return _hf_result(config, workload, variant, tick, params)
    return _engine_result(config, workload, variant, tick, params)


def engine_config_for(config: BenchConfig, variant: str, num_adapters: int) -> EngineConfig:
    """The main engine config with the one change ``variant`` makes."""
    base = config.engine
    changes: dict = {}
    if variant in ("inlaid", "fcfs"):
        changes["policy"] = variant
    # the SLO the run is measured against, so that inlaid can order by it; fcfs never gets it
    slo_aware = config.slo_aware and changes.get("policy", base.policy) == "inlaid"
    changes["ttft_slo_s"] = config.ttft_slo_s if slo_aware else None
    changes["latency_slo_s"] = config.latency_slo_s if slo_aware else None
    is_dummy = base.model.startswith("dummy:")
    if variant == "fp16" and is_dummy:
        changes["dummy_bits"] = None
    elif variant == "fp16":
        changes["model"] = config.fp16_model
    if is_dummy:
        changes["dummy_adapters"] = 0 if variant == "no-lora" else max(num_adapters, base.dummy_adapters)
    return dataclasses.replace(base, **changes)


def _summary(config: BenchConfig, timelines: Sequence[RequestTimeline]) -> dict:
    return summarize(timelines, config.ttft_slo_s, config.latency_slo_s).to_dict()


def _engine_result(config: BenchConfig, workload: Workload, variant: str, tick, params: dict) -> RunResult:
    engine_config = engine_config_for(config, variant, len(workload.adapter_names))
    _reset_device_memory()
    engine = LLMEngine(engine_config)
    try:
        adapter_map = {n: None for n in workload.adapter_names} if variant == "no-lora" else \
            map_adapters(workload.adapter_names, engine.adapters.names)
        if config.warmup_requests:
            warm_up(engine, workload, adapter_map, config.warmup_requests, config.seed)
        _forget_warm_up(engine)
        run = run_engine(engine, workload, adapter_map, realtime=config.realtime, seed=config.seed, progress=tick)
        bits, group = base_quantization(engine)
        params.update(model=engine_config.model, policy=engine_config.policy, bits=bits,
                      max_loras=engine_config.max_loras, slo_aware=engine.scheduler.config.slo_aware,
                      cuda_graphs=engine.runner.graph_mode)
        return RunResult(
            name=variant, target="engine", params=params, summary=_summary(config, run.timelines),
            requests=_request_rows(run.timelines, run.predicted_output_len),
            steps=summarize_steps(run.steps).to_dict(), adapter_swaps=run.num_adapter_loads,
            memory=engine_memory(engine, run), predictor=predictor_report(engine, run, adapter_map),
            roofline=_roofline(engine, run.steps, bits, group, config.hbm_bandwidth), wall_s=run.wall_s,
            device=str(engine.model.device))
    finally:
        del engine  # the next run sizes its KV cache from the memory this one leaves free
        _reset_device_memory()


def _forget_warm_up(engine: LLMEngine) -> None:
    """A fresh output-length predictor, so each run learns from scratch (not from the warm-up)."""
    from inlaid.engine.predictor import OutputLengthPredictor

    old = engine.predictor
    engine.predictor = engine.scheduler.predictor = OutputLengthPredictor(
        old.default_length, old.prior_weight, old.min_samples_for_slope, old.use_prompt_length)


def _reset_device_memory() -> None:
    """Free what earlier runs left (they may hold reference cycles) and restart the peak counter."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def base_quantization(engine: LLMEngine) -> tuple[int | None, int | None]:
    """(bits, group size) of the engine's base weights; (None, None) for a dense base."""
    if engine.is_dummy:
        return engine.config.dummy_bits, 128
    if engine.is_checkpoint:
        qconfig = json.loads((engine.model_path / "config.json").read_text())["quantization_config"]
        return int(qconfig["bits"]), int(qconfig.get("group_size", 128))
    return None, None


def _roofline(engine: LLMEngine, steps: list[StepRecord], bits, group, bandwidth: float) -> dict:
    bytes_of = model_bytes(engine.hf_config, bits, group, engine.model.dtype.itemsize)
    return decode_roofline(steps, bytes_of, lambda name: engine.adapters.info(name).max_rank, bandwidth).to_dict()


def engine_memory(engine: LLMEngine, run: EngineRun) -> dict:
    import torch

    from inlaid.engine.block_manager import adapter_slot_bytes, kv_block_bytes
    from inlaid.model.arch import projection_shapes

    s, cfg, itemsize = engine.model.shape, engine.config, engine.model.dtype.itemsize
    block_bytes = kv_block_bytes(s.num_layers, s.num_kv_heads, s.head_dim, cfg.block_size, itemsize)
    slot_bytes = adapter_slot_bytes(s.num_layers, projection_shapes(engine.hf_config).values(), cfg.max_lora_rank,
                                    itemsize)
    on_cuda = engine.model.device.type == "cuda"
    return {"kv_cache_bytes": block_bytes * engine.block_manager.num_blocks,
            "kv_peak_bytes": block_bytes * run.max_kv_blocks_used, "kv_block_bytes": block_bytes,
            "adapter_slots_bytes": slot_bytes * cfg.max_loras, "num_adapter_slots": cfg.max_loras,
            "device_peak_bytes": torch.cuda.max_memory_allocated(engine.model.device) if on_cuda else None}


def predictor_report(engine: LLMEngine, run: EngineRun, adapter_map: dict[str, str | None]) -> dict:
    """MAE of the prediction each finished request got at admission, overall and per task, next to
    the predictor's own prequential MAE (the prediction just before it learned each request)."""
    errors: dict[str, list[float]] = {}
    for t in run.timelines:
        if t.is_ok and t.request_id in run.predicted_output_len:
            errors.setdefault(t.adapter, []).append(abs(run.predicted_output_len[t.request_id] - t.output_tokens))
    every = [e for per_task in errors.values() for e in per_task]
    per_task = {}
    for name, task_errors in errors.items():
        stats = engine.predictor.stats(adapter_map.get(name))
        per_task[name] = {"num_requests": len(task_errors), "mae_at_admission": sum(task_errors) / len(task_errors),
                          "mean_output_len": stats.mean_output_len}
    prequential = engine.predictor.mean_absolute_error
    return {"mae_at_admission": sum(every) / len(every) if every else None,
            "mae_prequential": None if prequential != prequential else prequential,  # NaN -> None
            "num_observations": engine.predictor.num_observations, "per_task": per_task}


def _request_rows(timelines: Sequence[RequestTimeline], predicted: dict[int, float] | None = None) -> list[dict]:
    rows = []
    for t in timelines:
        row = dataclasses.asdict(t)
        row["predicted_output_len"] = (predicted or {}).get(t.request_id)
        rows.append(row)
    return rows


def _http_result(config: BenchConfig, workload: Workload, variant: str, tick, params: dict) -> RunResult:
    options = http_target.HttpOptions(config.url, config.max_concurrency, config.api_key, realtime=config.realtime,
                                      seed=config.seed, warmup_requests=config.warmup_requests)
    timelines = http_target.run_http(options, workload, no_lora=variant == "no-lora", progress=tick)
    params.update(url=config.url)
    wall = max((t.finish_s for t in timelines), default=0.0)
    return RunResult(name=variant, target="http", params=params, summary=_summary(config, timelines),
                     requests=_request_rows(timelines), wall_s=wall, device=config.url)


def _is_checkpoint(model: str) -> bool:
    from inlaid.quant.checkpoint import find_checkpoint

    return find_checkpoint(model) is not None


def hf_options(config: BenchConfig, variant: str) -> baselines.HfOptions:
    e = config.engine
    model = e.model if e.model.startswith("dummy:") else (config.fp16_model or e.model)
    return baselines.HfOptions(model=model, adapters=dict(e.adapters),
                               mode="mixed" if variant == "hf-peft-mixed" else "per-adapter",
                               batch_size=config.hf_batch_size, device=e.device, dtype=e.dtype,
                               dummy_rank=e.dummy_rank, dummy_layers=e.dummy_layers, realtime=config.realtime,
                               seed=config.seed)


def _hf_result(config: BenchConfig, workload: Workload, variant: str, tick, params: dict) -> RunResult:
    options = hf_options(config, variant)
    if config.hf_max_requests is not None and len(workload.requests) > config.hf_max_requests:
        first = sorted(workload.requests, key=lambda r: (r.arrival_s, r.request_id))[:config.hf_max_requests]
        workload = Workload.of(first, workload.adapter_names, **{**workload.params, "num_requests": len(first)})
        params["num_requests"] = len(first)
    _reset_device_memory()
    hf = baselines.load_hf_peft(options, len(workload.adapter_names))
    try:
        if config.warmup_requests:
            baselines.warm_up(hf)
        run = baselines.run_hf_peft(hf, workload, options, progress=tick)
        bytes_of = model_bytes(hf.config, None, None, next(hf.model.parameters()).element_size())
        roofline = decode_roofline(run.steps, bytes_of, lambda name: hf.rank_of[name], config.hbm_bandwidth)
        params.update(model=options.model, policy=options.mode, bits=None, hf_batch_size=options.batch_size)
        return RunResult(name=variant, target="hf-peft", params=params, summary=_summary(config, run.timelines),
                         requests=_request_rows(run.timelines), steps=summarize_steps(run.steps).to_dict(),
                         memory=baselines.memory(hf), roofline=roofline.to_dict(), wall_s=run.wall_s,
                         device=str(hf.device))
    finally:
        del hf
        _reset_device_memory()
