"""One request's state inside the engine: its sampling options and its token/KV bookkeeping.

Torch-free on purpose: the scheduler and block manager only read and write these fields, so they are
tested on the CPU without a model.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from enum import Enum

from inlaid.errors import RequestError

GREEDY_BELOW = 1e-5  # temperatures below this sample greedily
MAX_LOGPROBS = 20  # vLLM's default cap; more makes every step return a large top-k per token
MAX_STOP_STRINGS = 64  # each output token is searched for every one (OpenAI allows 4)


def _is_int(value: object) -> bool:
    # bool is an int subclass; True as max_tokens is a caller bug, not 1
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. ``temperature == 0`` (or below 1e-5) means greedy.

    ``top_k`` of 0 or -1 disables top-k (both spellings are common in OpenAI/vLLM clients);
    ``top_p == 1`` disables nucleus sampling; ``logprobs=None`` returns none, ``n`` returns the top n.
    ``prompt_logprobs`` scores every prompt token too; such requests skip the prefix cache, since a
    cached token is never computed.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # also score the prompt (OpenAI ``echo`` + ``logprobs``)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # a lone string is one stop string, not its characters
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        self._check_numbers()
        self._check_options()

    def _check_numbers(self) -> None:
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) \
                or self.temperature < 0:
            raise RequestError(f"temperature {self.temperature!r}: must be a finite number >= 0", "temperature")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p {self.top_p!r}: must be in (0, 1]", "top_p")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise RequestError(f"top_k {self.top_k!r}: must be an integer >= 1, or 0/-1 to disable", "top_k")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise RequestError(f"max_tokens {self.max_tokens!r}: must be an integer >= 1", "max_tokens")

    def _check_options(self) -> None:
        if not all(isinstance(s, str) and s for s in self.stop):
            raise RequestError(f"stop {self.stop!r}: stop sequences must be non-empty strings", "stop")
        if len(self.stop) > MAX_STOP_STRINGS:  # every output token is searched for each of them
            raise RequestError(f"stop: {len(self.stop)} stop sequences; at most {MAX_STOP_STRINGS}", "stop")
        if self.seed is not None and (not _is_int(self.seed) or not -2 ** 63 <= self.seed < 2 ** 64):
            raise RequestError(f"seed {self.seed!r}: must be an integer in [-2**63, 2**64) (torch's range) or None",
                               "seed")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise RequestError(f"{name} {value!r}: must be an integer in [0, {MAX_LOGPROBS}]", name)

    @property
    def is_greedy(self) -> bool:
        # below 1e-5, logits / temperature overflows fp32: the limit is greedy anyway (as in vLLM)
        return self.temperature < GREEDY_BELOW


class SequenceStatus(Enum):
    WAITING = "waiting"  # queued, holds no KV blocks
    RUNNING = "running"  # holds KV blocks; may still be mid-prefill
    PREEMPTED = "preempted"  # lost its blocks to memory pressure; waits to recompute its tokens
    FINISHED = "finished"


class Sequence:
    """A request: prompt + generated tokens, its adapter (task), and where its KV lives.

    ``num_computed_tokens`` counts tokens whose KV is already in the cache (prefix-cache hits
    included). An unfinished sequence always has ``num_computed_tokens < num_tokens``: the
    tokens in between are what the next steps must feed to the model.

    ``num_placeholders`` counts sampled tokens whose values the host does not know yet: with
    asynchronous scheduling the engine schedules and launches step N + 1 before it reads step N's
    tokens back, so those tokens sit at the end of the sequence as placeholders (``num_tokens``
    counts them, ``token_ids`` does not); the runner feeds them from the device. They resolve in
    order (``Scheduler.resolve``).
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int],
                 sampling: SamplingParams | None = None, adapter: str | None = None,
                 arrival_time: float | None = None) -> None:
        if not prompt_token_ids:
            raise RequestError(f"request {request_id!r}: the prompt is empty")
        if not all(_is_int(t) and t >= 0 for t in prompt_token_ids):
            raise RequestError(f"request {request_id!r}: token ids must be non-negative integers")
        self.request_id = request_id
        self.adapter = adapter  # None serves the base model; otherwise the adapter == task name
        self.sampling = sampling if sampling is not None else SamplingParams()
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None  # "stop" | "length" | "abort"
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.first_token_time: float | None = None  # on the scheduler's clock (SLO-aware ordering)
        self.arrival_index = -1  # set by the scheduler: a total order for ties and fcfs
        self.arrival_step = 0  # scheduler step at arrival; aging counts steps from here
        self.predicted_output_len: float | None = None
        self.num_preemptions = 0
        # KV bookkeeping, owned by the block manager and the scheduler
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # content hash chain of full blocks (grows lazily)
        self.num_cached_tokens = 0  # prefix-cache hits at the last allocation
        self.num_computed_tokens = 0
        self.num_scheduled_tokens = 0  # tokens the current step feeds to the model
        self.num_placeholders = 0  # sampled tokens not read back yet (asynchronous scheduling)

    def __len__(self) -> int:
        return self.num_tokens

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, adapter={self.adapter!r}, status={self.status.name}, "
                f"tokens={self.num_prompt_tokens}+{self.num_output_tokens})")

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) + self.num_placeholders

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def resolve_placeholder(self, token_id: int) -> None:
        """The oldest placeholder's value arrived: it becomes a real token."""
        if self.num_placeholders < 1:
            raise RuntimeError(f"{self.request_id}: no placeholder to resolve")
        self.num_placeholders -= 1
        self.append_token(token_id)
