import json
import shutil

import pytest

from inlaid.errors import DataError, ModelLoadError
from inlaid.model.loader import load_base
from inlaid.quant.calib_data import load_calibration

from ..conftest import make_tokenizer


def test_refuses_pickled_and_missing(tmp_path, tiny_model):
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="safetensors only"):
        load_base(str(pickled))
    with pytest.raises(ModelLoadError, match="not found"):
        load_base(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        load_base(str(tmp_path / "x.gguf"))


def test_refuses_other_architectures(tmp_path, tiny_model):
    gpt = tmp_path / "gpt"
    shutil.copytree(tiny_model, gpt)
    cfg = json.loads((gpt / "config.json").read_text())
    (gpt / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelLoadError, match="not supported"):
        load_base(str(gpt))


@pytest.mark.parametrize("fmt", ["csv", "parquet", "json"])
def test_calibration_formats(tmp_path, fmt):
    import datasets

    rows = [{"prompt": f"question {i}", "response": f"answer {i}"} for i in range(10)]
    path = tmp_path / f"d.{fmt}"
    ds = datasets.Dataset.from_list(rows)
    getattr(ds, f"to_{fmt}")(str(path))
    seqs = load_calibration(path, make_tokenizer(), samples=4, seq_len=16, min_tokens=8, seed=0, task="t")
    assert len(seqs) == 4 and all(s.shape[1] <= 16 for s in seqs)
    # The chat template was applied: role markers are part of the tokens.
    tok = make_tokenizer()
    assert "<|user|>" in tok.decode(seqs[0][0])


def test_calibration_errors(tmp_path):
    tok = make_tokenizer()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"other": 1}\n')
    with pytest.raises(DataError, match="no usable rows"):
        load_calibration(bad, tok, samples=4, seq_len=16, min_tokens=8, seed=0, task="t")
    txt = tmp_path / "x.txt"
    txt.write_text("hi")
    with pytest.raises(DataError, match="unsupported data format"):
        load_calibration(txt, tok, samples=4, seq_len=16, min_tokens=8, seed=0, task="t")
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    with pytest.raises(DataError, match="cannot read"):
        load_calibration(broken, tok, samples=4, seq_len=16, min_tokens=8, seed=0, task="t")


def test_samples_do_not_depend_on_other_tasks(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"row number {i}"}) + "\n" for i in range(30)))
    tok = make_tokenizer()
    a = load_calibration(path, tok, samples=5, seq_len=32, min_tokens=8, seed=1, task="a")
    b = load_calibration(path, tok, samples=5, seq_len=32, min_tokens=8, seed=1, task="a")
    c = load_calibration(path, tok, samples=5, seq_len=32, min_tokens=8, seed=1, task="c")
    assert all((x == y).all() for x, y in zip(a, b))
    assert any(x.shape != y.shape or not (x == y).all() for x, y in zip(a, c))
