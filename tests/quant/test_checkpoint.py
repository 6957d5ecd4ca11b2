"""A checkpoint whose config.json no longer matches its tensors (a hand-edited ``bits`` or
``group_size``): every loader refuses it with one CheckpointError line naming the file and the
mismatch, never a shape error from deep inside unpacking."""

import json
import re
import shutil

import pytest

from inlaid.config import QuantConfig, TaskSpec
from inlaid.errors import CheckpointError
from inlaid.quant import pipeline
from inlaid.quant.checkpoint import load_dense_model, read_checkpoint

from ..conftest import run_cli

# the first packed layer in the file is layer 0's down_proj: 128 inputs, 64 outputs, 4 groups of 32
EDITS = {
    "bits-8": ({"bits": 8}, r"qweight is \[16, 64\] \(4-bit codes\), but 8-bit codes in groups of 32 take \[32, 64\]"),
    "bits-2": ({"bits": 2}, r"qweight is \[16, 64\] \(4-bit codes\), but 2-bit codes"),
    "bits-null": ({"bits": None}, r"config.json: quantization_config.bits is None; expected one of 2, 3, 4, 8"),
    "bits-string": ({"bits": "4"}, r"quantization_config.bits is '4'"),
    "group-size-64": ({"group_size": 64}, r"scales is \[4, 64\], but 4-bit codes in groups of 64 take \[2, 64\]"),
    "group-size-per-row": ({"group_size": -1}, r"scales is \[4, 64\], but 4-bit codes in one group take \[1, 64\]"),
    "settings-only": ({"inlaid.settings.bits": 8}, r"quantization_config.bits is 4 but "
                                                  r"quantization_config.inlaid.settings.bits is 8"),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_model, tiny_tasks):
    out = tmp_path_factory.mktemp("ckpt") / "q"
    adapter, data = tiny_tasks["sql"]
    pipeline.quantize(str(tiny_model), out, [TaskSpec("sql", adapter, data)],
                      QuantConfig(group_size=32, method="rtn"))
    return out


def edited(checkpoint, tmp_path, changes: dict):
    out = tmp_path / "edited"
    shutil.copytree(checkpoint, out)
    config = json.loads((out / "config.json").read_text())
    for key, value in changes.items():
        target = config["quantization_config"]
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_the_unedited_checkpoint_reads(checkpoint):
    assert read_checkpoint(checkpoint).bits == 4
    load_dense_model(checkpoint)


@pytest.mark.parametrize("case", list(EDITS))
def test_library_loaders_name_the_mismatch(checkpoint, tmp_path, tiny_tasks, case):
    changes, needle = EDITS[case]
    out = edited(checkpoint, tmp_path, changes)
    for load in (lambda: read_checkpoint(out).dense_state_dict(), lambda: load_dense_model(out),
                 lambda: pipeline.add_task(out, [TaskSpec("math", *tiny_tasks["math"])])):
        with pytest.raises(CheckpointError, match=needle) as info:
            load()
        assert str(out) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("case", ["bits-8", "bits-null", "group-size-64"])
def test_commands_print_one_line_and_exit_1(checkpoint, tmp_path, tiny_tasks, capsys, monkeypatch, case):
    changes, needle = EDITS[case]
    out = edited(checkpoint, tmp_path, changes)
    monkeypatch.chdir(tmp_path)  # eval would write results/ here
    monkeypatch.setattr("inlaid.server.launch.serve", lambda *a: pytest.fail("serve started"))
    adapter, data = tiny_tasks["math"]
    for args in (["serve", out, "--device", "cpu"], ["eval", out, "--perplexity", data, "--device", "cpu"],
                 ["add-task", out, "-t", f"math={adapter}:{data}"]):
        assert run_cli(args) == 1, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and str(out) in err[0], (args, err)
        assert re.search(needle, err[0]), (args, err)


@pytest.mark.parametrize("case", list(EDITS))
def test_the_engine_refuses_the_mismatch(checkpoint, tmp_path, case):
    """The offline engine (LLM / LLMEngine) reads the weights itself; it checks the checkpoint first."""
    from inlaid.engine.llm_engine import LLMEngine

    changes, needle = EDITS[case]
    out = edited(checkpoint, tmp_path, changes)
    with pytest.raises(CheckpointError, match=needle):
        LLMEngine(model=str(out), num_kv_blocks=16, device="cpu")


def test_overwrite_still_replaces_a_mismatched_checkpoint(checkpoint, tmp_path, tiny_model, tiny_tasks):
    out = edited(checkpoint, tmp_path, {"bits": 8})
    pipeline.quantize(str(tiny_model), out, [TaskSpec("sql", *tiny_tasks["sql"])],
                      QuantConfig(group_size=32, method="rtn"), overwrite=True)
    assert read_checkpoint(out).bits == 4
