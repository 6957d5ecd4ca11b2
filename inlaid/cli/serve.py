"""``inlaid serve``: flags -> EngineConfig + ServerSettings -> inlaid.server.launch.serve."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from inlaid.engine.llm_engine import EngineConfig
from inlaid.errors import ConfigError
from inlaid.quant.checkpoint import find_checkpoint
from inlaid.server.settings import ServerSettings

_E = EngineConfig()  # flag defaults come from the configs, so the two cannot drift apart
_S = ServerSettings()
_SCHEDULING = {"auto": None, "async": True, "sync": False}  # --scheduling -> async_scheduling
# --cuda-graphs -> EngineConfig fields
_GRAPHS = {"all": dict(enforce_eager=False, prefill_graphs=True),
           "decode": dict(enforce_eager=False, prefill_graphs=False),
           "off": dict(enforce_eager=True, prefill_graphs=False)}
CUDA_GRAPHS_HELP = ("GPU: all: every step replays a CUDA graph (prefill steps too); decode: only "
                    "all-decode steps do; off: every step runs op by op.")


def cuda_graph_options(mode: str) -> dict:
    """``--cuda-graphs`` -> the EngineConfig fields it sets."""
    if mode not in _GRAPHS:
        raise ConfigError(f"--cuda-graphs {mode!r}: choose {', '.join(_GRAPHS)}")
    return _GRAPHS[mode]


def parse_adapters(specs: list[str], model: str | None = None) -> dict[str, str]:
    """``NAME=PATH`` flags -> {name: path}; one clear error per malformed flag. When ``model`` is
    an inlaid checkpoint it is read and checked here, before anything loads, and a NAME one of its
    task adapters already has is refused: the engine would serve the flag's adapter in its place."""
    checkpoint = find_checkpoint(model) if model else None
    stored = checkpoint.adapter_dirs() if checkpoint else {}
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ConfigError(f"--adapter {spec!r}: expected NAME=PATH (e.g. sql=adapters/sql)")
        if name in adapters:
            raise ConfigError(f"--adapter {name!r} is given twice")
        if name in stored:
            raise ConfigError(f"--adapter {name!r}: {model} already serves its task {name!r} under that "
                              "name; pick another name for this adapter")
        if not Path(path).expanduser().is_dir():
            raise ConfigError(f"--adapter {spec!r}: {path} is not a directory")
        adapters[name] = str(Path(path).expanduser())
    return adapters


def serve_cmd(
    model: Annotated[str, typer.Argument(
        help="HF safetensors dir, inlaid checkpoint (its task adapters are served too), .gguf, hub id, "
             "or 'default'.")],
    adapter: Annotated[Optional[list[str]], typer.Option(
        "--adapter", "-a", help="NAME=PEFT_DIR (repeatable); requests with model=NAME use it.")] = None,
    adapter_root: Annotated[Optional[list[Path]], typer.Option(
        "--adapter-root", help="Directory /v1/load_lora_adapter may read from (repeatable); "
                               "without one, loading at run time is off.")] = None,
    host: Annotated[str, typer.Option(help="Bind address (0.0.0.0 exposes the server).")] = _S.host,
    port: Annotated[int, typer.Option(help="Port.")] = _S.port,
    api_key: Annotated[Optional[str], typer.Option(
        envvar="INLAID_API_KEY", help="Require 'Authorization: Bearer KEY' (all but /health).")] = None,
    served_model_name: Annotated[Optional[str], typer.Option(
        help="The base model's name in requests (default: the model directory's name).")] = None,
    max_loras: Annotated[int, typer.Option(help="Adapter slots on the device.")] = _E.max_loras,
    max_lora_rank: Annotated[int, typer.Option(help="Largest adapter rank.")] = _E.max_lora_rank,
    max_num_seqs: Annotated[int, typer.Option(help="Requests per step.")] = _E.max_num_seqs,
    max_model_len: Annotated[Optional[int], typer.Option(
        help="Context length (default: the model's).")] = _E.max_model_len,
    policy: Annotated[str, typer.Option(help="Scheduler: fcfs or inlaid.")] = _E.policy,
    ttft_slo: Annotated[Optional[float], typer.Option(
        help="--policy inlaid: time-to-first-token target (s). Requests that can no longer meet the "
             "targets are served last (more requests inside them, longer waits for the late).")] = None,
    latency_slo: Annotated[Optional[float], typer.Option(
        help="--policy inlaid: end-to-end latency target (s), as --ttft-slo.")] = None,
    device: Annotated[Optional[str], typer.Option(
        help="cuda or cpu (default: cuda when available).")] = _E.device,
    dtype: Annotated[Optional[str], typer.Option(
        help="float16, bfloat16 or float32 (default: float16 on cuda, float32 on cpu).")] = _E.dtype,
    num_kv_blocks: Annotated[Optional[int], typer.Option(
        help="KV cache blocks (default: what the memory budget leaves once the adapter slots are "
             "taken out).")] = _E.num_kv_blocks,
    gpu_memory_utilization: Annotated[float, typer.Option(
        help="cuda: share of the card the weights, adapter slots and KV blocks may use.")]
        = _E.gpu_memory_utilization,
    kv_cache_gib: Annotated[float, typer.Option(
        help="cpu: GiB for the adapter slots and KV blocks together.")] = _E.kv_cache_gib,
    block_size: Annotated[int, typer.Option(help="Tokens per KV block.")] = _E.block_size,
    max_num_batched_tokens: Annotated[int, typer.Option(
        help="Tokens per step (prefill chunks and decodes together).")] = _E.max_num_batched_tokens,
    max_tasks_per_step: Annotated[int, typer.Option(
        help="--policy inlaid: most distinct adapters in one step (beta).")] = _E.max_tasks_per_step,
    scheduling: Annotated[str, typer.Option(
        help="async: launch each step before reading the last one's tokens back, so scheduling "
             "overlaps the GPU; sync: one step at a time; auto: async on cuda, sync on cpu.")] = "auto",
    cuda_graphs: Annotated[str, typer.Option(help=CUDA_GRAPHS_HELP)] = "all",
    max_queue: Annotated[int, typer.Option(
        help="Queued + running requests; more get 429.")] = _S.max_queue,
    drain_timeout: Annotated[float, typer.Option(
        help="Seconds in-flight requests get to finish on SIGTERM / Ctrl-C.")] = _S.drain_timeout,
) -> None:
    """Serve the base model and every adapter over an OpenAI-compatible API (vLLM conventions)."""
    if scheduling not in _SCHEDULING:
        raise ConfigError(f"--scheduling {scheduling!r}: choose auto, async or sync")
    settings = ServerSettings(host=host, port=port, api_key=api_key, served_model_name=served_model_name,
                              adapter_roots=tuple(str(r) for r in adapter_root or ()), max_queue=max_queue,
                              drain_timeout=drain_timeout)
    settings.resolved_adapter_roots()  # a missing root fails now, before the model loads
    config = EngineConfig(model=model, adapters=parse_adapters(adapter or [], model), device=device, dtype=dtype,
                          max_loras=max_loras, max_lora_rank=max_lora_rank, max_num_seqs=max_num_seqs,
                          max_model_len=max_model_len, policy=policy, num_kv_blocks=num_kv_blocks,
                          gpu_memory_utilization=gpu_memory_utilization, kv_cache_gib=kv_cache_gib,
                          block_size=block_size, max_num_batched_tokens=max_num_batched_tokens,
                          max_tasks_per_step=max_tasks_per_step,
                          ttft_slo_s=ttft_slo, latency_slo_s=latency_slo,
                          async_scheduling=_SCHEDULING[scheduling], **cuda_graph_options(cuda_graphs))
    if (ttft_slo is not None or latency_slo is not None) and policy != "inlaid":
        raise ConfigError(f"--ttft-slo / --latency-slo need --policy inlaid (the {policy} policy ignores them)")
    try:
        from inlaid.server import launch
    except ImportError as exc:  # fastapi / uvicorn are the 'serve' extra
        raise ConfigError(f"inlaid serve needs the serve extra: pip install 'inlaid[serve]' ({exc})") from exc
    launch.serve(config, settings)
