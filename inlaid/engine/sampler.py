"""Token selection from a step's logits: greedy, temperature, top-k, top-p, per-request seeds, logprobs.

Logprobs are those of the model's own distribution (log-softmax of the raw logits, before
temperature/top-k/top-p), as vLLM and the OpenAI API report them. Greedy rows share one argmax;
sampled rows each draw with their request's generator, so a seeded request gives the same tokens
whatever else shares its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from inlaid.engine.sequence import SamplingParams


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float
    top: dict[int, float]  # the n most likely tokens (n = SamplingParams.logprobs)


def _filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """One row [V] scaled by temperature, with everything outside top-k / top-p set to -inf."""
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens strictly more likely already cover top_p; the first stays
        drop = (probs.cumsum(-1) - probs) >= params.top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> tuple[list[int], list[TokenLogprobs | None]]:
    """logits [S, V] fp32 -> (token ids, logprobs or None per row)."""
    greedy = [i for i, p in enumerate(params) if p.is_greedy]
    if len(greedy) == len(params):  # the common case: one kernel, no row index to upload
        tokens = logits.argmax(-1)
    else:
        tokens = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
        if greedy:
            rows = torch.tensor(greedy, device=logits.device)
            tokens[rows] = logits[rows].argmax(-1)
    for i, p in enumerate(params):
        if not p.is_greedy:
            probs = _filter_logits(logits[i], p).softmax(-1)
            tokens[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
    token_list = tokens.tolist()
    want = [i for i, p in enumerate(params) if p.logprobs is not None]
    out: list[TokenLogprobs | None] = [None] * len(params)
    if want:
        logprobs = torch.log_softmax(logits[want], dim=-1)
        for row, i in enumerate(want):
            out[i] = token_logprobs(logprobs[row], token_list[i], params[i].logprobs)
    return token_list, out


def token_logprobs(logprobs: torch.Tensor, token_id: int, n: int) -> TokenLogprobs:
    """The chosen token's logprob and the top ``n`` of one row of log-probabilities."""
    top = {}
    if n > 0:
        values, ids = torch.topk(logprobs, n)
        top = dict(zip(ids.tolist(), values.tolist()))
    return TokenLogprobs(token_id, float(logprobs[token_id]), top)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A request's own generator (seeded requests) or None (the global RNG)."""
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen
