"""``POST /v1/completions``: one or more prompts (text or token ids), optional SSE streaming, and
``echo`` + ``logprobs`` for prompt scoring in OpenAI's legacy logprobs format (lm-eval's
``local-completions`` reads ``token_logprobs[ctxlen:-1]`` of an echo request with max_tokens=1)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request

from inlaid.engine.llm_engine import RequestOutput
from inlaid.engine.sampler import TokenLogprobs
from inlaid.engine.sequence import SamplingParams
from inlaid.server.async_engine import RequestStream
from inlaid.server.errors import BadRequestError
from inlaid.server.protocol import (CompletionChoice, CompletionLogprobs, CompletionRequest,
                                    CompletionResponse, Usage)
from inlaid.server.serving import (ServerState, check_supported, collect, event_stream, finite, get_state,
                                   merge, sse, start_requests, unless_disconnected, usage_event)

router = APIRouter()


def _prompt_list(prompt) -> list[str | list[int]]:
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise BadRequestError("prompt is empty", param="prompt")
    return prompts


def _check_options(body: CompletionRequest) -> None:
    check_supported(body)
    if body.suffix:
        raise BadRequestError("suffix is not supported", param="suffix")
    if body.best_of not in (None, 1):
        raise BadRequestError("best_of > 1 is not supported", param="best_of")


def _encode_and_check(state: ServerState, body: CompletionRequest,
                      prompts: list[str | list[int]]) -> tuple[list[list[int]], list[SamplingParams]]:
    """Each prompt's token ids and SamplingParams, one prompt at a time: the first prompt that does
    not fit refuses the request before the rest are tokenized."""
    prompt_logprobs = body.logprobs if body.echo else None
    ids, samplings = [], []
    for prompt in prompts:
        ids.append(state.encode(prompt) if isinstance(prompt, str) else state.check_token_ids(prompt))
        samplings.append(state.sampling_params(body, body.max_tokens, len(ids[-1]), body.logprobs,
                                               prompt_logprobs))
    return ids, samplings


def completion_logprobs(state: ServerState, token_ids: list[int], logprobs: list[TokenLogprobs | None],
                        text_offset: int = 0) -> CompletionLogprobs:
    """One entry per token; the chosen token is always in its ``top_logprobs`` (vLLM's habit), with
    its own logprob where another token decodes to the same text (bytes of a split character all
    show as U+FFFD). ``text_offset`` counts the characters of the tokens' own texts from
    ``text_offset``: a character split over several tokens advances it once per token."""
    out = CompletionLogprobs()
    for token_id, lp in zip(token_ids, logprobs):
        token = state.token_text(token_id)
        out.tokens.append(token)
        out.text_offset.append(text_offset)
        text_offset += len(token)
        if lp is None:  # the first prompt token: nothing precedes it
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        top = {state.token_text(t): finite(v) for t, v in lp.top.items()}
        top[token] = finite(lp.logprob)
        out.token_logprobs.append(finite(lp.logprob))
        out.top_logprobs.append(top)
    return out


class _Choice:
    """Per-prompt bookkeeping: what the client gets back for one prompt."""

    def __init__(self, state: ServerState, body: CompletionRequest, prompt: str | list[int], ids: list[int]):
        self.state, self.body, self.prompt, self.ids = state, body, prompt, ids
        self.num_sent_tokens = 0  # streaming: output tokens already sent
        self.next_offset = 0  # streaming: the next output token's text_offset

    def prompt_part(self, out: RequestOutput) -> tuple[str, CompletionLogprobs | None]:
        if not self.body.echo:
            return "", None
        lps = None
        if self.body.logprobs is not None:
            lps = completion_logprobs(self.state, out.prompt_token_ids, out.prompt_logprobs or [None])
        text = self.prompt if isinstance(self.prompt, str) else self.state.tokenizer.decode(self.ids)
        return text, lps

    def output_part(self, out: RequestOutput, text_offset: int) -> CompletionLogprobs | None:
        if self.body.logprobs is None:
            return None
        start = self.num_sent_tokens
        return completion_logprobs(self.state, out.output_token_ids[start:], (out.logprobs or [])[start:],
                                   text_offset)

    def final(self, index: int, out: RequestOutput) -> CompletionChoice:
        text, lps = self.prompt_part(out)
        out_lps = self.output_part(out, len(text))
        if out_lps is not None:
            lps = _join(lps, out_lps)
        return CompletionChoice(index=index, text=text + out.text, logprobs=lps,
                                finish_reason=out.finish_reason)

    def delta(self, index: int, out: RequestOutput) -> CompletionChoice | None:
        """The chunk for what ``out`` adds; its text_offsets continue as :meth:`final`'s would."""
        first = self.num_sent_tokens == 0
        text, lps = self.prompt_part(out) if first else ("", None)
        if first:
            self.next_offset = len(text)
        text += out.delta_text
        out_lps = self.output_part(out, self.next_offset)
        if out_lps is not None:
            if out_lps.tokens:
                self.next_offset = out_lps.text_offset[-1] + len(out_lps.tokens[-1])
            lps = _join(lps, out_lps)
        self.num_sent_tokens = len(out.output_token_ids)
        if not text and not out.finished and not (lps and lps.tokens):
            return None
        return CompletionChoice(index=index, text=text, logprobs=lps,
                                finish_reason=out.finish_reason if out.finished else None)


def _join(a: CompletionLogprobs | None, b: CompletionLogprobs) -> CompletionLogprobs:
    if a is None:
        return b
    return CompletionLogprobs(tokens=a.tokens + b.tokens, token_logprobs=a.token_logprobs + b.token_logprobs,
                              top_logprobs=a.top_logprobs + b.top_logprobs,
                              text_offset=a.text_offset + b.text_offset)


def _usage(outputs: list[RequestOutput]) -> Usage:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(o.output_token_ids) for o in outputs)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def _stream(body: CompletionRequest, choices: list[_Choice], streams: list[RequestStream],
                  state: ServerState, request_id: str, model: str, created: int) -> AsyncIterator[str]:
    finals: list[RequestOutput] = []
    async for index, out in merge(streams):
        choice = choices[index].delta(index, out)
        if choice is not None:
            chunk = CompletionResponse(id=request_id, created=created, model=model, choices=[choice])
            yield sse(chunk.model_dump(exclude={"usage"}))
        if out.finished:
            state.metrics.observe_finished(out)
            finals.append(out)
    if body.stream_options and body.stream_options.include_usage:
        yield usage_event(request_id, "text_completion", created, model, _usage(finals).model_dump())


@router.post("/v1/completions")
async def create_completion(body: CompletionRequest, request: Request):
    state = get_state(request)
    _check_options(body)
    adapter = state.adapter_for(body.model)
    prompts = _prompt_list(body.prompt)
    ids, samplings = await state.off_loop(lambda: _encode_and_check(state, body, prompts))
    choices = [_Choice(state, body, p, i) for p, i in zip(prompts, ids)]
    request_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    model = body.model or state.base_name
    streams = await start_requests(state, ids, samplings, adapter, request_id)
    if body.stream:
        events = _stream(body, choices, streams, state, request_id, model, created)
        return event_stream(state, events, streams)
    outputs = await unless_disconnected(request, collect(state, streams))
    if not isinstance(outputs, list):
        return outputs  # the client left
    return CompletionResponse(id=request_id, created=created, model=model, usage=_usage(outputs),
                              choices=[c.final(i, o) for i, (c, o) in enumerate(zip(choices, outputs))])
