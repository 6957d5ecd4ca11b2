"""Request and response bodies of the OpenAI API, with vLLM's extensions (``top_k``, ``ignore_eos``,
``/v1/load_lora_adapter``).

Requests are strict: wrong JSON types are refused, not coerced (``"max_tokens": "16"`` is a client
bug). Unknown fields are ignored, since clients send options nobody needs to honour (``user``);
options that would change the result but are not implemented (``n`` > 1, penalties, ``logit_bias``,
``suffix``) are refused with a 400 by the handlers, never silently dropped.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from inlaid.engine.sequence import MAX_LOGPROBS

SEED_RANGE = dict(ge=-(2 ** 63), le=2 ** 64 - 1)  # what torch.Generator.manual_seed accepts
# Messages plus their content parts in one chat request: far more than chats send. Bodies are
# validated on the event loop (~3 us an item), and 400k one-letter messages fit in the body limit:
# unbounded, they held every other request, /health included, for over a second.
MAX_CHAT_ITEMS = 4096
# Token ids plus strings in one completion request's prompt: twice a 128K context. A 400k-id prompt
# took 100-170 ms to validate (this repo's CPU), and a 32 MiB body holds ~5M ids.
MAX_PROMPT_ITEMS = 1 << 18


def _bound(items: int, limit: int, what: str) -> None:
    """The raw-count bound of a field (its items counted before they are validated): a
    ``too_long`` error naming the limit, which the server's error mapper passes through."""
    if items > limit:
        raise PydanticCustomError("too_long", "at most {limit} " + what + ", got {items}",
                                  {"limit": limit, "items": items})


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class GenerationRequest(_Strict):
    model: str | None = None  # None: the base model
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1)  # vLLM extension; 0 or -1 disable it
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = Field(None, **SEED_RANGE)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM extension
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class CompletionRequest(GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # None: whatever the context leaves
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _bounded(cls, prompt):
        """Counted on the raw value, before its items are validated (the cost being bounded)."""
        if not isinstance(prompt, list):
            return prompt  # a string, or a wrong type the type check names
        items = len(prompt)
        if items <= MAX_PROMPT_ITEMS:
            items += sum(len(p) for p in prompt if isinstance(p, list))
        _bound(items, MAX_PROMPT_ITEMS, "token ids and strings in one request's prompt")
        return prompt


class ContentPart(_Strict):
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # deprecated by OpenAI in favour of the next one
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True  # vLLM extension

    @field_validator("messages", mode="before")
    @classmethod
    def _bounded(cls, messages):
        """Counted on the raw list, before each message is validated (the cost being bounded)."""
        if not isinstance(messages, list):
            return messages  # the type check says what is wrong
        items = len(messages)
        if items <= MAX_CHAT_ITEMS:
            items += sum(len(m["content"]) for m in messages
                         if isinstance(m, dict) and isinstance(m.get("content"), list))
        _bound(items, MAX_CHAT_ITEMS, "messages and content parts in one request")
        return messages


class LoadLoraAdapterRequest(_Strict):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoraAdapterRequest(_Strict):
    lora_name: str = Field(min_length=1)


# --- responses ------------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy format, read by lm-eval's ``local-completions`` for loglikelihood: one entry
    per token, the first prompt token's logprob ``None`` (nothing precedes it)."""

    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "inlaid"
    root: str | None = None
    parent: str | None = None  # the base model's id for adapters (vLLM convention)
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
