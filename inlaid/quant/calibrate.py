"""Layer-sequential multi-task GPTQ driver (MLGPTQ).

One decoder layer lives on the compute device at a time. For every task, the task's cached layer
inputs run through the layer *with that task's adapter active*; hooks catch each Hessian group's
input and accumulate that task's own Hessian. The aggregation state of every group folds the tasks
in order (prior state first, for add-task), and the solver quantizes each projection against the
aggregated Hessian. Memory: one layer plus every task's cached activations.

Propagation: ``fp`` feeds the next layer with full-precision outputs (task Hessians then never
depend on the quantized weights, which makes add-task exact); ``quantized`` feeds it with the
quantized layer's outputs and solves q/k/v, o, gate/up and down one after another (true sequential),
as the GPTQ reference does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from inlaid.config import QuantConfig
from inlaid.model.arch import HESSIAN_GROUPS, PROJECTIONS, get_projection, module_path
from inlaid.model.lora import LoraAdapter, lora_active
from inlaid.quant.gptq import factorize, gptq_quantize
from inlaid.quant.hessian import AggregationState, HessianAccumulator, relative_error
from inlaid.quant.primitives import PackedLinear, pack_linear

@dataclass
class CalibTask:
    name: str
    adapter: LoraAdapter | None
    samples: list[torch.Tensor]  # token ids [1, L]


@dataclass
class CalibrationResult:
    packed: dict[str, PackedLinear] = field(default_factory=dict)
    # layer -> task -> mean relative reconstruction error over the 7 projections
    errors: dict[int, dict[str, float]] = field(default_factory=dict)
    layer_seconds: list[float] = field(default_factory=list)


class Reporter:
    """Progress callbacks; the CLI passes a rich-backed one, tests pass nothing."""

    def start(self, num_layers: int, num_tasks: int) -> None: ...
    def task_done(self, layer: int, task: str) -> None: ...
    def layer_done(self, layer: int, seconds: float) -> None: ...


class _StopForward(Exception):
    pass


def _layer_output(out):
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def capture_inputs(model, samples: list[torch.Tensor], device, dtype) -> list[tuple[torch.Tensor, dict]]:
    """Hidden states and keyword arguments that reach decoder layer 0, one entry per sample."""
    inner = model.model
    captured: list[tuple[torch.Tensor, dict]] = []

    def pre_hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, dict(kwargs)))
        raise _StopForward

    inner.embed_tokens.to(device)
    inner.rotary_emb.to(device)
    handle = inner.layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        for ids in samples:
            try:
                inner(input_ids=ids.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
        inner.embed_tokens.to("cpu")
    return [(h.to(dtype), _cast_floats(kw, dtype)) for h, kw in captured]


def _cast_floats(value, dtype):
    """Rotary cos/sin are computed in the model's load dtype; the layer runs in the compute dtype."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast_floats(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast_floats(v, dtype) for k, v in value.items()}
    return value


@torch.no_grad()
def _run_layer(layer, index, task: CalibTask, inputs, groups, keep_outputs: bool):
    """Forward one task's inputs; returns {group: accumulator} and the outputs if asked."""
    accs, handles = {}, []
    for g in groups:
        first = dict(HESSIAN_GROUPS)[g][0]
        module = get_projection(layer, first)
        acc = HessianAccumulator(module.in_features, module.weight.device)
        accs[g] = acc
        handles.append(module.register_forward_pre_hook(lambda _m, args, acc=acc: acc.add(args[0])))
    outputs = []
    try:
        with lora_active(layer, index, task.adapter):
            for hidden, kwargs in inputs:
                out = _layer_output(layer(hidden, **kwargs))
                if keep_outputs:
                    outputs.append((out, kwargs))
    finally:
        for h in handles:
            h.remove()
    return accs, outputs


def calibrate(model, tasks: list[CalibTask], cfg: QuantConfig, *, device: str | torch.device,
              dtype: torch.dtype, prior_states: Callable[[int], dict[str, AggregationState]] | None = None,
              state_sink: Callable[[int, dict[str, AggregationState]], None] | None = None,
              reporter: Reporter | None = None) -> CalibrationResult:
    """Quantize every decoder layer of ``model`` against the tasks' aggregated Hessians."""
    reporter = reporter or Reporter()
    layers = model.model.layers
    group_names = [g for g, _ in HESSIAN_GROUPS]
    sequential = cfg.propagation == "quantized" and cfg.true_sequential
    passes = [[g] for g in group_names] if sequential else [group_names]
    reporter.start(len(layers), len(tasks) * len(passes))
    result = CalibrationResult()
    inputs = {t.name: capture_inputs(model, t.samples, device, dtype) for t in tasks}

    for index, layer in enumerate(layers):
        started = time.perf_counter()
        layer.to(device=device, dtype=dtype)
        prior = prior_states(index) if prior_states else {}
        states = {g: prior.get(g) or AggregationState(cfg.aggregation) for g in group_names}
        inputs, result.errors[index] = _calibrate_layer(layer, index, tasks, inputs, states, passes,
                                                        cfg, dtype, result, reporter)
        if state_sink is not None:
            state_sink(index, states)
        layer.to("cpu")
        seconds = time.perf_counter() - started
        result.layer_seconds.append(seconds)
        reporter.layer_done(index, seconds)
    return result


def _calibrate_layer(layer, index, tasks, inputs, states, passes, cfg: QuantConfig, dtype,
                     result: CalibrationResult, reporter: Reporter):
    """Collect, fold and solve one layer; returns the next layer's inputs and per-task errors."""
    propagate_fp = cfg.propagation == "fp"
    error_sum = {t.name: 0.0 for t in tasks}
    next_inputs: dict[str, list] = {}
    for pass_groups in passes:
        task_h: dict[str, dict[str, torch.Tensor]] = {t.name: {} for t in tasks}
        for task in tasks:
            # fp propagation never changes the weights, so its one pass also yields the outputs.
            accs, outs = _run_layer(layer, index, task, inputs[task.name], pass_groups, propagate_fp)
            if propagate_fp:
                next_inputs[task.name] = outs
            for g, acc in accs.items():
                states[g].fold(acc)
                task_h[task.name][g] = acc.hessian()
            reporter.task_done(index, task.name)
        for g in pass_groups:
            factor = factorize(states[g].hessian(), damp_percent=cfg.damp_percent, desc_act=cfg.desc_act)
            for proj in dict(HESSIAN_GROUPS)[g]:
                module = get_projection(layer, proj)
                original = module.weight.detach().float().clone()
                q = _solve(layer, index, proj, original, factor, cfg, result)
                for t in tasks:
                    error_sum[t.name] += relative_error(original, q, task_h[t.name][g])
                if not propagate_fp:
                    module.weight.data.copy_(q.to(dtype))
    if not propagate_fp:
        for task in tasks:
            next_inputs[task.name] = _run_layer(layer, index, task, inputs[task.name], [], True)[1]
    return next_inputs, {name: total / len(PROJECTIONS) for name, total in error_sum.items()}


def _solve(layer, index, proj, weight, factor, cfg: QuantConfig, result: CalibrationResult):
    solved = gptq_quantize(weight, bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym,
                           static_groups=cfg.static_groups, block_size=cfg.block_size, factor=factor)
    bias = get_projection(layer, proj).bias
    result.packed[module_path(index, proj)] = pack_linear(
        solved.codes.cpu(), solved.scales.cpu(), solved.zeros.cpu(), solved.g_idx.cpu(), cfg.bits,
        None if bias is None else bias.detach().cpu())
    return solved.weight
