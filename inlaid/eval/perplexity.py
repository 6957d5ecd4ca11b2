"""Log-likelihoods from the engine's prompt logprobs: perplexity of a text, lm-eval's scoring calls.

A request with ``prompt_logprobs`` returns ``log p(token_i | tokens_<i)`` for every prompt position
(teacher forcing), so one request scores a whole window. A text longer than the context is scored
in rolling windows over ``[prefix] + tokens`` (the prefix is BOS, or EOS when the tokenizer has no
BOS, so the first token is predicted too): window ``k`` feeds at most ``window`` tokens and scores
the next ``stride`` positions, with everything before them in the window as context. With
``stride = window - 1`` (the default) every window but the last sees one token of context — exactly
lm-eval's ``loglikelihood_rolling`` (``get_rolling_token_windows`` with ``max_seq_len = window - 1``,
``context_len = 1``); a smaller stride trades time for more context per scored token.

    ppl = perplexity(llm, text, adapter="table_to_text")     # PerplexityResult
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

from inlaid.errors import ConfigError, DataError

DEFAULT_MAX_WINDOW = 2048  # tokens per request unless --window says otherwise


def rolling_windows(num_tokens: int, window: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """Windows ``(start, first, end)`` over a sequence of ``num_tokens`` (position 0 the prefix):
    a request feeds ``seq[start:end]`` and scores positions ``first..end-1``. Every position
    ``1..num_tokens-1`` is scored exactly once."""
    stride = window - 1 if stride is None else stride
    if window < 2 or not 1 <= stride <= window - 1:
        raise ConfigError(f"window {window} / stride {stride}: need window >= 2 and 1 <= stride < window")
    out, first = [], 1
    while first < num_tokens:
        end = min(first + stride, num_tokens)
        out.append((max(0, end - window), first, end))
        first = end
    return out


def score_spans(llm, items: list[tuple[list[int], int]], adapters: list[str | None] | str | None = None,
                progress=None) -> list[tuple[float, bool]]:
    """For each ``(token_ids, num_scored)``: the summed logprob of the last ``num_scored`` tokens given
    the ones before, and whether each of them is the greedy (argmax) choice."""
    from inlaid.engine.sequence import SamplingParams

    for ids, num in items:
        if not 1 <= num < len(ids):
            raise ConfigError(f"cannot score {num} of {len(ids)} tokens: need at least one token of context")
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    outs = llm.generate([ids for ids, _ in items], params, adapters, progress=progress)
    results = []
    for (ids, num), out in zip(items, outs):
        positions = out.prompt_logprobs[len(ids) - num:]
        total = sum(p.logprob for p in positions)
        greedy = all(max(p.top, key=p.top.get) == p.token_id for p in positions)
        results.append((total, greedy))
    return results


def prefix_token(tokenizer) -> int:
    for token in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token is not None:
            return token
    raise ConfigError("the tokenizer has neither a BOS nor an EOS token to condition the first token on")


def rolling_logprob(llm, docs: list[list[int]], window: int, stride: int | None = None,
                    adapters: list[str | None] | str | None = None, progress=None) -> list[float]:
    """Total logprob of each token list (every token scored once, see the module docstring)."""
    prefix = prefix_token(llm.tokenizer)
    if adapters is None or isinstance(adapters, str):
        adapters = [adapters] * len(docs)
    items, owners, names = [], [], []
    for d, tokens in enumerate(docs):
        seq = [prefix, *tokens]
        for start, first, end in rolling_windows(len(seq), window, stride):
            items.append((seq[start:end], end - first))
            owners.append(d)
            names.append(adapters[d])
    totals = [0.0] * len(docs)
    for owner, (logprob, _) in zip(owners, score_spans(llm, items, names, progress)):
        totals[owner] += logprob
    return totals


@dataclass
class PerplexityResult:
    variant: str
    adapter: str | None
    num_tokens: int
    nll: float  # total negative log-likelihood, nats
    window: int = 0  # tokens per request
    stride: int = 0  # positions scored per request (the last one fewer)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.num_tokens)

    def to_dict(self) -> dict:
        return {"variant": self.variant, "adapter": self.adapter, "num_tokens": self.num_tokens,
                "window": self.window, "stride": self.stride, "nll": self.nll,
                "nll_per_token": self.nll / self.num_tokens, "perplexity": self.perplexity}


def check_window(window: int | None, stride: int | None) -> None:
    """--window / --stride as given (None: the default); 0 is an error, not the default."""
    if window is not None and window < 2:
        raise ConfigError(f"--window {window}: must be at least 2 tokens")
    if stride is not None and stride < 1:
        raise ConfigError(f"--stride {stride}: must be at least 1 (positions scored per window)")
    if window is not None and stride is not None and stride >= window:
        raise ConfigError(f"--stride {stride}: must be less than --window {window}")


def read_text(path: Path) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if not text.strip():
        raise DataError(f"{path} is empty")
    return text


def perplexity(llm, text: str, variant: str = "", adapter: str | None = None, window: int | None = None,
               stride: int | None = None, progress=None) -> PerplexityResult:
    """Perplexity of ``text`` (one document) under ``llm``, optionally with an adapter."""
    tokens = llm.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not tokens:
        raise DataError("the text has no tokens")
    window = min(llm.engine.max_model_len - 1, DEFAULT_MAX_WINDOW) if window is None else window
    if window > llm.engine.max_model_len - 1:
        raise ConfigError(f"--window {window}: the model's context allows at most {llm.engine.max_model_len - 1}")
    stride = window - 1 if stride is None else stride
    check_window(window, stride)
    (logprob,) = rolling_logprob(llm, [tokens], window, stride, adapter, progress)
    return PerplexityResult(variant, adapter, len(tokens), -logprob, window, stride)


def run_perplexity(variants, path: Path, adapter: str | None = None, adapters_dir: Path | None = None,
                   device: str | None = None, window: int | None = None, stride: int | None = None,
                   engine_options: dict | None = None, progress=None) -> list[PerplexityResult]:
    """Perplexity of the text file ``path`` under every variant (each loaded once, in turn).
    ``progress``: optional callable(variant, done, total)."""
    from inlaid.eval.runner import DEFAULT_ADAPTERS, EngineBackend, check_model_source, example_dir

    check_window(window, stride)
    text = read_text(path)
    adapters = {}
    if adapter is not None:
        adapter_dir = Path(adapters_dir or example_dir(DEFAULT_ADAPTERS)) / adapter
        if not (adapter_dir / "adapter_config.json").is_file():
            raise ConfigError(f"--with-adapter {adapter}: no adapter at {adapter_dir}")
        adapters[adapter] = adapter_dir
    for variant in variants:
        check_model_source(variant.source)
    results = []
    for variant in variants:
        backend = EngineBackend(variant.source, adapters, device, **(engine_options or {}))
        try:
            report = None if progress is None else functools.partial(progress, variant.name)
            results.append(perplexity(backend.llm, text, variant.name, adapter, window, stride, report))
        finally:
            backend.close()
    return results
