"""``POST /v1/chat/completions``: messages through the tokenizer's chat template, optional SSE
streaming (a role chunk, content deltas, a finish chunk, an optional usage chunk, ``[DONE]``)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request

from inlaid.engine.llm_engine import RequestOutput
from inlaid.engine.sampler import TokenLogprobs
from inlaid.server.async_engine import RequestStream
from inlaid.server.errors import BadRequestError
from inlaid.server.protocol import (ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                                    ChatCompletionResponse, ChatLogprobs, ChatMessage, ChatResponseMessage,
                                    ChatTokenLogprob, DeltaMessage, TopLogprob, Usage)
from inlaid.server.serving import (ServerState, check_supported, collect, event_stream, finite, get_state,
                                   merge, sse, start_requests, unless_disconnected, usage_event)

router = APIRouter()


def _message_dict(message: ChatMessage, index: int) -> dict:
    content = message.content
    if isinstance(content, list):
        texts = []
        for part in content:
            if part.type != "text" or part.text is None:
                raise BadRequestError(f"messages.{index}: content part of type {part.type!r}: only text "
                                      "parts are supported", param="messages")
            texts.append(part.text)
        content = "\n".join(texts)
    out = {"role": message.role, "content": content or ""}
    if message.name is not None:
        out["name"] = message.name
    return out


def chat_prompt_ids(state: ServerState, body: ChatCompletionRequest) -> list[int]:
    messages = [_message_dict(m, i) for i, m in enumerate(body.messages)]
    tokenizer = state.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise BadRequestError("this model has no chat template; use /v1/completions", param="messages")
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=body.add_generation_prompt,
                                             tokenize=False)
    except Exception as exc:  # the template's own raise_exception (e.g. roles must alternate)
        raise BadRequestError(f"the chat template rejected these messages: {exc}", param="messages") from None
    # the template writes the special tokens (BOS) itself
    return state.encode(text, add_special_tokens=False, param="messages")


def _top_logprob(state: ServerState, token_id: int, logprob: float) -> TopLogprob:
    token = state.token_text(token_id)
    return TopLogprob(token=token, logprob=finite(logprob), bytes=list(token.encode("utf-8")))


def chat_logprobs(state: ServerState, token_ids: list[int], logprobs: list[TokenLogprobs],
                  n: int) -> ChatLogprobs:
    content = []
    for token_id, lp in zip(token_ids, logprobs):
        top = sorted(lp.top.items(), key=lambda kv: -kv[1])[:n]
        chosen = _top_logprob(state, token_id, lp.logprob)
        content.append(ChatTokenLogprob(**chosen.model_dump(),
                                        top_logprobs=[_top_logprob(state, i, v) for i, v in top]))
    return ChatLogprobs(content=content)


def _usage(out: RequestOutput) -> Usage:
    prompt, completion = len(out.prompt_token_ids), len(out.output_token_ids)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _chunk(request_id: str, created: int, model: str, delta: DeltaMessage,
           logprobs: ChatLogprobs | None = None, finish_reason: str | None = None) -> str:
    chunk = ChatCompletionChunk(id=request_id, created=created, model=model, choices=[
        ChatChunkChoice(index=0, delta=delta, logprobs=logprobs, finish_reason=finish_reason)])
    payload = chunk.model_dump(exclude={"usage"})
    payload["choices"][0]["delta"] = delta.model_dump(exclude_none=True)
    return sse(payload)


async def _stream(body: ChatCompletionRequest, stream: RequestStream, state: ServerState, request_id: str,
                  model: str, created: int) -> AsyncIterator[str]:
    yield _chunk(request_id, created, model, DeltaMessage(role="assistant", content=""))
    num_sent = 0
    final = None
    async for _, out in merge([stream]):
        logprobs = None
        if body.logprobs:
            logprobs = chat_logprobs(state, out.output_token_ids[num_sent:], (out.logprobs or [])[num_sent:],
                                     body.top_logprobs or 0)
        num_sent = len(out.output_token_ids)
        if out.finished:
            final = out
            state.metrics.observe_finished(out)
            delta = DeltaMessage(content=out.delta_text) if out.delta_text else DeltaMessage()
            yield _chunk(request_id, created, model, delta, logprobs, out.finish_reason)
        elif out.delta_text or (logprobs and logprobs.content):
            yield _chunk(request_id, created, model, DeltaMessage(content=out.delta_text), logprobs)
    if final is not None and body.stream_options and body.stream_options.include_usage:
        yield usage_event(request_id, "chat.completion.chunk", created, model, _usage(final).model_dump())


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    state = get_state(request)
    check_supported(body)
    if body.top_logprobs is not None and not body.logprobs:
        raise BadRequestError("top_logprobs needs logprobs=true", param="top_logprobs")
    adapter = state.adapter_for(body.model)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    logprobs = (body.top_logprobs or 0) if body.logprobs else None

    def encode_and_check():
        ids = chat_prompt_ids(state, body)
        return ids, state.sampling_params(body, max_tokens, len(ids), logprobs, prompt_param="messages")

    ids, sampling = await state.off_loop(encode_and_check)
    request_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    model = body.model or state.base_name
    streams = await start_requests(state, [ids], [sampling], adapter, request_id)
    if body.stream:
        return event_stream(state, _stream(body, streams[0], state, request_id, model, created), streams)
    outputs = await unless_disconnected(request, collect(state, streams))
    if not isinstance(outputs, list):
        return outputs  # the client left
    out = outputs[0]
    logprobs_out = chat_logprobs(state, out.output_token_ids, out.logprobs or [], body.top_logprobs or 0) \
        if body.logprobs else None
    choice = ChatChoice(index=0, message=ChatResponseMessage(content=out.text), logprobs=logprobs_out,
                        finish_reason=out.finish_reason)
    return ChatCompletionResponse(id=request_id, created=created, model=model, choices=[choice],
                                  usage=_usage(out))
