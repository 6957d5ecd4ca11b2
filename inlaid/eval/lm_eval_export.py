"""Export the task suite as lm-eval YAML tasks over local jsonl files.

    export_lm_eval([get_task("arithmetic")], Path("out/lm-eval-tasks"))

writes into the directory:

- ``data/<task>.jsonl``: the test rows (``prompt``, ``response``, ``extra`` as a JSON string, so
  every row has the same columns whatever the task's extra data);
- ``inlaid_<task>.yaml``: a ``generate_until`` task, ``dataset_path: json`` with ``data_files`` (an
  absolute path: re-export after moving the directory), the prompt as the whole user message,
  greedy, ``max_gen_toks`` = the task's ``max_new_tokens``, no stop string but EOS — as ``inlaid
  eval`` generates — and ``process_results: !function utils.process_<task>``;
- ``utils.py``: per-example scoring with the task's own scorers (``inlaid.eval.tasks``), so lm-eval
  reports the same metrics as ``inlaid eval`` (chrF, ROUGE-L, exact/numeric/execution match,
  accuracy; 0-100). A metric name lm-eval does not know would otherwise be fetched from the hub,
  and lm-eval's ``bleu`` is corpus BLEU-4, which scores 0 on short answers;
- ``inlaid_suite.yaml``: a group of all exported tasks.

Task names carry the ``inlaid_`` prefix: lm-eval has tasks of its own named ``arithmetic``. Run them
with ``--include_path DIR --apply_chat_template`` (the prompts are user messages).
"""

from __future__ import annotations

import json
from pathlib import Path

from inlaid.eval.runner import load_examples
from inlaid.eval.tasks import Task

TASK_PREFIX = "inlaid_"
GROUP = "inlaid_suite"

UTILS = '''"""Per-example scoring of the exported inlaid tasks (written by inlaid eval --export-lm-eval)."""

import json

from inlaid.eval.tasks import Example, get_task


def _scorer(name):
    task = get_task(name)

    def process_results(doc, results):
        prediction = (results[0] if results else "").strip()
        example = Example(doc["prompt"], doc["response"], extra=json.loads(doc.get("extra") or "{}"))
        return task.score([prediction], [example])

    process_results.__name__ = f"process_{name}"
    return process_results

'''


def _q(text: str) -> str:
    """A YAML double-quoted scalar (JSON string syntax is valid YAML)."""
    return json.dumps(text, ensure_ascii=False)


def task_yaml(task: Task, data_file: Path) -> str:
    metrics = "".join(f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n"
                      for m in task.metrics)
    return (f"# {task.description} (written by inlaid eval --export-lm-eval)\n"
            f"task: {TASK_PREFIX}{task.name}\n"
            "dataset_path: json\n"
            "dataset_kwargs:\n"
            "  data_files:\n"
            f"    test: {_q(str(Path(data_file).resolve()))}\n"
            "test_split: test\n"
            "output_type: generate_until\n"
            'doc_to_text: "{{prompt}}"\n'
            'doc_to_target: "{{response}}"\n'
            "generation_kwargs:\n"
            "  until: []\n"
            f"  max_gen_toks: {task.max_new_tokens}\n"
            "  do_sample: false\n"
            f"process_results: !function utils.process_{task.name}\n"
            f"metric_list:\n{metrics}"
            "metadata:\n"
            "  version: 1.0\n")


def export_lm_eval(tasks: list[Task], out_dir: Path, data_dir: Path = Path("examples/tasks"),
                   limit: int | None = None, seed: int = 0) -> dict[str, Path]:
    """Write the YAML tasks, their data and ``utils.py``; returns lm-eval task name -> YAML path."""
    out_dir = Path(out_dir)
    (out_dir / "data").mkdir(parents=True, exist_ok=True)
    written, utils = {}, [UTILS]
    for task in tasks:
        data_file = out_dir / "data" / f"{task.name}.jsonl"
        with open(data_file, "w", encoding="utf-8") as fh:
            for ex in load_examples(task, data_dir, limit, seed):
                row = {"prompt": ex.prompt, "response": ex.reference, "extra": json.dumps(ex.extra)}
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        name = f"{TASK_PREFIX}{task.name}"
        written[name] = out_dir / f"{name}.yaml"
        written[name].write_text(task_yaml(task, data_file), encoding="utf-8")
        utils.append(f"process_{task.name} = _scorer({task.name!r})\n")
    (out_dir / "utils.py").write_text("".join(utils), encoding="utf-8")
    members = "".join(f"  - {name}\n" for name in written)
    (out_dir / f"{GROUP}.yaml").write_text(
        f"group: {GROUP}\ntask:\n{members}metadata:\n  version: 1.0\n")
    return written
