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
from inlaid.kernels.transfer import HostCopy, to_device


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


class Sampled:
    """One step's sampled tokens (and requested logprobs), on their way to the host.

    Sampling launches its kernels and starts non-blocking copies into pinned host memory; nothing
    waits for the GPU until ``fetch()``, which waits for these copies only. Under asynchronous
    scheduling the engine launches the next step (which feeds ``tokens`` straight from the device)
    before it fetches this one, so the host's bookkeeping overlaps the GPU's next step.
    """

    def __init__(self, tokens: torch.Tensor, params: list[SamplingParams],
                 logits: torch.Tensor, want: list[int]):
        self.tokens = tokens  # [S] int64 on the logits' device
        self._ns = [params[i].logprobs for i in want]
        self._want = want
        parts = [tokens]
        if want:
            rows = to_device(want, torch.int64, tokens.device)  # a list index would copy and wait
            logprobs = torch.log_softmax(logits.index_select(0, rows), dim=-1)
            parts += logprob_rows(logprobs, tokens.index_select(0, rows), max(self._ns))
        self._copy = HostCopy(parts)
        self._num_rows = len(params)

    def fetch(self) -> tuple[list[int], list[TokenLogprobs | None]]:
        """(token ids, logprobs or None per row); waits for this step's copies only."""
        host = self._copy.wait()
        token_list = host[0].tolist()
        out: list[TokenLogprobs | None] = [None] * self._num_rows
        if self._want:
            chosen = [token_list[i] for i in self._want]
            for i, lp in zip(self._want, token_logprobs(chosen, host[1:], self._ns)):
                out[i] = lp
        return token_list, out


def logprob_rows(logprobs: torch.Tensor, token_ids: torch.Tensor, n: int) -> list[torch.Tensor]:
    """On the device, for rows of log-probabilities [R, V] and one token per row [R]: the tokens'
    logprobs [R], then (``n`` > 0) the top ``n`` values and ids [R, n]."""
    parts = [logprobs.gather(1, token_ids.unsqueeze(1))[:, 0]]
    if n > 0:
        top = torch.topk(logprobs, n, dim=-1)
        parts += [top.values, top.indices]
    return parts


def token_logprobs(token_ids: list[int], parts: list[torch.Tensor], ns: list[int]) -> list[TokenLogprobs]:
    """``logprob_rows``' output (on the host) as one ``TokenLogprobs`` per row, row i keeping its
    top ``ns[i]``."""
    chosen = parts[0].tolist()
    values, ids = (parts[1].tolist(), parts[2].tolist()) if len(parts) > 1 else ([], [])
    return [TokenLogprobs(t, chosen[r], dict(zip(ids[r][:n], values[r][:n])) if n > 0 else {})
            for r, (t, n) in enumerate(zip(token_ids, ns))]


def _safe_probs(probs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``probs`` with NaN / Inf entries (a numerical blow-up in one request's logits) zeroed, and
    a row left with no mass put on its largest logit that is not NaN: ``multinomial`` would otherwise fail
    (on CUDA with a device-side assert), and with it every request of the step. No host sync."""
    probs = torch.nan_to_num(probs, nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0.0)
    fallback = torch.nan_to_num(logits, nan=float("-inf"), posinf=float("inf")).argmax()
    return probs.index_put((fallback.unsqueeze(0),), (probs.sum() <= 0).to(probs.dtype).unsqueeze(0),
                           accumulate=True)


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> Sampled:
    """logits [S, V] fp32 -> the sampled tokens (``Sampled.fetch()`` reads them on the host)."""
    greedy = [i for i, p in enumerate(params) if p.is_greedy]
    if len(greedy) == len(params):  # the common case: one kernel, no row index to upload
        tokens = logits.argmax(-1)
    else:
        tokens = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
        if greedy:
            rows = to_device(greedy, torch.int64, logits.device)
            tokens[rows] = logits[rows].argmax(-1)
    for i, p in enumerate(params):
        if not p.is_greedy:
            probs = _safe_probs(_filter_logits(logits[i], p).softmax(-1), logits[i])
            tokens[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
    return Sampled(tokens, params, logits, [i for i, p in enumerate(params) if p.logprobs is not None])


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A request's own generator (seeded requests) or None (the global RNG)."""
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen
