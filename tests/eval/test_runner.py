"""The eval runner on a tiny model + adapter + a 5-item task, and the ``inlaid eval`` CLI."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from inlaid.cli.main import app
from inlaid.config import QuantConfig, TaskSpec
from inlaid.errors import ConfigError, ModelLoadError
from inlaid.eval import report
from inlaid.eval.runner import EvalConfig, EvalReporter, HFBackend, Variant, check_model_source, run_eval, \
    unique_variants
from inlaid.eval.tasks import Example, Task

from ..conftest import load_script, run_cli, save_adapter

ROWS = [("What is 2 plus 3?", "5"), ("What is 7 minus 4?", "3"), ("What is 6 times 2?", "12"),
        ("Say hello.", "hello"), ("Repeat: abc", "abc")]
ECHO = Task("echo", "a synthetic 5-item task", ("exact_match", "chrf"), 6,
            make=lambda rng: Example("unused", "unused"))


def write_rows(path, rows=ROWS):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in rows))
    return path


@pytest.fixture(scope="module")
def suite(tmp_path_factory, tiny_model):
    """root with adapters/<task>/ and data/<task>/{test,calib}.jsonl for 'echo' and 'sentiment' (a real
    task with 4 new tokens: short runs)."""
    root = tmp_path_factory.mktemp("suite")
    for seed, name in enumerate(("echo", "sentiment")):
        save_adapter(tiny_model, root / "adapters" / name, seed=20 + seed, rank=4)
        write_rows(root / "data" / name / "test.jsonl")
        write_rows(root / "data" / name / "calib.jsonl", ROWS * 2)
    return root


@pytest.fixture(scope="module")
def rtn_checkpoint(tmp_path_factory, tiny_model, suite):
    from inlaid.quant.pipeline import quantize

    out = tmp_path_factory.mktemp("ckpt") / "w4"
    spec = TaskSpec("echo", suite / "adapters" / "echo", suite / "data" / "echo" / "test.jsonl")
    quantize(str(tiny_model), out, [spec], QuantConfig(bits=4, group_size=32, method="rtn"), device="cpu")
    return out


class Recorder(EvalReporter):
    def __init__(self):
        self.events = []

    def skip(self, task, reason):
        self.events.append(("skip", task))

    def start(self, variant, task, total):
        self.events.append(("start", variant, task, total))

    def done(self, variant, task, scores, seconds):
        self.events.append(("done", variant, task))


def test_variants_parse_and_config_checks(tiny_model):
    assert Variant.parse("fp16=default") == Variant("fp16", "default")
    assert Variant.parse("out/ckpt-w4/") == Variant("ckpt-w4", "out/ckpt-w4/")
    assert [v.name for v in unique_variants(["a=x", "a=y", "default"])] == ["a", "a-2", "default"]
    with pytest.raises(ConfigError, match="--reference"):
        EvalConfig([Variant("a", "x")], [ECHO], reference="b")
    with pytest.raises(ConfigError, match="--limit"):
        EvalConfig([Variant("a", "x")], [ECHO], limit=0)
    with pytest.raises(ConfigError, match="distinct"):
        EvalConfig([Variant("a", "x"), Variant("a", "y")], [ECHO])
    with pytest.raises(ModelLoadError, match="model not found"):
        check_model_source("/no/such/model")
    check_model_source(str(tiny_model))


def test_runner_writes_json_markdown_png(tmp_path, tiny_model, suite, rtn_checkpoint):
    missing = Task("missing", "no adapter for it", ("exact_match",), 4, make=ECHO.make)
    config = EvalConfig([Variant("fp", str(tiny_model)), Variant("w4", str(rtn_checkpoint))], [ECHO, missing],
                        adapters_dir=suite / "adapters", data_dir=suite / "data", limit=4,
                        engine_options={"num_kv_blocks": 64, "block_size": 8})
    recorder = Recorder()
    result = run_eval(config, recorder)
    assert result.skipped.keys() == {"missing"} and "no adapter at" in result.skipped["missing"]
    assert recorder.events == [("skip", "missing"), ("start", "fp", "echo", 4), ("done", "fp", "echo"),
                               ("start", "w4", "echo", 4), ("done", "w4", "echo")]
    echo = result.tasks["echo"]
    assert echo.num_examples == 4 and echo.references == ["5", "3", "12", "hello"]
    for variant in ("fp", "w4"):
        assert set(echo.scores[variant]) == {"exact_match", "chrf"}
        assert len(echo.predictions[variant]) == 4
        assert echo.scores[variant] == ECHO.score(echo.predictions[variant],
                                                  [Example(p, r) for p, r in ROWS[:4]])
    paths = report.write_reports(result, tmp_path, include_predictions=True)
    data = json.loads(paths["json"].read_text())
    assert [v["name"] for v in data["variants"]] == ["fp", "w4"]
    assert data["tasks"]["echo"]["examples"][0]["predictions"]["w4"] == echo.predictions["w4"][0]
    assert paths["markdown"].read_text().startswith("| task (metric) | fp (ref) | w4 |")
    assert paths["png"].stat().st_size > 1000


def test_hf_backend_agrees_with_the_engine(tiny_model, suite):
    adapters = {"echo": suite / "adapters" / "echo"}
    config = EvalConfig([Variant("fp", str(tiny_model))], [ECHO], adapters_dir=suite / "adapters",
                        data_dir=suite / "data", engine_options={"num_kv_blocks": 64, "block_size": 8})
    engine = run_eval(config).tasks["echo"].predictions["fp"]
    hf = HFBackend(str(tiny_model), adapters, "cpu")
    prompts = [p for p, _ in ROWS]
    # a random byte-level model emits invalid UTF-8: HF decodes it to U+FFFD, the engine's
    # incremental detokenizer holds incomplete characters back
    assert [t.replace("\ufffd", "") for t in hf.generate(prompts, "echo", ECHO.max_new_tokens)] == engine
    assert any(engine)
    assert hf.generate(prompts[:1], None, 4)[0] != ""  # base model through disable_adapter
    fake = suite / "fake-ckpt"
    fake.mkdir(exist_ok=True)
    (fake / "config.json").write_text(json.dumps({"quantization_config": {"inlaid": {}}}))
    with pytest.raises(ConfigError, match="fp16 models only"):
        HFBackend(str(fake), {}, "cpu")


# --- the CLI -------------------------------------------------------------------------------------
def test_cli_help_and_one_line_errors(capsys, tiny_model):
    result = CliRunner().invoke(app, ["eval", "--help"])
    assert result.exit_code == 0 and "--export-lm-eval" in result.output and "--perplexity" in result.output
    assert run_cli(["eval", tiny_model, "--tasks", "no_such_task"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown task 'no_such_task'") and len(err.splitlines()) == 1
    assert run_cli(["eval", "/no/such/model", "--tasks", "arithmetic"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: model not found: /no/such/model"
    assert run_cli(["eval", "--tasks", "arithmetic"]) == 1
    assert "give at least one MODEL" in capsys.readouterr().err


def test_cli_options_reach_the_runner(monkeypatch, tmp_path):
    seen = {}

    def fake_run_eval(config, reporter=None):
        seen["config"] = config
        raise SystemExit(0)

    monkeypatch.setattr("inlaid.eval.runner.run_eval", fake_run_eval)
    result = CliRunner().invoke(app, ["eval", "fp16=default", "out/w4", "--tasks", "arithmetic,sentiment",
                                      "--limit", "7", "--adapters", str(tmp_path / "a"), "--data",
                                      str(tmp_path / "d"), "--reference", "w4", "--device", "cpu", "--seed", "3",
                                      "--backend", "hf", "--max-num-seqs", "5"])
    assert result.exit_code == 0, result.output
    cfg = seen["config"]
    assert cfg.variants == [Variant("fp16", "default"), Variant("w4", "out/w4")]
    assert [t.name for t in cfg.tasks] == ["arithmetic", "sentiment"]
    assert (cfg.limit, cfg.adapters_dir, cfg.data_dir, cfg.reference, cfg.device, cfg.seed, cfg.backend) == \
        (7, tmp_path / "a", tmp_path / "d", "w4", "cpu", 3, "hf")
    assert cfg.engine_options == {"max_num_seqs": 5}


def test_cli_end_to_end_and_perplexity(tmp_path, tiny_model, suite, capsys):
    out = tmp_path / "results"
    code = run_cli(["eval", f"fp={tiny_model}", f"again={tiny_model}", "--tasks", "sentiment,python_expr",
                "--adapters", suite / "adapters", "--data", suite / "data", "--limit", "3", "--out", out,
                "--save-predictions"])
    assert code == 0
    captured = capsys.readouterr()
    assert "skipping python_expr: no adapter at" in captured.err
    assert "average relative drop" in captured.err  # the table (console on stderr)
    data = json.loads((out / "eval.json").read_text())
    scores = data["tasks"]["sentiment"]["scores"]
    assert scores["fp"] == scores["again"]  # same model, same greedy answers
    assert data["summary"]["average_drop"]["again"] in (0.0, None)
    assert len(data["tasks"]["sentiment"]["examples"]) == 3
    assert {p.name for p in out.iterdir()} == {"eval.json", "eval.md", "eval.png"}
    assert "sentiment (accuracy)" in (out / "eval.md").read_text()

    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 3)
    code = run_cli(["eval", "--perplexity", text, tiny_model, "--with-adapter", "sentiment",
                "--adapters", suite / "adapters", "--window", "32", "--out", out])
    assert code == 0
    ppl = json.loads((out / "perplexity.json").read_text())["results"][0]
    assert ppl["num_tokens"] == len(text.read_text().encode()) and ppl["adapter"] == "sentiment"
    assert 1.0 < ppl["perplexity"] < 1000


# --- scripts/accuracy_study.py in its tiny mode ----------------------------------------------------
def test_accuracy_study_tiny_mode_keeps_finished_rows(tmp_path, tiny_model, suite, monkeypatch):
    study = load_script("accuracy_study")
    argv = ["--base", str(tiny_model), "--adapters", str(suite / "adapters"), "--data", str(suite / "data"),
            "--tasks", "sentiment,arithmetic", "--limit", "4", "--bits", "4", "--methods", "rtn,mlgptq-mean",
            "--seeds", "0", "--samples", "4", "--seq-len", "64", "--device", "cpu",
            "--out", str(tmp_path / "res"), "--work", str(tmp_path / "work")]
    real = study.quantize

    def crash_on_mean(args, tasks, bits, method, seed, out_dir):
        if method == "mlgptq-mean":
            raise RuntimeError("simulated crash")
        return real(args, tasks, bits, method, seed, out_dir)

    monkeypatch.setattr(study, "quantize", crash_on_mean)
    with pytest.raises(RuntimeError, match="simulated crash"):
        study.main(argv)
    state = json.loads((tmp_path / "res" / "accuracy.json").read_text())
    assert state["settings"]["tasks"] == ["sentiment"]  # arithmetic has no adapter here: skipped
    assert [(r["bits"], r["method"], r["seed"]) for r in state["rows"]] == [(4, "rtn", 0)]

    monkeypatch.setattr(study, "quantize", real)
    assert study.main(argv) == 0
    state = json.loads((tmp_path / "res" / "accuracy.json").read_text())
    assert [r["method"] for r in state["rows"]] == ["rtn", "mlgptq-mean"]  # rtn kept, not rerun
    row = state["rows"][1]
    assert row["primary"]["sentiment"] == row["scores"]["sentiment"]["accuracy"]
    assert row["quant_seconds"] > 0 and set(state["fp16"]["primary"]) == {"sentiment"}
    md = (tmp_path / "res" / "accuracy.md").read_text()
    assert "| mlgptq-mean | 0 |" in md and "## 4-bit, per task" in md and "group size 64" in md
    assert not (tmp_path / "work" / "w4-rtn-s0").exists()  # checkpoints removed after scoring


# --- failing early on bad flags --------------------------------------------------------------------
def test_cli_bad_output_paths_fail_before_any_work(tmp_path, tiny_model, monkeypatch, capsys):
    """A file in the way of --out / --export-lm-eval: one line and exit 1 before any model loads,
    not a traceback after the run."""
    def must_not_run(*args, **kwargs):
        raise AssertionError("ran despite a bad output path")

    monkeypatch.setattr("inlaid.eval.runner.run_eval", must_not_run)
    monkeypatch.setattr("inlaid.eval.perplexity.run_perplexity", must_not_run)
    monkeypatch.setattr("inlaid.eval.lm_eval_export.export_lm_eval", must_not_run)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    text = tmp_path / "text.txt"
    text.write_text("some text to score")
    for args, flag in (([tiny_model, "--tasks", "arithmetic", "--out", blocker], "--out"),
                       ([tiny_model, "--tasks", "arithmetic", "--out", blocker / "x"], "--out"),
                       (["--perplexity", text, tiny_model, "--out", blocker / "x" / "y"], "--out"),
                       (["--export-lm-eval", blocker / "x", "--tasks", "arithmetic"], "--export-lm-eval")):
        assert run_cli(["eval", *args]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {flag} ") and f"{blocker} is a file" in err, err
        assert len(err.splitlines()) == 1


def test_stride_zero_is_an_error_not_the_default(tmp_path, tiny_model, capsys):
    from inlaid.eval.perplexity import check_window

    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog.")
    for flags, message in ((["--stride", "0"], "--stride 0"), (["--stride", "-3"], "--stride -3"),
                           (["--window", "0"], "--window 0"), (["--window", "8", "--stride", "8"], "--stride 8")):
        assert run_cli(["eval", "--perplexity", text, tiny_model, *flags, "--out", tmp_path / "out"]) == 1
        assert capsys.readouterr().err.strip().startswith(f"error: {message}:")
    assert not (tmp_path / "out").exists()
    check_window(None, None)
    check_window(8, 7)


def test_missing_adapter_reasons_name_the_path_and_what_is_missing(tmp_path):
    from inlaid.eval.runner import find_adapters

    (tmp_path / "echo").mkdir()  # a directory, but not a PEFT adapter
    _, skipped = find_adapters([ECHO, Task("other", "", ("exact_match",), 4, make=ECHO.make)], tmp_path)
    assert skipped["echo"] == f"no adapter at {tmp_path / 'echo'} (the directory has no adapter_config.json)"
    assert skipped["other"].startswith(f"no adapter at {tmp_path / 'other'} (no such directory;")


def test_default_dirs_fall_back_to_the_source_checkout(tmp_path, monkeypatch):
    """Outside the repository root the demo adapters and task data are still found (examples/ is not
    packaged); a working directory that has its own examples/ wins, and explicit paths stay as given."""
    from inlaid.eval import runner as eval_runner

    checkout = Path(eval_runner.__file__).resolve().parents[2]
    if not (checkout / "examples" / "adapters").is_dir():
        pytest.skip("not a source checkout with examples/")
    monkeypatch.chdir(tmp_path)
    config = EvalConfig([Variant("a", "x")], [ECHO])
    assert config.adapters_dir == checkout / "examples" / "adapters"
    assert config.data_dir == checkout / "examples" / "tasks"
    assert EvalConfig([Variant("a", "x")], [ECHO], adapters_dir=Path("mine")).adapters_dir == Path("mine")
    (tmp_path / "examples" / "adapters").mkdir(parents=True)
    assert EvalConfig([Variant("a", "x")], [ECHO]).adapters_dir == Path("examples/adapters")

    seen = {}

    def fake_run_eval(config, reporter=None):
        seen["config"] = config
        raise SystemExit(0)

    monkeypatch.setattr("inlaid.eval.runner.run_eval", fake_run_eval)
    result = CliRunner().invoke(app, ["eval", "default", "--tasks", "arithmetic"])
    assert result.exit_code == 0, result.output
    assert (seen["config"].adapters_dir, seen["config"].data_dir) == \
        (Path("examples/adapters"), checkout / "examples" / "tasks")
