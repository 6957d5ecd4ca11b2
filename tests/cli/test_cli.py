"""CLI end to end with CliRunner: options reach the library, bad input is one line + exit 1."""

import json

import pytest
from typer.testing import CliRunner

from inlaid import __version__
from inlaid.cli.main import app
from ..conftest import run_cli

runner = CliRunner()


def task_arg(tiny_tasks, name):
    adapter, data = tiny_tasks[name]
    return f"{name}={adapter}:{data}"


def test_version():
    assert runner.invoke(app, ["--version"]).output.strip() == f"inlaid {__version__}"


def test_options_reach_library(monkeypatch, tmp_path, tiny_tasks):
    seen = {}

    def fake_quantize(base, out, specs, cfg, **kwargs):
        seen.update(base=base, out=out, specs=specs, cfg=cfg, **kwargs)
        raise SystemExit(0)

    monkeypatch.setattr("inlaid.quant.pipeline.quantize", fake_quantize)
    runner.invoke(app, ["quantize", "default", str(tmp_path / "o"), "--task", task_arg(tiny_tasks, "sql"),
                        "--bits", "3", "--group-size", "64", "--asym", "--desc-act", "--aggregation", "mean",
                        "--propagation", "quantized", "--samples", "7", "--seq-len", "99", "--damp", "0.05",
                        "--without-adapters", "--device", "cpu", "--overwrite"])
    cfg = seen["cfg"]
    assert (cfg.bits, cfg.group_size, cfg.sym, cfg.desc_act, cfg.aggregation, cfg.propagation,
            cfg.samples, cfg.seq_len, cfg.damp_percent, cfg.with_adapters) == \
        (3, 64, False, True, "mean", "quantized", 7, 99, 0.05, False)
    assert seen["base"] == "default" and seen["device"] == "cpu" and seen["overwrite"] is True
    assert [s.name for s in seen["specs"]] == ["sql"]


@pytest.mark.parametrize("extra,note", [
    (["--method", "rtn", "--samples", "7", "--aggregation", "max", "--without-adapters"],
     "--samples, --aggregation, --without-adapters have no effect"),
    (["--method", "rtn", "--seq-len", "64"], "--seq-len has no effect"),
    (["--method", "rtn", "--bits", "3", "--asym"], None),  # rtn reads these
    (["--samples", "7"], None),
])
def test_rtn_names_the_calibration_flags_it_ignores(monkeypatch, tmp_path, tiny_tasks, capsys, extra, note):
    def fake_quantize(*args, **kwargs):
        raise SystemExit(0)

    monkeypatch.setattr("inlaid.quant.pipeline.quantize", fake_quantize)
    assert run_cli(["quantize", "default", tmp_path / "o", "-t", task_arg(tiny_tasks, "sql"), *extra]) == 0
    err = capsys.readouterr().err
    if note is None:
        assert "note:" not in err
    else:
        assert err.strip() == f"note: --method rtn rounds each weight on its own, without calibration data: {note}"


def test_quantize_and_add_task_end_to_end(tmp_path, tiny_model, tiny_tasks, capsys):
    out = tmp_path / "ckpt"
    common = ["--group-size", "32", "--samples", "4", "--seq-len", "32"]
    assert run_cli(["quantize", tiny_model, out, "-t", task_arg(tiny_tasks, "sql"),
                "-t", task_arg(tiny_tasks, "math"), *common]) == 0
    err = capsys.readouterr().err
    assert "reconstruction error" in err and "wrote" in err
    assert run_cli(["add-task", out, "-t", task_arg(tiny_tasks, "chat")]) == 0
    tasks = json.loads((out / "tasks.json").read_text())["tasks"]
    assert [t["name"] for t in tasks] == ["sql", "math", "chat"]


@pytest.mark.parametrize("extra,message", [
    (["--bits", "5"], "--bits 5"),
    (["--group-size", "48"], "--group-size 48"),
    (["--aggregation", "median"], "--aggregation"),
    (["--group-size", "128"], "does not divide"),
])
def test_bad_options(tmp_path, tiny_model, tiny_tasks, capsys, extra, message):
    out = tmp_path / "o"
    assert run_cli(["quantize", tiny_model, out, "-t", task_arg(tiny_tasks, "sql"), *extra]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_bad_paths_and_tasks(tmp_path, tiny_model, tiny_tasks, capsys):
    out = tmp_path / "o"
    sql = task_arg(tiny_tasks, "sql")
    cases = [
        [tmp_path / "missing-model", out, "-t", sql],
        [tiny_model, out, "-t", sql, "-t", sql],
        [tiny_model, out, "-t", "broken-spec"],
        [tiny_model, out, "-t", f"x={tmp_path}/none:{tiny_tasks['sql'][1]}"],
        [tiny_model, out, "-t", f"x={tiny_tasks['sql'][0]}:{tmp_path}/none.jsonl"],
        [tiny_model, out, "-t", "a.b=" + sql.partition("=")[2]],  # names become directory names
        [tiny_model, out, "-t", "caf\u00e9=" + sql.partition("=")[2]],
    ]
    for args in cases:
        assert run_cli(["quantize", *args]) == 1, args
        err = capsys.readouterr().err
        assert err.startswith("error:") and "Traceback" not in err
        assert not out.exists()
    assert run_cli(["add-task", tmp_path, "-t", sql]) == 1
    assert "not an inlaid checkpoint" in capsys.readouterr().err


def test_ctrl_c_exits_130_and_writes_nothing(tmp_path, tiny_model, tiny_tasks, monkeypatch, capsys):
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("inlaid.quant.calibrate.gptq_quantize", interrupt)
    out = tmp_path / "o"
    assert run_cli(["quantize", tiny_model, out, "-t", task_arg(tiny_tasks, "sql"), "--group-size", "32"]) == 130
    assert "nothing was written" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [] or not any(p.name.startswith((".o", "o")) for p in tmp_path.iterdir())
