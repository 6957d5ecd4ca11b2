"""Run lm-eval tasks on model variants through the ``inlaid`` model type; results as an EvalResult.

    result = run_lm_eval([Variant("fp16", "default"), Variant("w4", "out/w4")], ["inlaid_suite"],
                         include_path=Path("out/lm-eval-tasks"))
    report.write_reports(result, out_dir, stem="lm_eval")

Each variant is one :class:`~inlaid.eval.lm_eval_model.InlaidLM` (``adapter=task`` by default: each
exported task with its own adapter) through ``lm_eval.simple_evaluate`` with the chat template
applied; every numeric metric of every task lands in the result, the exported tasks' in their
task's order (primary first), and generated answers become the variant's predictions.
"""

from __future__ import annotations

from pathlib import Path

from inlaid.errors import ConfigError
from inlaid.eval.lm_eval_export import TASK_PREFIX
from inlaid.eval.lm_eval_model import TASK_ADAPTER, InlaidLM
from inlaid.eval.runner import EvalResult, TaskResult, check_model_source


def _metric_values(entry: dict) -> dict[str, float]:
    """lm-eval's ``{"chrf,none": 71.3, "chrf_stderr,none": "N/A", "alias": ...}`` -> ``{"chrf": 71.3}``."""
    values = {}
    for key, value in entry.items():
        name, _, filter_name = key.partition(",")
        if not filter_name or "_stderr" in name or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        values[name if filter_name == "none" else key] = float(value)
    return values


def _primary_first(task: str, values: dict[str, float]) -> dict[str, float]:
    """An exported inlaid task's metrics in the task's order (primary first), as ``inlaid eval``."""
    from inlaid.eval.tasks import TASKS

    own = TASKS.get(task[len(TASK_PREFIX):]) if task.startswith(TASK_PREFIX) else None
    if own is None:
        return values
    order = {m: i for i, m in enumerate(own.metrics)}
    return dict(sorted(values.items(), key=lambda kv: order.get(kv[0], len(order))))


def _add_samples(result, variant: str, samples: list[dict]) -> None:
    """Generated texts (generate_until tasks) as the variant's predictions, in document order."""
    samples = sorted(samples, key=lambda sample: sample["doc_id"])
    texts = [s["filtered_resps"][0] if s.get("filtered_resps") else None for s in samples]
    if not samples or not all(isinstance(t, str) for t in texts):
        return
    result.predictions[variant] = texts
    if not result.prompts:
        result.prompts = [s["arguments"][0][0] for s in samples]
        result.references = [str(s.get("target", "")) for s in samples]


def _collect(results: dict[str, TaskResult], variant: str, out: dict) -> None:
    """One variant's ``simple_evaluate`` output into ``results`` (task -> TaskResult)."""
    for task, entry in out["results"].items():
        values = _primary_first(task, _metric_values(entry))
        if not values:
            continue
        higher = out.get("higher_is_better", {}).get(task, {})
        first = next(iter(values)).split(",")[0]
        result = results.setdefault(task, TaskResult(
            task, tuple(values), int(out.get("n-samples", {}).get(task, {}).get("effective", 0)),
            higher_is_better=higher.get(first, True) is not False))
        result.scores[variant] = values
        _add_samples(result, variant, out.get("samples", {}).get(task, []))


def task_manager(tasks: list[str], include_path: Path | None = None):
    """A TaskManager over ``include_path`` alone when it holds every task (indexing lm-eval's
    ~15k built-in tasks takes seconds), else over both."""
    from lm_eval.tasks import TaskManager

    if include_path:
        if not Path(include_path).is_dir():
            raise ConfigError(f"--lm-eval-include {include_path}: not a directory")
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    return TaskManager(include_path=str(include_path) if include_path else None)


def run_lm_eval(variants, tasks: list[str], include_path: Path | None = None, adapter: str | None = TASK_ADAPTER,
                adapters_dir: Path | None = None, limit: int | None = None, device: str | None = "cpu",
                apply_chat_template: bool = True, reference: str | None = None,
                engine_options: dict | None = None):
    """Every variant through ``lm_eval.simple_evaluate`` on ``tasks``; an EvalResult for the reports
    (tasks without a numeric metric, such as groups without aggregation, are left out)."""
    from lm_eval import simple_evaluate

    names = [v.name for v in variants]
    if reference is not None and reference not in names:
        raise ConfigError(f"--reference {reference!r} is not one of the variants: {', '.join(names)}")
    manager = task_manager(tasks, include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        hint = "" if include_path else " (exported tasks need --lm-eval-include DIR)"
        raise ConfigError(f"unknown lm-eval task(s): {', '.join(unknown)}{hint}")
    for variant in variants:
        check_model_source(variant.source)
    results: dict[str, TaskResult] = {}
    for variant in variants:
        lm = InlaidLM(model=variant.source, adapter=adapter,
                      adapters=str(adapters_dir) if adapters_dir else None, device=device, **(engine_options or {}))
        try:
            out = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                  apply_chat_template=apply_chat_template, log_samples=True,
                                  bootstrap_iters=0)
        finally:
            lm.close()
        _collect(results, variant.name, out)
    settings = {"backend": "lm-eval", "lm_eval_tasks": list(tasks), "include_path": str(include_path or ""),
                "adapter": adapter, "adapters_dir": str(adapters_dir or ""), "limit": limit, "device": device,
                "apply_chat_template": apply_chat_template}
    return EvalResult(list(variants), reference or names[0], results, {}, settings)
