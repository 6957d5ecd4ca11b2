"""``inlaid bench``: flags -> WorkloadSpec + BenchConfig -> inlaid.bench (runner, sweep, report, plots).

    inlaid bench serve   one workload on the engine (--model) or a server (--url), plus baselines
    inlaid bench sweep   adapters | rates | batch: the three result shapes
    inlaid bench compare overlay result files: one table, one set of plots
    inlaid bench kernels / lora   the kernel benchmark scripts (source checkout, CUDA)
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from inlaid.bench import plots, report, sweep
from inlaid.bench.requests import workload_from_spec, workload_from_trace
from inlaid.bench.results import RunResult, load_results, write_results
from inlaid.paths import check_writable_dir
from inlaid.bench.roofline import HBM_BYTES_PER_S
from inlaid.bench.runner import BASELINES, BenchConfig, run_all
from inlaid.bench.workload import SAMPLE_TASKS, LengthProfile, LengthRange, WorkloadSpec
from inlaid.cli.serve import CUDA_GRAPHS_HELP, cuda_graph_options, parse_adapters
from inlaid.engine.llm_engine import EngineConfig
from inlaid.errors import ConfigError, InlaidError

app = typer.Typer(help="Serving benchmarks under multi-adapter workloads.", no_args_is_help=True)
sweep_app = typer.Typer(help="The three result shapes: adapters, rates, batch.", no_args_is_help=True)
app.add_typer(sweep_app, name="sweep")

_E = EngineConfig()  # flag defaults come from the configs, so the two cannot drift apart
_B = BenchConfig()
_W = WorkloadSpec(1, num_adapters=1)

# --- shared options ------------------------------------------------------------------------------
Model = Annotated[Optional[str], typer.Option(
    help="dummy:llama-2-7b | dummy:llama-2-13b | dummy:tiny (random weights of real shapes), an HF dir or an "
         "inlaid checkpoint. In process.")]
Url = Annotated[Optional[str], typer.Option(help="An OpenAI-compatible server instead of --model.")]
ApiKey = Annotated[Optional[str], typer.Option(envvar="INLAID_API_KEY", help="Bearer key for --url.")]
MaxConcurrency = Annotated[int, typer.Option(help="Requests in flight at most (--url).")]
Policy = Annotated[str, typer.Option(help="Scheduler of the main run: inlaid or fcfs.")]
Baseline = Annotated[Optional[list[str]], typer.Option(
    "--baseline", "-b", help=f"Also run (repeatable): {', '.join(BASELINES)}.")]
Adapter = Annotated[Optional[list[str]], typer.Option(
    "--adapter", "-a", help="NAME=PEFT_DIR for a real model (repeatable).")]
Bits = Annotated[int, typer.Option(help="Dummy base bits: 2, 3, 4, 8, or 16 for fp16.")]
Rank = Annotated[int, typer.Option(help="Dummy adapters' rank.")]
Requests = Annotated[int, typer.Option("--requests", "-n", help="Requests in the workload.")]
Pattern = Annotated[str, typer.Option(help="distinct, uniform, identical, powerlaw or skewed.")]
Adapters = Annotated[Optional[int], typer.Option("--adapters", help="Adapters in the workload.")]
Arrival = Annotated[str, typer.Option(help="poisson, gamma or all-at-once.")]
InputLen = Annotated[str, typer.Option(help="Prompt tokens LOW:HIGH (uniform) or N.")]
OutputLen = Annotated[str, typer.Option(help="Output tokens LOW:HIGH (uniform) or N.")]
Tasks = Annotated[Optional[str], typer.Option(
    help="'sample': five tasks with their own length profiles (sql, math, chat, summarize, translate); "
         "'none': --input-len / --output-len for all.")]
Out = Annotated[Path, typer.Option(help="Output directory (JSON, CSV, PNG, summary.md).")]
Reference = Annotated[Optional[str], typer.Option(help="Run the ratio columns divide by (default: first baseline).")]


@dataclasses.dataclass
class _Target:
    """The flags every run command shares; ``config()`` makes the BenchConfig."""

    model: str | None = None
    url: str | None = None
    api_key: str | None = None
    max_concurrency: int = _B.max_concurrency
    policy: str = _B.engine.policy
    baseline: list[str] | None = None  # the flags' names: --baseline, --adapter (repeatable)
    adapter: list[str] | None = None
    fp16_model: str | None = None
    bits: int = 4
    rank: int = _E.dummy_rank
    dummy_layers: int | None = None
    max_loras: int = _E.max_loras
    max_lora_rank: int = _E.max_lora_rank
    max_num_seqs: int = _E.max_num_seqs
    max_num_batched_tokens: int = _E.max_num_batched_tokens
    max_tasks_per_step: int = _E.max_tasks_per_step
    num_kv_blocks: int | None = None
    device: str | None = None
    dtype: str | None = None
    ttft_slo: float | None = None
    latency_slo: float | None = None
    slo_aware: bool = True
    cuda_graphs: str = "all"
    realtime: bool = True
    hf_batch_size: int = _B.hf_batch_size
    hf_max_requests: int | None = None
    warmup: int = _B.warmup_requests
    hbm_tbps: float = HBM_BYTES_PER_S / 1e12
    seed: int = 0

    def config(self) -> BenchConfig:
        if (self.model is None) == (self.url is None):
            raise ConfigError("give either --model (in-process engine) or --url (a running server)")
        if self.bits not in (2, 3, 4, 8, 16):
            raise ConfigError(f"--bits {self.bits}: choose 2, 3, 4, 8 or 16")
        engine = EngineConfig(
            model=self.model or _E.model, adapters=parse_adapters(self.adapter or [], self.model),
            device=self.device, dtype=self.dtype, max_loras=self.max_loras, max_lora_rank=self.max_lora_rank,
            max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens, policy=self.policy,
            max_tasks_per_step=self.max_tasks_per_step, num_kv_blocks=self.num_kv_blocks,
            dummy_bits=None if self.bits == 16 else self.bits, dummy_layers=self.dummy_layers,
            dummy_rank=self.rank, **cuda_graph_options(self.cuda_graphs))
        return BenchConfig(engine=engine, url=self.url, baselines=tuple(self.baseline or ()),
                           fp16_model=self.fp16_model, max_concurrency=self.max_concurrency, api_key=self.api_key,
                           realtime=self.realtime, ttft_slo_s=self.ttft_slo, latency_slo_s=self.latency_slo,
                           slo_aware=self.slo_aware,
                           hf_batch_size=self.hf_batch_size, hf_max_requests=self.hf_max_requests,
                           warmup_requests=self.warmup,
                           hbm_bandwidth=self.hbm_tbps * 1e12, seed=self.seed)


_TARGET_FIELDS = {f.name for f in dataclasses.fields(_Target)}


def parse_range(text: str, flag: str) -> LengthRange:
    low, sep, high = text.partition(":")
    try:
        return LengthRange(int(low), int(high)) if sep else LengthRange.fixed(int(low))
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected LOW:HIGH or N (token counts)") from None


def parse_list(text: str, flag: str, kind=int) -> list:
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected a comma-separated list") from None


def make_spec(requests: int, pattern: str, adapters: int | None, alpha: float, batch_size: int, arrival: str,
              rate: float, cv: float, input_len: str, output_len: str, tasks: str | None, seed: int) -> WorkloadSpec:
    tasks = None if tasks in (None, "", "none") else tasks
    if tasks not in (None, "sample"):
        raise ConfigError(f"--tasks {tasks!r}: the only built-in profile set is 'sample'")
    if adapters is None and tasks is None and pattern in ("powerlaw", "skewed"):
        # the pattern may be the default, so name it: the user may never have typed --pattern
        default = " (the default)" if pattern == _W.pattern else ""
        raise ConfigError(f"--adapters N is needed: --pattern {pattern}{default} spreads the requests over N "
                          "adapters (or give --tasks sample, or another --pattern)")
    lengths = LengthProfile(parse_range(input_len, "--input-len"), parse_range(output_len, "--output-len"))
    return WorkloadSpec(requests, pattern=pattern, num_adapters=None if tasks else adapters, alpha=alpha,
                        batch_size=batch_size, arrival=arrival, rate=rate, cv=cv, lengths=lengths,
                        task_lengths=SAMPLE_TASKS if tasks else None, seed=seed)


def _check_before_running(config: BenchConfig, out: Path, reference: str | None) -> None:
    """What would otherwise fail only after every run is done (and lose them): --out and --reference."""
    check_writable_dir(out)
    if reference is not None and reference not in config.variants:
        raise ConfigError(f"--reference {reference!r} is not one of the runs: {', '.join(config.variants)}")


def _run_with_progress(work, out: Path):
    """Call ``work(progress, on_result)`` under a rich progress bar (one line per run). Each finished
    run's files are written to ``out`` at once, so Ctrl-C, SIGTERM or a crash keeps the runs done."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from inlaid.cli.progress import console, set_interrupt_note

    bars, finished = {}, []

    def keep(result: RunResult) -> None:
        finished.append(result)
        write_results(finished, out)
        set_interrupt_note(f"interrupted: the {len(finished)} finished runs are in {out}")

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        def tick(name: str, done: int, total: int) -> None:
            if name not in bars:
                bars[name] = progress.add_task(name, total=total)
            progress.update(bars[name], completed=done)

        return work(tick, keep)


def _stdout():
    """Tables go to stdout, as wide as they need when it is not a terminal (logs, files)."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=240)


def finish(results: list[RunResult], out: Path, title: str, columns=report.SERVE_COLUMNS,
           ratios=report.SERVE_RATIOS, reference: str | None = None, draw: bool = True,
           transpose: bool = False) -> None:
    """Table on stdout; JSON, CSV, summary.md and plots into ``out``."""
    from inlaid.cli.progress import console

    reference = reference or report.default_reference(results)
    table = dict(columns=columns, ratios=ratios, reference=reference, transpose=transpose)
    _stdout().print(report.rich_table(results, title=title, **table))
    paths = write_results(results, out)
    (out / "summary.md").write_text(f"{title}\n\n{report.markdown_table(results, **table)}\n")
    if draw:
        paths += plots.make_plots(results, out)
    console.print(f"wrote {len(paths) + 1} files to {out}")
    _fail_on_empty_runs(results, out)


def _fail_on_empty_runs(results: list[RunResult], out: Path) -> None:
    """A run whose every request failed measured nothing: its zeros must not pass for a result."""
    empty = [r for r in results if r.requests and not r.summary.get("num_completed")]
    if not empty:
        return
    first = next((row.get("error") for row in empty[0].requests if row.get("error")), None)
    why = f" (first error: {first})" if first else ""
    raise InlaidError(f"every request of {', '.join(repr(r.label) for r in empty)} failed{why}; "
                      f"the per-request errors are in {out}/*.requests.csv")


# --- target flags, declared once ---------------------------------------------------------------------
BaselineOpt = Baseline
Fp16Model = Annotated[Optional[str], typer.Option(help="The fp16 base for --baseline fp16 / hf-peft when --model "
                                                       "is an inlaid checkpoint.")]
DummyLayers = Annotated[Optional[int], typer.Option(help="Dummy models: fewer layers than the shape has.")]
MaxLoras = Annotated[int, typer.Option(help="Adapter slots on the device.")]
MaxLoraRank = Annotated[int, typer.Option(help="Largest adapter rank.")]
MaxNumSeqs = Annotated[int, typer.Option(help="Requests per step.")]
MaxBatchedTokens = Annotated[int, typer.Option(help="Tokens per step.")]
MaxTasks = Annotated[int, typer.Option(help="β: adapters per step under --policy inlaid.")]
KvBlocks = Annotated[Optional[int], typer.Option(help="KV cache blocks (default: from free memory).")]
Device = Annotated[Optional[str], typer.Option(help="cuda or cpu (default: cuda when available).")]
Dtype = Annotated[Optional[str], typer.Option(help="float16, bfloat16 or float32.")]
TtftSlo = Annotated[Optional[float], typer.Option(help="TTFT SLO in seconds.")]
LatencySlo = Annotated[Optional[float], typer.Option(help="End-to-end latency SLO in seconds.")]
SloAware = Annotated[bool, typer.Option("--slo-aware/--no-slo-aware",
                                        help="--policy inlaid: give the engine's scheduler the --ttft-slo / "
                                             "--latency-slo targets, so it serves requests that can no longer "
                                             "meet them last (fcfs runs never get them).")]
CudaGraphs = Annotated[str, typer.Option(help=CUDA_GRAPHS_HELP)]
Realtime = Annotated[bool, typer.Option("--realtime/--as-fast-as-possible",
                                        help="Honour arrival times, or send every request at 0.")]
HfBatch = Annotated[int, typer.Option(help="hf-peft: requests per generate() batch.")]
HfMax = Annotated[Optional[int], typer.Option(help="hf-peft: run only the first N requests (it is slow).")]
Warmup = Annotated[int, typer.Option(help="Warm-up requests before timing each run.")]
Hbm = Annotated[float, typer.Option("--hbm-tbps", help="HBM bandwidth for the roofline, TB/s.")]
Seed = Annotated[int, typer.Option(help="Workload seed.")]
Alpha = Annotated[float, typer.Option(help="powerlaw: P(adapter i) ∝ 1/(i+1)^alpha.")]
BatchSize = Annotated[int, typer.Option(help="distinct / uniform: consecutive requests form batches of this size.")]
Rate = Annotated[float, typer.Option(help="Requests per second (poisson, gamma).")]
Cv = Annotated[float, typer.Option(help="gamma: coefficient of variation of the gaps.")]
Trace = Annotated[Optional[Path], typer.Option(help="Replay a CSV trace (timestamp,adapter,input_len,output_len).")]
Plots = Annotated[bool, typer.Option("--plots/--no-plots", help="Write PNG plots.")]


@app.command("serve")
def serve_cmd(
    model: Model = None, url: Url = None, api_key: ApiKey = None, max_concurrency: MaxConcurrency = _B.max_concurrency,
    policy: Policy = _B.engine.policy, baseline: BaselineOpt = None, adapter: Adapter = None,
    fp16_model: Fp16Model = None, bits: Bits = 4, rank: Rank = _E.dummy_rank, dummy_layers: DummyLayers = None,
    max_loras: MaxLoras = _E.max_loras, max_lora_rank: MaxLoraRank = _E.max_lora_rank,
    max_num_seqs: MaxNumSeqs = _E.max_num_seqs, max_num_batched_tokens: MaxBatchedTokens = _E.max_num_batched_tokens,
    max_tasks_per_step: MaxTasks = _E.max_tasks_per_step, num_kv_blocks: KvBlocks = None, device: Device = None,
    dtype: Dtype = None, ttft_slo: TtftSlo = None, latency_slo: LatencySlo = None, slo_aware: SloAware = True,
    cuda_graphs: CudaGraphs = "all",
    realtime: Realtime = True,
    hf_batch_size: HfBatch = _B.hf_batch_size, hf_max_requests: HfMax = None, warmup: Warmup = _B.warmup_requests,
    hbm_tbps: Hbm = HBM_BYTES_PER_S / 1e12,
    requests: Requests = 200, pattern: Pattern = _W.pattern, adapters: Adapters = None, alpha: Alpha = _W.alpha,
    batch_size: BatchSize = _W.batch_size, arrival: Arrival = _W.arrival, rate: Rate = _W.rate, cv: Cv = _W.cv,
    input_len: InputLen = "8:512", output_len: OutputLen = "8:512", tasks: Tasks = None, trace: Trace = None,
    seed: Seed = 0, out: Out = Path("results"), reference: Reference = None, draw: Plots = True,
) -> None:
    """One workload on the engine or a server, plus baselines: table, JSON, CSV and plots."""
    target = _Target(**{k: v for k, v in locals().items() if k in _TARGET_FIELDS})
    config = target.config()
    _check_before_running(config, out, reference)
    if trace is not None:
        workload = workload_from_trace(trace)
    else:
        workload = workload_from_spec(make_spec(requests, pattern, adapters, alpha, batch_size, arrival, rate, cv,
                                                input_len, output_len, tasks, seed))
    results = _run_with_progress(lambda tick, keep: run_all(config, workload, tick, on_result=keep), out)
    finish(results, out, f"{len(workload.requests)} requests, {workload.params.get('pattern')}, "
           f"{len(workload.adapter_names)} adapters", reference=reference, draw=draw, transpose=True)


@sweep_app.command("adapters")
def sweep_adapters_cmd(
    model: Model = None, url: Url = None, api_key: ApiKey = None, max_concurrency: MaxConcurrency = _B.max_concurrency,
    policy: Policy = _B.engine.policy, baseline: BaselineOpt = None, adapter: Adapter = None,
    fp16_model: Fp16Model = None, bits: Bits = 4, rank: Rank = _E.dummy_rank, dummy_layers: DummyLayers = None,
    max_loras: MaxLoras = _E.max_loras, max_lora_rank: MaxLoraRank = _E.max_lora_rank,
    max_num_seqs: MaxNumSeqs = _E.max_num_seqs, max_num_batched_tokens: MaxBatchedTokens = _E.max_num_batched_tokens,
    max_tasks_per_step: MaxTasks = _E.max_tasks_per_step, num_kv_blocks: KvBlocks = None, device: Device = None,
    dtype: Dtype = None, ttft_slo: TtftSlo = None, latency_slo: LatencySlo = None, slo_aware: SloAware = True,
    cuda_graphs: CudaGraphs = "all",
    realtime: Realtime = True,
    hf_batch_size: HfBatch = _B.hf_batch_size, hf_max_requests: HfMax = None, warmup: Warmup = _B.warmup_requests,
    hbm_tbps: Hbm = HBM_BYTES_PER_S / 1e12,
    counts: Annotated[str, typer.Option(help="Numbers of adapters, comma-separated.")] = "1,10,100,1000",
    requests: Requests = 200, pattern: Pattern = "powerlaw", alpha: Alpha = 1.0, batch_size: BatchSize = 1,
    arrival: Arrival = _W.arrival, rate: Rate = _W.rate, cv: Cv = _W.cv, input_len: InputLen = "8:512",
    output_len: OutputLen = "8:512", seed: Seed = 0, out: Out = Path("results/adapters"),
    reference: Reference = None, draw: Plots = True,
) -> None:
    """Result 1: throughput vs the number of adapters (e.g. vs --baseline hf-peft --baseline fp16)."""
    target = _Target(**{k: v for k, v in locals().items() if k in _TARGET_FIELDS})
    config = target.config()
    _check_before_running(config, out, reference)
    numbers = parse_list(counts, "--counts")
    if not numbers:
        raise ConfigError("--counts needs at least one number of adapters")
    spec = make_spec(requests, pattern, numbers[0], alpha, batch_size, arrival, rate, cv, input_len, output_len,
                     None, seed)
    results = _run_with_progress(lambda tick, keep: sweep.sweep_adapters(config, spec, numbers, tick, keep), out)
    columns, ratios = sweep.COLUMNS["adapters"]
    finish(results, out, "throughput vs number of adapters", columns, ratios, reference, draw)


@sweep_app.command("rates")
def sweep_rates_cmd(
    model: Model = None, url: Url = None, api_key: ApiKey = None, max_concurrency: MaxConcurrency = _B.max_concurrency,
    policy: Policy = _B.engine.policy, baseline: BaselineOpt = None, adapter: Adapter = None,
    fp16_model: Fp16Model = None, bits: Bits = 4, rank: Rank = _E.dummy_rank, dummy_layers: DummyLayers = None,
    max_loras: MaxLoras = _E.max_loras, max_lora_rank: MaxLoraRank = _E.max_lora_rank,
    max_num_seqs: MaxNumSeqs = _E.max_num_seqs, max_num_batched_tokens: MaxBatchedTokens = _E.max_num_batched_tokens,
    max_tasks_per_step: MaxTasks = _E.max_tasks_per_step, num_kv_blocks: KvBlocks = None, device: Device = None,
    dtype: Dtype = None, ttft_slo: TtftSlo = None, latency_slo: LatencySlo = None, slo_aware: SloAware = True,
    cuda_graphs: CudaGraphs = "all",
    realtime: Realtime = True,
    hf_batch_size: HfBatch = _B.hf_batch_size, hf_max_requests: HfMax = None, warmup: Warmup = _B.warmup_requests,
    hbm_tbps: Hbm = HBM_BYTES_PER_S / 1e12,
    rates: Annotated[str, typer.Option(help="Arrival rates in req/s, comma-separated.")] = "1,2,4,8",
    requests: Requests = 200, pattern: Pattern = "powerlaw", adapters: Adapters = None, alpha: Alpha = 1.0,
    arrival: Arrival = _W.arrival, cv: Cv = _W.cv, input_len: InputLen = "8:512", output_len: OutputLen = "8:512",
    tasks: Tasks = "sample", seed: Seed = 0, out: Out = Path("results/rates"), reference: Reference = None,
    draw: Plots = True,
) -> None:
    """Result 2: SLO attainment and JCT vs arrival rate (e.g. --policy inlaid --baseline fcfs)."""
    target = _Target(**{k: v for k, v in locals().items() if k in _TARGET_FIELDS})
    config = target.config()
    _check_before_running(config, out, reference)
    spec = make_spec(requests, pattern, adapters, alpha, 1, arrival, 1.0, cv, input_len, output_len, tasks, seed)
    values = parse_list(rates, "--rates", float)
    results = _run_with_progress(lambda tick, keep: sweep.sweep_rates(config, spec, values, tick, keep), out)
    columns, ratios = sweep.COLUMNS["rates"]
    finish(results, out, "SLO attainment and JCT vs arrival rate", columns, ratios, reference, draw)


@sweep_app.command("batch")
def sweep_batch_cmd(
    model: Model = None, url: Url = None, api_key: ApiKey = None, max_concurrency: MaxConcurrency = _B.max_concurrency,
    policy: Policy = _B.engine.policy, baseline: BaselineOpt = None, adapter: Adapter = None,
    fp16_model: Fp16Model = None, bits: Bits = 4, rank: Rank = _E.dummy_rank, dummy_layers: DummyLayers = None,
    max_loras: MaxLoras = _E.max_loras, max_lora_rank: MaxLoraRank = _E.max_lora_rank,
    max_num_seqs: MaxNumSeqs = _E.max_num_seqs, max_num_batched_tokens: MaxBatchedTokens = _E.max_num_batched_tokens,
    max_tasks_per_step: MaxTasks = _E.max_tasks_per_step, num_kv_blocks: KvBlocks = None, device: Device = None,
    dtype: Dtype = None, ttft_slo: TtftSlo = None, latency_slo: LatencySlo = None, slo_aware: SloAware = True,
    cuda_graphs: CudaGraphs = "all",
    hf_batch_size: HfBatch = _B.hf_batch_size, hf_max_requests: HfMax = None, warmup: Warmup = _B.warmup_requests,
    hbm_tbps: Hbm = HBM_BYTES_PER_S / 1e12,
    patterns: Annotated[str, typer.Option(help="Adapter patterns, comma-separated.")] = "distinct,uniform,identical",
    batch_sizes: Annotated[str, typer.Option(help="Batch sizes, comma-separated.")] = "1,8,32,64",
    input_len: Annotated[int, typer.Option(help="Prompt tokens of every request.")] = 128,
    output_len: Annotated[int, typer.Option(help="Output tokens of every request.")] = 64,
    seed: Seed = 0, out: Out = Path("results/batch"), reference: Reference = None, draw: Plots = True,
) -> None:
    """Result 3: prefill / decode / end-to-end latency per pattern and batch size, decode vs the HBM roofline."""
    target = _Target(**{k: v for k, v in locals().items() if k in _TARGET_FIELDS})
    config = target.config()
    if config.url is not None:
        raise ConfigError("sweep batch times engine steps: it runs in process (--model), not against --url")
    _check_before_running(config, out, reference)
    names = [p.strip() for p in patterns.split(",") if p.strip()]
    sizes = parse_list(batch_sizes, "--batch-sizes")
    results = _run_with_progress(
        lambda tick, keep: sweep.sweep_batch(config, names, sizes, input_len, output_len, seed, tick, keep), out)
    columns, ratios = sweep.COLUMNS["batch"]
    finish(results, out, f"latency per batch (input {input_len}, output {output_len} tokens)", columns, ratios,
           reference, draw)


@app.command("compare")
def compare_cmd(
    files: Annotated[list[Path], typer.Argument(help="Result files: <run>.json or results.json.")],
    out: Annotated[Optional[Path], typer.Option(help="Write the overlay plots and summary.md here.")] = None,
    reference: Reference = None,
    columns: Annotated[Optional[str], typer.Option(help="Metrics to show, comma-separated.")] = None,
) -> None:
    """Overlay several result files: one table with ratios, and the plots together."""
    if out is not None:
        check_writable_dir(out)
    results = load_results(files)
    _disambiguate(results, files)
    names = list(dict.fromkeys(r.name for r in results))
    if reference is not None and reference not in names:
        raise ConfigError(f"--reference {reference!r} is not one of the runs: {', '.join(names)}")
    shown = tuple(c.strip() for c in columns.split(",")) if columns else report.SERVE_COLUMNS
    report.check_columns(shown)
    from inlaid.cli.progress import console

    table = dict(columns=shown, ratios=report.SERVE_RATIOS, reference=reference or results[0].name,
                 transpose=len(results) <= 6)
    _stdout().print(report.rich_table(results, title="compare", **table))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        text = report.markdown_table(results, **table)
        (out / "summary.md").write_text(text + "\n")
        paths = plots.make_plots(results, out)
        console.print(f"wrote {out / 'summary.md'} and {', '.join(p.name for p in paths)}")


def _disambiguate(results: list[RunResult], files: list[Path]) -> None:
    """Runs of the same name and point from different files get their file's directory in the name."""
    seen: dict[str, int] = {}
    for r in results:
        seen[r.label] = seen.get(r.label, 0) + 1
    if all(n == 1 for n in seen.values()):
        return
    origins = iter(_origins(files))
    for r, origin in zip(results, origins):
        if seen[r.label] > 1:
            r.name = f"{r.name}@{origin}"


def _origins(files: list[Path]):
    """One origin per result, in load order (a results.json holds several)."""
    import json

    for path in files:
        data = json.loads(Path(path).read_text())
        tag = path.parent.name or path.stem
        for _ in data if isinstance(data, list) else [data]:
            yield tag if path.name == "results.json" else f"{tag}/{path.stem}"


def _script(name: str, args: list[str], cpu_flags: tuple[str, ...] = ()) -> None:
    """Run ``scripts/<name>`` with ``args``. It needs a GPU unless ``args`` ask for help or one of
    ``cpu_flags`` (the script's modes that only read files): without one the scripts print a skip
    note and return, which would exit 0 as if the benchmark had run."""
    import torch

    command = f"inlaid bench {name[6:-3]}"
    path = Path(__file__).resolve().parents[2] / "scripts" / name
    if not path.is_file():
        raise ConfigError(f"scripts/{name} is not here: '{command}' runs from a source checkout")
    needs_gpu = not any(arg.partition("=")[0] in ("-h", "--help", *cpu_flags) for arg in args)
    if needs_gpu and not torch.cuda.is_available():
        cpu_modes = f" ({', '.join(cpu_flags)} runs without one)" if cpu_flags else ""
        raise ConfigError(f"{command} needs a CUDA GPU and this machine has none{cpu_modes}")
    spec = importlib.util.spec_from_file_location(f"inlaid_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    old = sys.argv
    sys.argv = [str(path), *args]
    try:
        module.main()
    finally:
        sys.argv = old


_PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


@app.command("kernels", context_settings=_PASS_THROUGH)
def kernels_cmd(ctx: typer.Context) -> None:
    """Quantized matmul kernels vs fp16 cuBLAS (scripts/bench_kernels.py; its flags pass through; CUDA)."""
    _script("bench_kernels.py", ctx.args, cpu_flags=("--rank",))


@app.command("lora", context_settings=_PASS_THROUGH)
def lora_cmd(ctx: typer.Context) -> None:
    """Multi-LoRA Triton ops (scripts/bench_lora.py; its flags pass through; CUDA)."""
    _script("bench_lora.py", ctx.args)
