"""What the completion and chat handlers share: the app's state, ``model`` -> adapter, prompts ->
token ids, request options -> SamplingParams, running requests (a client that leaves aborts them)
and SSE framing."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from fastapi import Request
from starlette.background import BackgroundTask
from starlette.responses import Response, StreamingResponse

from inlaid.engine.llm_engine import LLMEngine, RequestOutput
from inlaid.engine.sequence import SamplingParams
from inlaid.errors import RequestError
from inlaid.server.async_engine import AsyncEngine, RequestStream
from inlaid.server.errors import BadRequestError, error_body, model_not_found, to_server_error
from inlaid.server.metrics import ServerMetrics
from inlaid.server.protocol import GenerationRequest
from inlaid.server.settings import ServerSettings

GREEDY_BELOW = 1e-5  # smaller temperatures overflow softmax; treated as greedy, as vLLM does
MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM reports this floor too
SSE_DONE = "data: [DONE]\n\n"
MAX_CHARS_PER_TOKEN = 64  # a text longer than this times the context cannot fit (real text: ~4)
T = TypeVar("T")
CLIENT_CLOSED = 499  # nginx's status for "client closed the request": nobody reads it


@dataclass
class ServerState:
    engine: AsyncEngine
    settings: ServerSettings
    base_name: str  # what ``model`` must say to get the base model
    adapter_roots: tuple[Path, ...]
    metrics: ServerMetrics
    created: int  # unix time the server started (the models' ``created``)
    _token_text: dict[int, str] = field(default_factory=dict)
    task_adder: object | None = None  # inlaid.engine.task_addition.TaskAdder, made on first use
    tokenize_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="inlaid-tokenize"))

    @property
    def llm(self) -> LLMEngine:
        return self.engine.engine

    @property
    def tokenizer(self):
        return self.llm.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.llm.max_model_len

    def adapter_for(self, model: str | None) -> str | None:
        """The adapter ``model`` names, None for the base; unknown names are a 404."""
        if model is None or model == self.base_name:
            return None
        if model in self.llm.adapters:  # a dict lookup; the engine thread re-checks on add
            return model
        raise model_not_found(model)

    def encode(self, text: str, add_special_tokens: bool = True, param: str = "prompt") -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequestError(f"{param} is not valid Unicode (an unpaired surrogate escape)",
                                  param=param) from None
        if len(text) > MAX_CHARS_PER_TOKEN * self.max_model_len:  # don't spend seconds tokenizing it
            raise BadRequestError(f"{param} is far longer than this model's context length "
                                  f"({self.max_model_len} tokens)", param=param)
        ids = list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
        if not ids:
            raise BadRequestError(f"{param} is empty", param=param)
        return ids

    def check_token_ids(self, ids: list[int], param: str = "prompt") -> list[int]:
        if not ids:
            raise BadRequestError(f"{param} is empty", param=param)
        vocab_size = self.llm.model.shape.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise BadRequestError(f"{param}: token id {bad} is outside the vocabulary [0, {vocab_size})",
                                  param=param)
        return ids

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            try:
                text = self.tokenizer.decode([token_id])
            except Exception:  # an id the tokenizer lacks (model vocab padded past it)
                text = ""
            self._token_text[token_id] = text
        return text

    def sampling_params(self, req: GenerationRequest, max_tokens: int | None, num_prompt_tokens: int,
                        logprobs: int | None = None, prompt_logprobs: int | None = None,
                        prompt_param: str = "prompt") -> SamplingParams:
        """Checks the context budget (a 400 that names the numbers) and builds SamplingParams."""
        limit = self.max_model_len
        room = limit - num_prompt_tokens
        if room < 1:
            raise BadRequestError(f"the prompt has {num_prompt_tokens} tokens; this model's context length "
                                  f"is {limit}, which leaves no room to generate", param=prompt_param)
        bm = self.llm.block_manager
        capacity = bm.num_blocks * bm.block_size
        kv_room = capacity + 1 - num_prompt_tokens  # the last sampled token needs no KV slot
        if max_tokens is None:  # all the context leaves, within what the KV cache can ever hold
            max_tokens = min(room, kv_room)
            if max_tokens < 1:
                raise BadRequestError(f"the prompt has {num_prompt_tokens} tokens, more than the KV cache "
                                      f"holds ({capacity})", param=prompt_param)
        elif max_tokens > room:
            raise BadRequestError(f"this model's context length is {limit} tokens, but {num_prompt_tokens} "
                                  f"prompt tokens + max_tokens {max_tokens} were requested; shorten the "
                                  "prompt or lower max_tokens", param="max_tokens")
        elif max_tokens > kv_room:
            raise BadRequestError(f"{num_prompt_tokens} prompt tokens + max_tokens {max_tokens} need more KV "
                                  f"cache than this server has ({capacity} token slots); lower max_tokens "
                                  f"to at most {max(kv_room, 0)}", param="max_tokens")
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        temperature = 0.0 if req.temperature < GREEDY_BELOW else req.temperature
        try:
            return SamplingParams(temperature=temperature, top_p=req.top_p, top_k=req.top_k,
                                  max_tokens=max_tokens, stop=stop, seed=req.seed, logprobs=logprobs,
                                  prompt_logprobs=prompt_logprobs, ignore_eos=req.ignore_eos)
        except RequestError as exc:
            raise BadRequestError(str(exc), param=exc.param) from None

    async def off_loop(self, work: Callable[[], T]) -> T:
        """Run ``work`` (tokenizing, templating and checking a request's prompts) on the server's one
        tokenizer thread, not the event loop: a large body's seconds of tokenizing no longer stall
        every other request, /health included, and the tokenizer's calls stay one at a time, as
        they were on the loop."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenize_pool, work)


def check_supported(req: GenerationRequest) -> None:
    """Refuse options that would change the result but are not implemented."""
    if req.n != 1:
        raise BadRequestError(f"n={req.n}: only n=1 is supported", param="n")
    if req.presence_penalty or req.frequency_penalty:
        raise BadRequestError("presence_penalty and frequency_penalty are not supported",
                              param="presence_penalty" if req.presence_penalty else "frequency_penalty")
    if req.logit_bias:
        raise BadRequestError("logit_bias is not supported", param="logit_bias")
    if req.stream_options is not None and not req.stream:
        raise BadRequestError("stream_options is only allowed with stream=true", param="stream_options")


def get_state(request: Request) -> ServerState:
    return request.app.state.inlaid


def finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else MIN_LOGPROB


# --- running requests -----------------------------------------------------------------------------
async def start_requests(state: ServerState, prompts: list[list[int]], samplings: list[SamplingParams],
                         adapter: str | None, request_id: str) -> list[RequestStream]:
    """Queue one engine request per prompt; all or none (a later refusal aborts the earlier ones)."""
    streams: list[RequestStream] = []
    try:
        for i, (ids, sampling) in enumerate(zip(prompts, samplings)):
            streams.append(await state.engine.generate(ids, sampling, adapter, f"{request_id}-{i}"))
    except BaseException:
        abort_all(streams)
        raise
    return streams


def abort_all(streams: list[RequestStream]) -> None:
    for stream in streams:
        stream.abort()


async def _final(stream: RequestStream) -> RequestOutput:
    final = None
    async with stream:
        async for out in stream:
            final = out
    assert final is not None and final.finished
    return final


async def collect(state: ServerState, streams: list[RequestStream]) -> list[RequestOutput]:
    """Every request's final output, in order. Errors and cancellation abort the others."""
    try:
        if len(streams) == 1:
            outputs = [await _final(streams[0])]
        else:
            try:
                async with asyncio.TaskGroup() as group:
                    tasks = [group.create_task(_final(s)) for s in streams]
            except BaseExceptionGroup as eg:
                raise eg.exceptions[0] from None
            outputs = [t.result() for t in tasks]
    except asyncio.CancelledError:
        abort_all(streams)
        state.metrics.finished.labels("abort").inc()
        raise
    except Exception:
        abort_all(streams)
        state.metrics.finished.labels("error").inc()
        raise
    for out in outputs:
        state.metrics.observe_finished(out)
    return outputs


async def merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from several streams as they come; leaving early aborts them all."""
    if len(streams) == 1:
        async with streams[0]:
            async for out in streams[0]:
                yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                queue.put_nowait((index, out))
        except Exception as exc:
            queue.put_nowait((index, exc))
        queue.put_nowait((index, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        abort_all(streams)


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable):
    """Await ``work``; if the client disconnects first, cancel it (which aborts its requests) and
    return a 499 nobody will read. Streaming responses get the same from Starlette itself."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        watcher.cancel()
        raise
    watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return Response(status_code=CLIENT_CLOSED)


# --- SSE ------------------------------------------------------------------------------------------
def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def usage_event(request_id: str, obj: str, created: int, model: str, usage: dict) -> str:
    """The last chunk of a stream with ``stream_options.include_usage``: no choices, the usage."""
    return sse({"id": request_id, "object": obj, "created": created, "model": model, "choices": [],
                "usage": usage})


async def sse_with_errors(state: ServerState, events: AsyncIterator[str]) -> AsyncIterator[str]:
    """An event stream that ends in ``data: [DONE]`` even when the request fails mid-way (the
    status line is already sent, so the error goes in an event, as vLLM and OpenAI do)."""
    try:
        async for event in events:
            yield event
    except Exception as exc:
        state.metrics.finished.labels("error").inc()
        err = to_server_error(exc)
        yield sse(error_body(err.message, err.error_type, err.param, err.code))
    except BaseException:  # cancelled or closed: the client left
        state.metrics.finished.labels("abort").inc()
        raise
    yield SSE_DONE


def event_stream(state: ServerState, events: AsyncIterator[str], streams: list[RequestStream]) -> Response:
    # The background task aborts the requests even if the client left before the body started.
    return StreamingResponse(sse_with_errors(state, events), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                             background=BackgroundTask(abort_all, streams))
