"""The ``inlaid`` lm-eval model type and the exported YAML tasks, on a tiny model and a 5-item task.

``generate_until`` through ``simple_evaluate`` must give ``inlaid eval``'s greedy answers and scores;
``loglikelihood`` must equal an HF + PEFT forward; ``loglikelihood_rolling`` must score the windows
lm-eval's own ``get_rolling_token_windows`` makes.
"""

import json

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from inlaid.errors import ConfigError  # noqa: E402
from inlaid.eval.lm_eval_export import GROUP, export_lm_eval  # noqa: E402
from inlaid.eval.lm_eval_model import InlaidLM  # noqa: E402
from inlaid.eval.lm_eval_run import run_lm_eval, task_manager  # noqa: E402
from inlaid.eval.perplexity import rolling_windows  # noqa: E402
from inlaid.eval.runner import EvalConfig, Variant, run_eval  # noqa: E402
from inlaid.eval.tasks import get_task, read_examples  # noqa: E402

from ..conftest import save_adapter  # noqa: E402

ROWS = [("Review: the food was great.\nIs this review positive, negative or neutral?", "positive"),
        ("Review: the room was dirty!\nIs this review positive, negative or neutral?", "negative"),
        ("Classify the sentiment of this review as positive, negative or neutral.\nThe app is new.", "neutral"),
        ("Review: the staff was not very friendly.\nIs this review positive, negative or neutral?", "negative"),
        ("Review: the music was fun.\nIs this review positive, negative or neutral?", "positive")]
TASK = "sentiment"  # scored without extra packages, 4 new tokens: a short run
LM_TASK = f"inlaid_{TASK}"
ENGINE = {"num_kv_blocks": 64, "block_size": 8}


@pytest.fixture(scope="module")
def suite(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("lm-eval")
    save_adapter(tiny_model, root / "adapters" / TASK, seed=31, rank=4)
    data = root / "data" / TASK / "test.jsonl"
    data.parent.mkdir(parents=True)
    data.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in ROWS))
    export_lm_eval([get_task(TASK)], root / "exported", root / "data")
    return root


def make_lm(tiny_model, suite, **kwargs):
    return InlaidLM(model=str(tiny_model), adapters=str(suite / "adapters"), **{**ENGINE, **kwargs})


def hf_logprobs(tiny_model, adapter_dir, ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                                      str(adapter_dir))
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


def test_export_loads_in_task_manager(suite):
    manager = task_manager([LM_TASK, GROUP], suite / "exported")
    loaded = manager.load([GROUP])
    task = loaded["tasks"][LM_TASK]
    docs = list(task.test_docs())
    assert [d["prompt"] for d in docs] == [p for p, _ in ROWS]
    assert task.doc_to_text(docs[1]) == ROWS[1][0] and task.doc_to_target(docs[1]) == "negative"
    assert task.config.generation_kwargs["max_gen_toks"] == get_task(TASK).max_new_tokens
    scored = task.process_results(docs[1], [" Negative, I think."])
    assert scored == {"accuracy": 100.0}
    expected = get_task(TASK).score(["Negative, I think."], read_examples(
        suite / "data" / TASK / "test.jsonl")[1:2])
    assert scored == expected and set(scored) == set(get_task(TASK).metrics)


def test_cli_export(tmp_path, suite):
    from typer.testing import CliRunner

    from inlaid.cli.main import app

    out = tmp_path / "exported"
    result = CliRunner().invoke(app, ["eval", "--export-lm-eval", str(out), "--tasks", TASK,
                                      "--data", str(suite / "data"), "--limit", "2"])
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {"data", "utils.py", f"{LM_TASK}.yaml", f"{GROUP}.yaml"}
    assert len((out / "data" / f"{TASK}.jsonl").read_text().splitlines()) == 2
    assert f"process_results: !function utils.process_{TASK}" in (out / f"{LM_TASK}.yaml").read_text()


def test_model_type_is_registered_and_checks_args(tiny_model, suite):
    assert get_model("inlaid") is InlaidLM
    lm = InlaidLM.create_from_arg_string(f"model={tiny_model},adapter={TASK},adapters={suite / 'adapters'},"
                                         "num_kv_blocks=32", {"device": "cpu", "batch_size": 4})
    assert lm.adapter == TASK and lm.max_length == 255
    with pytest.raises(ConfigError, match="unknown model_args"):
        InlaidLM(model=str(tiny_model), pretrained="x")
    with pytest.raises(ConfigError, match="not registered"):
        InlaidLM(model=str(tiny_model), adapter="sql", **ENGINE)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="pass --device cpu"):
            InlaidLM(model=str(tiny_model), device="cuda:0")


def test_generate_until_agrees_with_inlaid_eval(tiny_model, suite):
    config = EvalConfig([Variant("fp", str(tiny_model))], [get_task(TASK)],
                        adapters_dir=suite / "adapters", data_dir=suite / "data", engine_options=ENGINE)
    ours = run_eval(config).tasks[TASK]
    result = run_lm_eval([Variant("fp", str(tiny_model))], [LM_TASK], suite / "exported",
                         adapters_dir=suite / "adapters", engine_options=ENGINE)
    theirs = result.tasks[LM_TASK]
    assert theirs.num_examples == 5 and theirs.scores["fp"] == ours.scores["fp"]
    assert [t.strip() for t in theirs.predictions["fp"]] == ours.predictions["fp"]  # same greedy answers
    assert any(ours.predictions["fp"])
    lm = make_lm(tiny_model, suite, adapter="task")
    chat = lm.apply_chat_template([{"role": "user", "content": ROWS[0][0]}])
    assert theirs.prompts[0] == chat and lm.tok_encode(chat) == lm.llm.chat_prompt(ROWS[0][0])


def test_loglikelihood_matches_hf_forward(tiny_model, suite):
    lm = make_lm(tiny_model, suite, adapter=TASK)
    pairs = [("The answer is", " 42"), ("", "hello"), ("abc", "defgh")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    got = lm.loglikelihood(requests)
    for (context, continuation), (logprob, is_greedy) in zip(pairs, got):
        ctx = lm.tok_encode(context) if context else [lm.prefix_token_id]
        cont = lm.tok_encode(continuation)
        ref = hf_logprobs(tiny_model, suite / "adapters" / TASK, ctx + cont)
        positions = range(len(ctx) - 1, len(ctx) + len(cont) - 1)
        expected = sum(ref[p, t].item() for p, t in zip(positions, cont))
        assert logprob == pytest.approx(expected, abs=1e-3)
        assert is_greedy == all(ref[p].argmax().item() == t for p, t in zip(positions, cont))
    # a continuation equal to the argmax chain is greedy
    ctx = lm.tok_encode("xyz")
    ref = hf_logprobs(tiny_model, suite / "adapters" / TASK, ctx)
    greedy_token = lm.tokenizer.decode([ref[-1].argmax().item()])
    assert lm.loglikelihood([Instance("loglikelihood", {}, ("xyz", greedy_token), 0)])[0][1] is True


def test_rolling_windows_are_lm_evals():
    for num_tokens in (1, 5, 23, 24, 60):
        for max_seq_len in (4, 7, 23):
            theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(
                list(range(1, num_tokens + 1)), 0, max_seq_len, 1)]
            seq = list(range(num_tokens + 1))  # position 0 is the prefix token 0
            ours = [(seq[start:first], seq[first:end])
                    for start, first, end in rolling_windows(len(seq), max_seq_len + 1)]
            assert ours == [(list(c), list(p)) for c, p in theirs], (num_tokens, max_seq_len)
    # a smaller stride: more context per scored token, every position still scored once
    assert rolling_windows(7, 4, stride=2) == [(0, 1, 3), (1, 3, 5), (3, 5, 7)]
    with pytest.raises(ConfigError):
        rolling_windows(10, 4, stride=4)


def test_loglikelihood_rolling_matches_hf(tiny_model, suite):
    lm = make_lm(tiny_model, suite, max_model_len=24)  # 23 tokens per window: the text needs three
    text = "the quick brown fox jumps over the lazy dog"
    (total,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    expected = 0.0
    for context, pred in map(make_disjoint_window, get_rolling_token_windows(
            lm.tok_encode(text), lm.prefix_token_id, lm.max_length - 1, 1)):
        ids = list(context) + list(pred)
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
        start = len(ids) - len(pred)
        expected += sum(ref[start + i - 1, t].item() for i, t in enumerate(pred))
    assert total == pytest.approx(expected, abs=1e-3)
