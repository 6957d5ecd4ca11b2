"""The offline API: ``LLM(model, adapters=...).generate(prompts, sampling, adapters)``.

Used by ``inlaid eval`` and ``inlaid bench``; a thin loop around :class:`LLMEngine` that submits
every prompt, steps until all finish and returns the outputs in prompt order.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

from inlaid.engine.llm_engine import EngineConfig, LLMEngine, RequestOutput
from inlaid.engine.sequence import SamplingParams
from inlaid.errors import RequestError


def _per_prompt(value, n: int, what: str) -> list:
    if value is None or isinstance(value, (str, SamplingParams)):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise RequestError(f"{len(value)} {what} for {n} prompts")
    return value


class LLM:
    def __init__(self, model: str = "default", adapters: dict[str, str] | None = None, **engine_options):
        self.engine = LLMEngine(EngineConfig(model=model, adapters=dict(adapters or {}), **engine_options))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def chat_prompt(self, user_message: str) -> list[int]:
        """Token ids of one user turn under the model's chat template, ready for the answer."""
        ids = self.tokenizer.apply_chat_template([{"role": "user", "content": user_message}],
                                                 add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def generate(self, prompts: str | Seq[str] | Seq[list[int]],
                 sampling: SamplingParams | Seq[SamplingParams] | None = None,
                 adapters: str | Seq[str | None] | None = None,
                 progress=None) -> list[RequestOutput]:
        """Run every prompt to completion. ``adapters``: one name for all, or one per prompt
        (None = base model). ``progress``: optional callable(done, total) after each finished request."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        samplings = _per_prompt(sampling, len(prompts), "sampling params")
        names = _per_prompt(adapters, len(prompts), "adapters")
        # vLLM's order (sampling, then adapters): name the mix-up instead of failing deep inside
        if not all(p is None or isinstance(p, SamplingParams) for p in samplings):
            raise RequestError("generate(prompts, sampling, adapters): sampling must be SamplingParams "
                               "(one, or one per prompt); adapter names go in the third argument")
        if not all(n is None or isinstance(n, str) for n in names):
            raise RequestError("generate(prompts, sampling, adapters): adapters must be adapter names "
                               "(one, or one per prompt; None = the base model)")
        engine = self.engine
        ids: list[str] = []
        finished: dict[str, RequestOutput] = {}
        try:
            for prompt, params, adapter in zip(prompts, samplings, names):
                ids.append(engine.add_request(prompt, params or SamplingParams(), adapter))
            while engine.has_unfinished_requests():
                for out in engine.step(finished_only=True):
                    if out.finished:
                        finished[out.request_id] = out
                        if progress is not None:
                            progress(len(finished), len(ids))
        except BaseException:  # bad input, Ctrl-C, an error: leave the engine empty and reusable
            for request_id in ids:
                engine.abort_request(request_id)
            raise
        return [finished[i] for i in ids]
