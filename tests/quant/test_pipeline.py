"""End-to-end quantize / add-task on a tiny random Llama with PEFT adapters (CPU, fp32)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from inlaid.config import QuantConfig, TaskSpec
from inlaid.errors import CheckpointError, ConfigError, DataError
from inlaid.model.arch import PROJECTIONS, module_path
from inlaid.quant import pipeline
from inlaid.quant.checkpoint import load_dense_model, read_checkpoint
from inlaid.quant.gptq import gptq_quantize

from ..conftest import save_tiny_model

CFG = dict(group_size=32, samples=6, seq_len=48)


def specs(tiny_tasks, names):
    return [TaskSpec(n, *tiny_tasks[n]) for n in names]


def test_checkpoint_layout_and_manifest(tmp_path, tiny_model, tiny_tasks):
    out = tmp_path / "q"
    report = pipeline.quantize(str(tiny_model), out, specs(tiny_tasks, ["sql", "math"]), QuantConfig(**CFG))
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "gptq" and cfg["bits"] == 4 and cfg["checkpoint_format"] == "gptq"
    assert cfg["inlaid"]["tasks"] == ["sql", "math"] and cfg["inlaid"]["aggregation"] == "mean"
    assert json.loads((out / "quantize_config.json").read_text())["group_size"] == 32
    tensors = load_file(str(out / "model.safetensors"))
    q = "model.layers.0.self_attn.q_proj"
    assert tensors[f"{q}.qweight"].shape == (64 * 4 // 32, 64)
    assert tensors[f"{q}.qzeros"].shape == (2, 64 * 4 // 32)
    assert tensors[f"{q}.scales"].dtype == torch.float16 and tensors[f"{q}.g_idx"].dtype == torch.int32
    assert "lm_head.weight" not in tensors  # tied embeddings
    assert tensors["model.embed_tokens.weight"].dtype == torch.float16
    manifest = json.loads((out / "tasks.json").read_text())["tasks"]
    assert [t["name"] for t in manifest] == ["sql", "math"]
    assert all(len(t["adapter_sha256"]) == 64 and t["tokens"] > 0 for t in manifest)
    assert (out / "adapters" / "sql" / "adapter_model.safetensors").is_file()
    assert sorted(report.errors) == [0, 1] and set(report.errors[0]) == {"sql", "math"}
    assert not list(tmp_path.glob(".q.inlaid-tmp-*"))


def test_reload_equals_solver_output(tmp_path, tiny_model, tiny_tasks):
    """The saved Hessian state re-solved from the fp weights gives exactly the stored weights."""
    out = tmp_path / "q"
    cfg = QuantConfig(**CFG, aggregation="mean", desc_act=True)
    pipeline.quantize(str(tiny_model), out, specs(tiny_tasks, ["sql", "chat"]), cfg)
    ckpt = read_checkpoint(out)
    dense = ckpt.dense_state_dict()
    fp = load_file(str(tiny_model / "model.safetensors"))
    groups = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o", "gate_proj": "gateup",
              "up_proj": "gateup", "down_proj": "down"}
    for layer in range(2):
        states = ckpt.load_state(layer)
        for proj in PROJECTIONS:
            name = f"{module_path(layer, proj)}.weight"
            solved = gptq_quantize(fp[name], states[groups[proj]].hessian(), bits=4, group_size=32,
                                   desc_act=True)
            assert torch.equal(dense[name], solved.weight), name


def test_add_task_equals_full_run(tmp_path, tiny_model, tiny_tasks):
    cfg = QuantConfig(**CFG, aggregation="max")
    full, inc = tmp_path / "full", tmp_path / "inc"
    pipeline.quantize(str(tiny_model), full, specs(tiny_tasks, ["sql", "math", "chat"]), cfg)
    pipeline.quantize(str(tiny_model), inc, specs(tiny_tasks, ["sql", "math"]), cfg)
    before = load_file(str(inc / "model.safetensors"))
    pipeline.add_task(inc, specs(tiny_tasks, ["chat"]))
    a, b = load_file(str(full / "model.safetensors")), load_file(str(inc / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert any(not torch.equal(before[k], b[k]) for k in b if k.endswith(".qweight"))
    for layer in range(2):
        sa = load_file(str(full / "state" / f"layer_{layer:03d}.safetensors"))
        sb = load_file(str(inc / "state" / f"layer_{layer:03d}.safetensors"))
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [t["name"] for t in read_checkpoint(inc).tasks] == ["sql", "math", "chat"]
    assert (inc / "adapters" / "chat").is_dir() and (inc / "adapters" / "sql").is_dir()


@pytest.mark.parametrize("propagation", ["fp", "quantized"])
def test_quantized_model_with_adapters_close_to_fp(tmp_path, tiny_model, tiny_tasks, propagation):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "q"
    names = ["sql", "math"]
    pipeline.quantize(str(tiny_model), out, specs(tiny_tasks, names),
                      QuantConfig(**CFG, bits=8, propagation=propagation))
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    for name in names:
        fp = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), tiny_tasks[name][0])
        q = PeftModel.from_pretrained(load_dense_model(out), out / "adapters" / name)
        with torch.no_grad():
            ref, got = fp(ids).logits, q(ids).logits
        assert torch.isfinite(got).all()
        rel = ((got - ref).norm() / ref.norm()).item()
        # 8-bit g32, random 2-layer model: measured ~0.02. (At 4 bits even RTN moves this random
        # model's logits by ~0.3: tiny random models are far more fragile than trained ones.)
        assert rel < 0.05, (name, rel)


def test_rtn_baseline_and_other_families(tmp_path, tiny_tasks):
    data = tiny_tasks["sql"][1]
    for family in ("qwen2", "mistral"):
        base = save_tiny_model(tmp_path / family, model_type=family, tie_word_embeddings=False)
        out = tmp_path / f"q-{family}"
        pipeline.quantize(str(base), out, [TaskSpec("t", None, data)], QuantConfig(**CFG, bits=3))
        tensors = load_file(str(out / "model.safetensors"))
        assert "lm_head.weight" in tensors
        assert ("model.layers.0.self_attn.q_proj.bias" in tensors) == (family == "qwen2")
        assert torch.isfinite(load_dense_model(out)(torch.tensor([[1, 2, 3]])).logits).all()
    rtn = tmp_path / "rtn"
    pipeline.quantize(str(base), rtn, [TaskSpec("t", None, data)], QuantConfig(**CFG, method="rtn", bits=2))
    assert read_checkpoint(rtn).qconfig["inlaid"]["method"] == "rtn"


def test_bad_inputs_write_nothing(tmp_path, tiny_model, tiny_tasks):
    adapter, data = tiny_tasks["sql"]
    out = tmp_path / "q"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    short = tmp_path / "short.jsonl"
    short.write_text('{"text": "hi"}\n')
    cases = [
        ([TaskSpec("a", adapter, data), TaskSpec("a", adapter, data)], QuantConfig(**CFG), ConfigError),
        ([TaskSpec("a", tmp_path / "nope", data)], QuantConfig(**CFG), ConfigError),
        ([TaskSpec("a", adapter, empty)], QuantConfig(**CFG), DataError),
        ([TaskSpec("a", adapter, short)], QuantConfig(**CFG), DataError),
        ([TaskSpec("a", adapter, data)], QuantConfig(bits=4, group_size=128), ConfigError),  # 64 % 128
    ]
    for task_specs, cfg, err in cases:
        with pytest.raises(err):
            pipeline.quantize(str(tiny_model), out, task_specs, cfg)
        assert not out.exists() and not list(tmp_path.glob(".q.inlaid-tmp-*"))


def test_add_task_refuses_mismatch(tmp_path, tiny_model, tiny_tasks):
    out = tmp_path / "q"
    pipeline.quantize(str(tiny_model), out, specs(tiny_tasks, ["sql"]), QuantConfig(**CFG))
    with pytest.raises(CheckpointError, match="bits"):
        pipeline.add_task(out, specs(tiny_tasks, ["math"]), overrides={"bits": 3})
    with pytest.raises(ConfigError, match="duplicate"):
        pipeline.add_task(out, specs(tiny_tasks, ["sql"]))
    with pytest.raises(CheckpointError, match="not an inlaid checkpoint"):
        pipeline.add_task(tiny_model, specs(tiny_tasks, ["math"]))
    other = save_tiny_model(tmp_path / "other", seed=5)
    with pytest.raises(CheckpointError, match="differs"):
        pipeline.add_task(out, specs(tiny_tasks, ["math"]), base_source=str(other))


def test_interrupt_leaves_previous_checkpoint(tmp_path, tiny_model, tiny_tasks, monkeypatch):
    out = tmp_path / "q"
    pipeline.quantize(str(tiny_model), out, specs(tiny_tasks, ["sql"]), QuantConfig(**CFG))
    before = (out / "model.safetensors").read_bytes()

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("inlaid.quant.calibrate.gptq_quantize", interrupt)
    with pytest.raises(KeyboardInterrupt):
        pipeline.add_task(out, specs(tiny_tasks, ["math"]))
    assert (out / "model.safetensors").read_bytes() == before
    assert [t["name"] for t in read_checkpoint(out).tasks] == ["sql"]
    assert not list(tmp_path.glob(".q.inlaid-*"))


def test_out_dirs_whose_replacement_would_lose_data_are_refused_before_any_work(tmp_path, tiny_model,
                                                                                tiny_tasks, monkeypatch):
    import shutil

    def no_work(*args, **kwargs):
        raise AssertionError("work started before OUT_DIR was checked")

    monkeypatch.setattr(pipeline, "load_base", no_work)
    adapter, data = tiny_tasks["sql"]
    workspace = tmp_path / "ws"  # a directory holding every input
    shutil.copytree(tiny_model, workspace / "base")
    shutil.copytree(adapter, workspace / "adapter")
    shutil.copy(data, workspace / "data.jsonl")
    inside = [TaskSpec("sql", workspace / "adapter", workspace / "data.jsonl")]
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("keep me")
    monkeypatch.chdir(workspace)
    cases = [
        (workspace / "base", "holds the input"),  # the base itself
        (workspace, "holds the input"),  # a directory that holds the inputs
        (workspace.parent, "holds"),
        (".", "holds"),  # the working directory
        (a_file, "is a file"),
        (a_file / "out", "is a file"),
        (other, "not an inlaid checkpoint"),  # non-empty, not a checkpoint: --overwrite won't delete it
    ]
    for out, needle in cases:
        with pytest.raises(ConfigError, match=needle):
            pipeline.quantize(str(workspace / "base"), out, inside, QuantConfig(**CFG), overwrite=True)
    assert a_file.read_text() == "keep me" and (other / "keep.txt").read_text() == "keep me"
    assert sorted(p.name for p in workspace.iterdir()) == ["adapter", "base", "data.jsonl"]
    assert not list(tmp_path.glob(".*inlaid-*"))


def test_checkpoint_files_that_are_corrupt_or_not_ours_are_one_line_errors(tmp_path, tiny_model, tiny_tasks):
    """A quantized checkpoint given as the base, corrupt weights or state, a malformed tasks.json:
    InlaidErrors naming the file, never a library traceback."""
    import shutil

    from inlaid.engine.model import load_weights
    from inlaid.errors import ModelLoadError

    out = tmp_path / "q"
    pipeline.quantize(str(tiny_model), out, specs(tiny_tasks, ["sql"]), QuantConfig(**CFG))
    assert oct((out).stat().st_mode & 0o777) == oct(0o755)  # readable by other users, as mkdir makes it
    with pytest.raises(ModelLoadError, match="already a quantized checkpoint"):
        pipeline.quantize(str(out), tmp_path / "q2", specs(tiny_tasks, ["math"]), QuantConfig(**CFG))
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "state" / "layer_000.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="layer_000.safetensors"):
        pipeline.add_task(broken, specs(tiny_tasks, ["math"]))
    (broken / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        load_weights(broken, quantized=True)
    (broken / "tasks.json").write_text(json.dumps({"tasks": [1, 2]}))
    with pytest.raises(CheckpointError, match="tasks.json"):
        read_checkpoint(broken)
    base = tmp_path / "corrupt-base"
    shutil.copytree(tiny_model, base)
    next(base.glob("*.safetensors")).write_bytes(b"\xff" * 64)
    with pytest.raises(ModelLoadError, match="cannot load base model"):
        pipeline.quantize(str(base), tmp_path / "q3", specs(tiny_tasks, ["math"]), QuantConfig(**CFG))


def test_add_task_finds_a_relative_base_from_any_directory(tmp_path, tiny_model, tiny_tasks, monkeypatch):
    import shutil

    shutil.copytree(tiny_model, tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    pipeline.quantize("base", tmp_path / "q", specs(tiny_tasks, ["sql"]), QuantConfig(**CFG))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    pipeline.add_task(tmp_path / "q", specs(tiny_tasks, ["math"]))
    assert [t["name"] for t in read_checkpoint(tmp_path / "q").tasks] == ["sql", "math"]
