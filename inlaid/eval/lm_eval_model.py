"""The ``inlaid`` model type for lm-evaluation-harness, on the engine's offline API.

Importing this module registers it (lm-eval 0.4.13 has no plugin discovery for models), so from
Python::

    import inlaid.eval.lm_eval_model  # noqa: F401  (registers "inlaid")
    lm_eval.simple_evaluate(model="inlaid", model_args="model=out/ckpt,adapter=task", tasks=[...])

and from the shell, ``python -m inlaid.eval.lm_eval_model`` is lm-eval's own CLI with the type
registered::

    python -m inlaid.eval.lm_eval_model run --model inlaid \
        --model_args model=out/ckpt,adapter=task,adapters=examples/adapters --device cpu \
        --tasks inlaid_suite --include_path out/lm-eval-tasks --apply_chat_template

Model args: ``model`` (fp16 dir, ``default`` or an inlaid checkpoint), ``adapter`` (an adapter name
for every request; ``task`` picks the adapter named like each request's task, ``inlaid_`` prefix
removed; omitted: the base model), ``adapters`` (a directory of PEFT adapters, one per subdirectory,
registered under the subdirectory name; a checkpoint's own adapters are always registered),
``adapter_path`` (one PEFT dir registered as ``adapter``), ``device`` (default ``cpu``: lm-eval's
CLI default is ``cuda:0``, pass ``--device cpu`` without a GPU), ``dtype``, ``max_gen_toks``,
``add_bos_token`` and engine options (``max_num_seqs``, ``max_loras``, ``max_lora_rank``,
``num_kv_blocks``, ``kv_cache_gib``, ``max_model_len``). The engine batches every request of a
call itself, so ``batch_size`` is accepted and ignored.

Requests: ``generate_until`` is greedy (``do_sample`` false) with lm-eval's ``until`` strings as stop
strings (the model's EOS always stops); ``loglikelihood`` sums the engine's prompt logprobs of the
continuation tokens (``is_greedy`` from the top-1 token at each position); ``loglikelihood_rolling``
scores windows as :mod:`inlaid.eval.perplexity` does. All three keep lm-eval's request order.
"""

from __future__ import annotations

from pathlib import Path

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry, register_model

from inlaid.errors import ConfigError
from inlaid.eval import perplexity
from inlaid.eval.lm_eval_export import TASK_PREFIX
from inlaid.eval.runner import EngineBackend

MODEL_NAME = "inlaid"
TASK_ADAPTER = "task"  # adapter=task: one adapter per request, named after its task
_ENGINE_ARGS = ("max_num_seqs", "max_loras", "max_lora_rank", "num_kv_blocks", "kv_cache_gib",
                "max_model_len", "max_num_batched_tokens", "block_size")


def _as_bool(value) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


def _adapter_dirs(adapters: str | None, adapter: str | None, adapter_path: str | None) -> dict[str, Path]:
    found = {}
    if adapters:
        root = Path(adapters)
        if not root.is_dir():
            raise ConfigError(f"adapters={adapters}: not a directory")
        found = {p.name: p for p in sorted(root.iterdir()) if (p / "adapter_config.json").is_file()}
    if adapter_path:
        if not adapter or adapter == TASK_ADAPTER:
            raise ConfigError("adapter_path needs adapter=NAME (the name to register it under)")
        found[adapter] = Path(adapter_path)
    return found


class InlaidLM(TemplateLM):
    def __init__(self, model: str = "default", adapter: str | None = None, adapters: str | None = None,
                 adapter_path: str | None = None, device: str | None = "cpu", dtype: str | None = None,
                 max_gen_toks: int = 256, add_bos_token: bool = False, batch_size=None,
                 max_batch_size=None, **engine_args):
        super().__init__()
        unknown = sorted(set(engine_args) - set(_ENGINE_ARGS))
        if unknown:
            raise ConfigError(f"unknown model_args for {MODEL_NAME}: {', '.join(unknown)}")
        import torch

        if device and device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device={device}: CUDA is not available here; pass --device cpu")
        dirs = _adapter_dirs(adapters, adapter, adapter_path)
        options = {k: int(v) if k != "kv_cache_gib" else float(v) for k, v in engine_args.items()}
        if dtype:
            options["dtype"] = dtype
        self._backend = EngineBackend(str(model), dirs, device, **options)
        self.llm = self._backend.llm
        self.tokenizer = self.llm.tokenizer
        self.model_name = str(model)
        self.adapter = None if adapter in (None, "", "none", "None") else str(adapter)
        if self.adapter not in (None, TASK_ADAPTER) and self.adapter not in self.llm.engine.adapters:
            raise ConfigError(f"adapter={self.adapter}: not registered (have: "
                              f"{', '.join(self.llm.engine.adapters.names) or 'none'}); pass adapters=DIR")
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = _as_bool(add_bos_token)
        self._device = self.llm.engine.model.device

    def close(self) -> None:
        """Free the engine (its KV cache and weights) before the next model loads."""
        self._backend.close()

    # --- what lm-eval asks of a model -------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return perplexity.prefix_token(self.tokenizer)

    @property
    def max_length(self) -> int:
        return self.llm.engine.max_model_len - 1  # a scoring request also asks for one new token

    @property
    def tokenizer_name(self) -> str:
        return self.model_name.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        special = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return self.tokenizer(string, add_special_tokens=special)["input_ids"]

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def adapter_for(self, request) -> str | None:
        if self.adapter != TASK_ADAPTER:
            return self.adapter
        task = request.task_name or ""
        name = task[len(TASK_PREFIX):] if task.startswith(TASK_PREFIX) else task
        if name not in self.llm.engine.adapters:
            raise ConfigError(f"adapter=task: no adapter named {name!r} for task {task!r}")
        return name

    # --- the three request types ------------------------------------------------------------------
    def _encode_request(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if context:
            return self._encode_pair(context, continuation)
        tokens = self.tok_encode(continuation, add_special_tokens=False)
        if tokens and tokens[0] == self.prefix_token_id:
            return tokens[:1], tokens[1:]
        return [self.prefix_token_id], tokens

    def _score(self, pairs: list[tuple[list[int], list[int]]], adapters: list[str | None]):
        items = []
        for context, continuation in pairs:
            if not continuation:
                raise ConfigError("loglikelihood: the continuation has no tokens")
            if len(continuation) >= self.max_length:
                raise ConfigError(f"loglikelihood: a {len(continuation)}-token continuation does not fit "
                                  f"the context of {self.max_length} tokens")
            ids = (context + continuation)[-self.max_length:]  # left-truncate the context
            items.append((ids, len(continuation)))
        return perplexity.score_spans(self.llm, items, adapters)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        args = [r.args for r in requests]
        results = self._score([self._encode_request(c, x) for c, x in args],
                              [self.adapter_for(r) for r in requests])
        for (context, continuation), result in zip(args, results):
            self.cache_hook.add_partial("loglikelihood", (context, continuation), result)
        return results

    def _loglikelihood_tokens(self, requests, **kwargs) -> list[tuple[float, bool]]:
        default = None if self.adapter == TASK_ADAPTER else self.adapter
        return self._score([(c, x) for _, c, x in requests], [default] * len(requests))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        docs = [self.tok_encode(r.args[0], add_special_tokens=False) for r in requests]
        totals = perplexity.rolling_logprob(self.llm, docs, self.max_length,
                                            adapters=[self.adapter_for(r) for r in requests])
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from inlaid.engine.sequence import SamplingParams

        prompts, params = [], []
        for request in requests:
            context, kwargs = request.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else [s for s in until if s]
            max_tokens = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            sampled = _as_bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0)) if sampled else 0.0
            ids = self.tok_encode(context)
            budget = self.llm.engine.max_model_len - max_tokens
            if budget < 1:
                raise ConfigError(f"max_gen_toks {max_tokens} leaves no room in the context of "
                                  f"{self.llm.engine.max_model_len} tokens")
            prompts.append(ids[-budget:])
            params.append(SamplingParams(temperature=temperature, max_tokens=max_tokens, stop=until,
                                         top_p=float(kwargs.pop("top_p", 1.0)) if sampled else 1.0))
        outs = self.llm.generate(prompts, params, [self.adapter_for(r) for r in requests])
        texts = [o.text for o in outs]
        for request, text in zip(requests, texts):
            self.cache_hook.add_partial("generate_until", request.args, text)
        return texts


if MODEL_NAME not in model_registry:  # importing twice (python -m, then import) registers once
    register_model(MODEL_NAME)(InlaidLM)


def main() -> None:
    """lm-eval's CLI with the ``inlaid`` model type registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
