"""``inlaid bench`` through CliRunner: help, one small run per command on dummy:tiny, compare, and
bad input as one line + exit 1."""

import json

import pytest
from typer.testing import CliRunner

from inlaid.cli.main import app
from ..conftest import run_cli

runner = CliRunner()
TINY = ["--model", "dummy:tiny", "--num-kv-blocks", "128", "--max-loras", "2", "--max-num-seqs", "8",
        "--warmup", "0"]


def test_help_lists_the_commands():
    result = runner.invoke(app, ["bench", "--help"])
    assert result.exit_code == 0
    for command in ("serve", "sweep", "compare", "kernels", "lora"):
        assert command in result.output
    sweep_help = runner.invoke(app, ["bench", "sweep", "--help"]).output
    assert all(shape in sweep_help for shape in ("adapters", "rates", "batch"))
    rates_help = runner.invoke(app, ["bench", "sweep", "rates", "--help"], env={"COLUMNS": "200"}).output
    assert "--no-slo-aware" in rates_help


@pytest.fixture(scope="module")
def serve_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-serve")
    result = runner.invoke(app, ["bench", "serve", *TINY, "--adapters", "3", "--requests", "5", "--arrival",
                                 "all-at-once", "--input-len", "4:12", "--output-len", "2:5", "--baseline", "fcfs",
                                 "--latency-slo", "60", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_no_slo_aware_reaches_the_run(tmp_path):
    result = runner.invoke(app, ["bench", "serve", *TINY, "--adapters", "2", "--requests", "2", "--arrival",
                                 "all-at-once", "--input-len", "4:6", "--output-len", "2:3", "--latency-slo", "60",
                                 "--no-slo-aware", "--no-plots", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["params"]["slo_aware"] for r in results] == [False]
    assert [r["params"]["cuda_graphs"] for r in results] == ["off"]  # the CPU has none


def test_cuda_graphs_flag_sets_the_engine_config(monkeypatch, tmp_path):
    import inlaid.cli.bench as cli

    seen = []
    monkeypatch.setattr(cli, "run_all", lambda config, *a, **k: seen.append(config.engine) or [])
    monkeypatch.setattr(cli, "finish", lambda *a, **k: None)
    for mode, want in (("all", (False, True)), ("decode", (False, False)), ("off", (True, False))):
        result = runner.invoke(app, ["bench", "serve", *TINY, "--adapters", "1", "--requests", "1", "--cuda-graphs", mode,
                                     "--no-plots", "--out", str(tmp_path / mode)])
        assert result.exit_code == 0, result.output
        assert (seen[-1].enforce_eager, seen[-1].prefill_graphs) == want
    assert run_cli(["bench", "serve", *TINY, "--adapters", "1", "--cuda-graphs", "prefill"]) == 1


def test_serve_writes_table_json_csv_and_plots(serve_dir):
    names = {p.name for p in serve_dir.iterdir()}
    assert {"inlaid.json", "fcfs.json", "results.json", "summary.csv", "summary.md", "inlaid.requests.csv",
            "latency_cdf.png"} <= names
    results = json.loads((serve_dir / "results.json").read_text())
    assert [r["name"] for r in results] == ["inlaid", "fcfs"]
    assert results[0]["params"]["num_adapters"] == 3 and results[0]["summary"]["num_completed"] == 5
    assert [r["params"]["slo_aware"] for r in results] == [True, False]  # --slo-aware is the default; fcfs: never
    assert results[0]["predictor"]["mae_at_admission"] is not None
    table = (serve_dir / "summary.md").read_text()
    assert "predictor mae tokens" in table and "output tok per sec × fcfs" in table


def test_compare_overlays_result_files(serve_dir, tmp_path):
    result = runner.invoke(app, ["bench", "compare", str(serve_dir / "inlaid.json"), str(serve_dir / "results.json"),
                                 "--out", str(tmp_path), "--columns", "output_tok_per_sec,latency_p99_s"])
    assert result.exit_code == 0, result.output
    table = (tmp_path / "summary.md").read_text()
    assert "inlaid@bench-serve" in table.replace("0/inlaid", "")  # same run twice: told apart by file
    assert (tmp_path / "latency_cdf.png").is_file()


def test_sweeps_run_on_dummy_tiny(tmp_path):
    result = runner.invoke(app, ["bench", "sweep", "batch", *TINY, "--patterns", "distinct",
                                 "--batch-sizes", "1,3", "--input-len", "6", "--output-len", "3",
                                 "--out", str(tmp_path / "batch")])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "batch" / "results.json").read_text())
    assert [(r["params"]["pattern"], r["params"]["batch_size"]) for r in rows] == [("distinct", 1), ("distinct", 3)]
    assert rows[1]["steps"]["adapters_per_step"]["max"] == 3  # max_loras raised to the batch's adapters
    assert rows[1]["steps"]["prefill_latency_s"]["count"] == 1  # the whole batch prefilled in one step
    assert all(r["roofline"]["num_decode_steps"] >= 1 for r in rows)
    assert (tmp_path / "batch" / "latency_vs_batch.png").is_file()
    result = runner.invoke(app, ["bench", "sweep", "rates", *TINY, "--rates", "50,100", "--requests", "3",
                                 "--tasks", "none", "--adapters", "2", "--input-len", "4:8", "--output-len", "2:4",
                                 "--latency-slo", "60", "--policy", "fcfs", "--no-plots",
                                 "--out", str(tmp_path / "rates")])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "rates" / "results.json").read_text())
    assert [(r["name"], r["params"]["rate"]) for r in rows] == [("fcfs", 50.0), ("fcfs", 100.0)]
    assert all(r["summary"]["slo"]["attainment"] == 1.0 for r in rows)
    result = runner.invoke(app, ["bench", "sweep", "adapters", *TINY, "--counts", "1,3", "--requests", "3",
                                 "--arrival", "all-at-once", "--input-len", "4:8", "--output-len", "2:3",
                                 "--out", str(tmp_path / "adapters")])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "adapters" / "results.json").read_text())
    assert [r["params"]["num_adapters"] for r in rows] == [1, 3]
    assert "inlaid 3 adapters" in result.output
    assert (tmp_path / "adapters" / "throughput_vs_adapters.png").is_file()


def test_bad_input_is_one_line(capsys, tmp_path):
    assert run_cli(["bench", "serve", "--adapters", "2"]) == 1
    assert "give either --model" in capsys.readouterr().err
    assert run_cli(["bench", "serve", *TINY]) == 1  # no --pattern given: the message names the default
    assert "--adapters N is needed: --pattern powerlaw (the default) spreads" in capsys.readouterr().err
    assert run_cli(["bench", "serve", *TINY, "--pattern", "skewed"]) == 1
    assert "--adapters N is needed: --pattern skewed spreads" in capsys.readouterr().err
    assert run_cli(["bench", "serve", *TINY, "--adapters", "2", "--input-len", "5:x"]) == 1
    assert "--input-len '5:x'" in capsys.readouterr().err
    assert run_cli(["bench", "sweep", "rates", *TINY]) == 1
    assert "--ttft-slo" in capsys.readouterr().err
    assert run_cli(["bench", "compare", str(tmp_path / "missing.json")]) == 1
    assert "cannot read" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["kernels", "lora"])
def test_kernel_scripts_need_a_gpu_to_benchmark(command, monkeypatch, capsys):
    """Without CUDA the scripts would print a skip note and return: exit 0 as if they had run."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert run_cli(["bench", command, "--quick" if command == "kernels" else "--rank=16"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"inlaid bench {command} needs a CUDA GPU" in err[0], err
    assert run_cli(["bench", command, "-h"]) == 0  # the script's own help needs no GPU
    assert "usage:" in capsys.readouterr().out


def test_kernel_ranking_reads_files_without_a_gpu(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    sweep = tmp_path / "sweep.jsonl"
    sweep.write_text("")
    assert run_cli(["bench", "kernels", "--rank", sweep]) == 0
    assert "| M | points |" in capsys.readouterr().out


def test_interrupted_sweep_keeps_the_finished_runs(tmp_path, monkeypatch, capsys):
    """Ctrl-C (or SIGTERM, or a time limit) during the second run: the first run's files are on disk."""
    from inlaid.bench import runner as bench_runner

    real, calls = bench_runner.run_variant, []

    def second_run_interrupted(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(bench_runner, "run_variant", second_run_interrupted)
    out = tmp_path / "batch"
    code = run_cli(["bench", "sweep", "batch", *TINY, "--patterns", "identical", "--batch-sizes", "1,2",
                    "--input-len", "4", "--output-len", "2", "--no-plots", "--out", out])
    assert code == 130
    rows = json.loads((out / "results.json").read_text())
    assert [(r["name"], r["params"]["batch_size"]) for r in rows] == [("inlaid", 1)]
    assert (out / "summary.csv").is_file()
    assert f"the 1 finished runs are in {out}" in capsys.readouterr().err


def test_sweep_adapters_gives_each_point_enough_slots(monkeypatch):
    """With --max-loras below the adapters in use, each point gets min(adapters, max_num_seqs) slots."""
    from inlaid.bench import sweep as sweep_mod
    from inlaid.bench.runner import BenchConfig
    from inlaid.bench.workload import LengthProfile, LengthRange, WorkloadSpec
    from inlaid.engine.llm_engine import EngineConfig

    seen = []
    monkeypatch.setattr(sweep_mod, "run_all", lambda config, *a, **k: seen.append(
        (config.engine.max_loras, config.engine.max_tasks_per_step)) or [])
    config = BenchConfig(engine=EngineConfig(model="dummy:tiny", max_loras=8, max_num_seqs=64, max_tasks_per_step=10))
    spec = WorkloadSpec(4, pattern="powerlaw", num_adapters=1,
                        lengths=LengthProfile(LengthRange.fixed(4), LengthRange.fixed(2)))
    sweep_mod.sweep_adapters(config, spec, [1, 10, 1000])
    assert seen == [(8, 10), (10, 10), (64, 64)]


def test_bad_out_reference_and_baseline_fail_before_running(tmp_path, tiny_model, monkeypatch, capsys):
    """Flags that used to fail (or be ignored) only after the runs: checked before any engine starts."""
    import inlaid.cli.bench as cli
    from inlaid.bench import sweep as sweep_mod

    def must_not_run(*args, **kwargs):
        raise AssertionError("ran despite bad flags")

    monkeypatch.setattr(cli, "run_all", must_not_run)
    monkeypatch.setattr(sweep_mod, "run_all", must_not_run)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    serve = ["bench", "serve", *TINY, "--adapters", "2", "--requests", "2"]
    for args, message in (
            ([*serve, "--out", blocker], f"--out {blocker}: {blocker} is a file"),
            ([*serve, "--out", blocker / "x"], f"--out {blocker / 'x'}: {blocker} is a file"),
            (["bench", "sweep", "batch", *TINY, "--out", blocker], f"--out {blocker}: {blocker} is a file"),
            ([*serve, "--out", tmp_path / "out", "--reference", "nope"],
             "--reference 'nope' is not one of the runs: inlaid"),
            (["bench", "sweep", "adapters", *TINY, "--baseline", "fcfs", "--reference", "fp16"],
             "--reference 'fp16' is not one of the runs: inlaid, fcfs"),
            (["bench", "serve", "--model", tiny_model, "--adapters", "2", "--baseline", "hf-peft",
              "--out", tmp_path / "out"], "--baseline hf-peft on a real model needs its adapters")):
        assert run_cli(args) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_hf_peft_baseline_on_a_real_model_needs_adapters(tiny_model, tmp_path):
    from inlaid.bench.runner import BenchConfig
    from inlaid.engine.llm_engine import EngineConfig
    from inlaid.errors import ConfigError

    for name in ("hf-peft", "hf-peft-mixed"):
        with pytest.raises(ConfigError, match=f"--baseline {name} on a real model needs its adapters"):
            BenchConfig(engine=EngineConfig(model=str(tiny_model)), baselines=(name,))
    BenchConfig(engine=EngineConfig(model=str(tiny_model), adapters={"sql": str(tmp_path)}), baselines=("hf-peft",))
    BenchConfig(engine=EngineConfig(model="dummy:tiny"), baselines=("hf-peft",))  # dummy adapters are built


def test_hf_peft_baseline_on_a_checkpoint_needs_the_fp16_base(tiny_model, tiny_tasks, tmp_path):
    """HF transformers cannot load an inlaid checkpoint: refused before the main run, not after it."""
    from inlaid.bench.runner import BenchConfig
    from inlaid.config import QuantConfig, TaskSpec
    from inlaid.engine.llm_engine import EngineConfig
    from inlaid.errors import ConfigError
    from inlaid.quant import pipeline

    adapter, data = tiny_tasks["sql"]
    ckpt = tmp_path / "q"
    pipeline.quantize(str(tiny_model), ckpt, [TaskSpec("sql", adapter, data)], QuantConfig(group_size=32, method="rtn"))
    engine = EngineConfig(model=str(ckpt), adapters={"other": str(adapter)})
    with pytest.raises(ConfigError, match="cannot load the inlaid checkpoint .* --fp16-model"):
        BenchConfig(engine=engine, baselines=("hf-peft",))
    BenchConfig(engine=engine, baselines=("hf-peft",), fp16_model=str(tiny_model))


def test_compare_checks_out_and_reference_first(serve_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert run_cli(["bench", "compare", serve_dir / "results.json", "--out", blocker]) == 1
    assert f"--out {blocker}: {blocker} is a file" in capsys.readouterr().err
    assert run_cli(["bench", "compare", serve_dir / "results.json", "--reference", "nope"]) == 1
    assert "--reference 'nope' is not one of the runs: inlaid, fcfs" in capsys.readouterr().err


def test_all_requests_failed_is_an_error_after_the_results_are_written(tmp_path, capsys):
    out = tmp_path / "out"
    code = run_cli(["bench", "serve", *TINY, "--adapters", "2", "--requests", "2", "--arrival", "all-at-once",
                    "--input-len", "100000", "--output-len", "2", "--no-plots", "--out", out])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: every request of 'inlaid' failed (first error: ") and "context length" in err
    rows = json.loads((out / "results.json").read_text())
    assert rows[0]["summary"]["num_failed"] == 2 and (out / "summary.md").is_file()


def test_docs_name_an_extra_that_has_the_plot_and_http_deps():
    import re
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parents[2]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    doc = (root / "docs" / "bench.md").read_text()
    sentence = doc[doc.index("Results need `matplotlib`"):].split("\n\n")[0]
    named = re.findall(r"the `(\w+)` extra has both", sentence)
    assert named, sentence
    for extra in named:
        deps = " ".join(extras[extra])
        assert "matplotlib" in deps and "httpx" in deps
