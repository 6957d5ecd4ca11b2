"""The built-in task suite: determinism, disjoint splits, scoring, files, missing data packages."""

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

from inlaid.errors import ConfigError, DataError
from inlaid.eval import tasks
from inlaid.eval.tasks import TASKS, Example, get_task, read_examples, write_task_data

NAMES = sorted(TASKS)
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_registry_and_unknown_name():
    assert 8 <= len(TASKS) <= 10
    for name, task in TASKS.items():
        assert task.name == name and task.description and task.metrics and 0 < task.max_new_tokens <= 64
    with pytest.raises(ConfigError, match="choose from .*arithmetic"):
        get_task("no_such_task")


@pytest.mark.parametrize("name", NAMES)
def test_examples_are_seeded_and_non_empty(name):
    task = get_task(name)
    first = task.examples("test", 12, seed=0)
    assert first == task.examples("test", 12, seed=0)
    assert first != task.examples("test", 12, seed=1)
    assert len({ex.prompt for ex in first}) == 12
    for ex in first:
        assert ex.prompt.strip() and ex.reference.strip()
        json.dumps(ex.to_record())


@pytest.mark.parametrize("name", NAMES)
def test_splits_are_disjoint(name):
    task = get_task(name)
    drawn = {split: task.examples(split, n, seed=3)
             for split, n in (("train", 300), ("calib", 40), ("test", 40))}
    prompts = {split: {ex.prompt for ex in rows} for split, rows in drawn.items()}
    assert not prompts["train"] & prompts["calib"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["calib"] & prompts["test"]
    for split, rows in drawn.items():  # every key belongs to its split, whatever the seed
        assert {task.split_of(ex.key or ex.prompt) for ex in rows} == {split}


def test_number_and_date_splits_are_disjoint_by_value():
    task = get_task("number_words_fr")
    numbers = {s: {ex.key for ex in task.examples(s, 60, 0)} for s in ("train", "test")}
    assert not numbers["train"] & numbers["test"]
    dates = {s: {ex.key for ex in get_task("date_de").examples(s, 60, 0)} for s in ("train", "test")}
    assert not dates["train"] & dates["test"]


def test_geography_test_questions_are_paraphrases_of_training_facts():
    task = get_task("geography_qa")
    train = task.examples("train", 1000, 0)
    test = task.examples("test", 50, 0)
    train_templates = {t for family in tasks._GEO_QUESTIONS.values() for t in family[0]}
    test_templates = {t for family in tasks._GEO_QUESTIONS.values() for t in family[1]}
    assert not train_templates & test_templates
    trained_answers = {ex.reference for ex in train}
    assert sum(ex.reference in trained_answers for ex in test) >= 45  # facts seen in training
    assert not {ex.prompt for ex in train} & {ex.prompt for ex in test}


@pytest.mark.parametrize("name", NAMES)
def test_perfect_predictions_score_100_and_wrong_ones_less(name):
    task = get_task(name)
    rows = task.examples("test", 16, seed=0)
    perfect = task.score([ex.reference for ex in rows], rows)
    assert set(perfect) == set(task.metrics)
    assert all(v == pytest.approx(100.0) for v in perfect.values())
    wrong = task.score([rows[(i + 1) % len(rows)].reference + " x" for i in range(len(rows))], rows)
    assert wrong[task.metrics[0]] < 100.0
    assert task.score([""] * len(rows), rows)[task.metrics[0]] == 0.0


def test_score_checks_lengths():
    task = get_task("arithmetic")
    rows = task.examples("test", 2, 0)
    with pytest.raises(ConfigError):
        task.score(["1"], rows)
    with pytest.raises(DataError):
        task.score([], [])


def test_unknown_split():
    with pytest.raises(ConfigError, match="split"):
        get_task("arithmetic").examples("dev", 2, 0)


def test_missing_data_package_is_a_data_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "num2words" else real(name, *a, **k))
    with pytest.raises(DataError, match=r"pip install inlaid\[tasks\]"):
        get_task("number_words_de").examples("test", 2, 0)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_write_task_data_is_deterministic(tmp_path):
    task = get_task("number_words_es")
    a = write_task_data(task, tmp_path / "a", seed=5, n_train=20, n_calib=4, n_test=4)
    b = write_task_data(task, tmp_path / "b", seed=5, n_train=20, n_calib=4, n_test=4)
    assert sorted(a) == ["calib", "test", "train"]
    for split in a:
        assert a[split].read_bytes() == b[split].read_bytes()
    rows = read_examples(a["test"])
    assert [ex.prompt for ex in rows] == [ex.prompt for ex in task.examples("test", 4, 5)]


# The stdlib-only tasks do not depend on data package versions: their files are pinned.
PINNED = {
    "arithmetic": "e696b98e5ba3269ba8fb6651b18ecb879f282560ffc039546f064c8210057093",
    "python_expr": "f8ab06f1a8e64af462c5f6b629bcce724d1d975cab2d5b3e57f4c183a1d1ffad",
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_pinned_sha256(tmp_path, name):
    paths = write_task_data(get_task(name), tmp_path, seed=0, n_train=8, n_calib=4, n_test=4)
    assert _digest(paths["test"]) == PINNED[name]


def test_files_read_by_calibration_loader(tmp_path):
    from inlaid.quant.calib_data import render

    class Template:  # the minimal tokenizer interface render() uses
        chat_template = None

    paths = write_task_data(get_task("python_expr"), tmp_path, seed=0, n_train=4, n_calib=2, n_test=2)
    for line in paths["calib"].read_text().splitlines():
        row = json.loads(line)
        assert render(row, Template()) == row["prompt"] + "\n" + row["response"]
        assert row["extra"]["values"]


def test_read_examples_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt"}\n')
    with pytest.raises(DataError):
        read_examples(bad)
    with pytest.raises(DataError):
        read_examples(tmp_path / "missing.jsonl")


def test_python_expr_execution_match():
    ex = Example("...", "(x + y) * 2", extra={"values": [{"x": 1, "y": 2}, {"x": -3, "y": 5}]})
    assert tasks.execution_match("2 * (y + x)", ex) == 100.0
    assert tasks.execution_match("```python\n(x+y)*2\n```", ex) == 100.0
    assert tasks.execution_match("x + y * 2", ex) == 0.0
    assert tasks.execution_match("__import__('os').getcwd()", ex) == 0.0
    assert tasks.execution_match("", ex) == 0.0
    div = Example("...", "x // y", extra={"values": [{"x": 3, "y": 0}]})
    assert tasks.execution_match("x // y", div) == 100.0  # both raise ZeroDivisionError
    assert tasks.execution_match("x", div) == 0.0


def test_safe_eval_refuses_anything_but_arithmetic():
    assert tasks.safe_eval("max(x, 3) ** 2 - abs(-y) // 2", {"x": 1, "y": 5}) == 7
    for bad in ("x.real", "open('f')", "[x]", "x if x else y", "2 ** 100", "lambda: 1"):
        with pytest.raises((ValueError, SyntaxError)):
            tasks.safe_eval(bad, {"x": 1, "y": 2})


def test_table_sentence_ignores_field_order():
    country = tasks.countries()[0]
    fields = ["population", "capital", "currency", "region"]
    sentence = tasks.table_sentence(country, fields)
    assert sentence == tasks.table_sentence(country, list(reversed(fields)))
    assert sentence.startswith(f"{country['name']} is a country in {country['region']} with its capital")


def test_sentiment_labels_follow_vader():
    rows = get_task("sentiment").examples("train", 90, 0)
    assert {ex.reference for ex in rows} == {"positive", "negative", "neutral"}
    assert all(tasks.vader_label(ex.key) == ex.reference for ex in rows)
    ex = rows[0]
    assert tasks.label_accuracy(f"The review is {ex.reference}.", ex) == 100.0


def test_committed_task_files():
    """examples/tasks holds every task's three splits, disjoint, and the stdlib tasks' files are
    exactly what the generator writes."""
    root = EXAMPLES / "tasks"
    if not root.is_dir():
        pytest.skip("examples/tasks not present")
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == NAMES
    for name in NAMES:
        prompts = {s: [ex.prompt for ex in read_examples(root / name / f"{s}.jsonl")] for s in tasks.SPLITS}
        assert not set(prompts["train"]) & set(prompts["test"])
        assert not set(prompts["calib"]) & (set(prompts["test"]) | set(prompts["train"]))
    for name in ("arithmetic", "python_expr"):
        rows = read_examples(root / name / "test.jsonl")
        generated = get_task(name).examples("test", len(rows), 0)
        assert [ex.prompt for ex in rows] == [ex.prompt for ex in generated]
