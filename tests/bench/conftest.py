"""Bench fixtures: tiny workloads, an in-process uvicorn server on 127.0.0.1 (the real inlaid server
when it imports, else a stub), and a stub OpenAI-compatible ASGI app that streams like the API does."""

from __future__ import annotations

import asyncio
import json

from inlaid.bench.requests import workload_from_spec
from inlaid.bench.workload import LengthProfile, LengthRange, WorkloadSpec
from inlaid.engine.llm_engine import EngineConfig

from ..server.conftest import live_server  # noqa: F401  (one uvicorn-in-a-thread helper for both suites)

# Small enough that a run takes about a second on a busy 2-core CPU.
TINY_ENGINE = dict(model="dummy:tiny", num_kv_blocks=128, block_size=4, max_loras=2, max_num_seqs=8,
                   max_num_batched_tokens=64)


def tiny_engine_config(**overrides) -> EngineConfig:
    return EngineConfig(**{**TINY_ENGINE, "policy": "inlaid", **overrides})


def tiny_workload(num_requests: int = 6, num_adapters: int = 3, **overrides):
    spec = WorkloadSpec(num_requests, pattern=overrides.pop("pattern", "powerlaw"), num_adapters=num_adapters,
                        arrival=overrides.pop("arrival", "all-at-once"),
                        lengths=LengthProfile(LengthRange(4, 12), LengthRange(2, 6)), **overrides)
    return workload_from_spec(spec)


STUB_MODELS = ["base", "task-a", "task-b", "task-c"]


async def stub_openai_app(scope, receive, send):
    """The OpenAI wire format only: GET /v1/models (adapters carry a parent), POST /v1/completions
    with stream=true answering one SSE chunk per token (a few ms apart), a usage chunk, [DONE]."""
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"] == "/v1/models":
        cards = [{"id": m, "object": "model", "parent": None if m == "base" else "base"} for m in STUB_MODELS]
        await _respond(send, 200, "application/json", json.dumps({"object": "list", "data": cards}).encode())
        return
    request = json.loads(body)
    if request.get("model") not in STUB_MODELS:
        error = {"error": {"message": f"model {request.get('model')!r} not found", "type": "NotFoundError"}}
        await _respond(send, 404, "application/json", json.dumps(error).encode())
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream")]})
    for i in range(request["max_tokens"]):
        await asyncio.sleep(0.002)
        chunk = {"id": "cmpl-stub", "object": "text_completion", "model": request["model"],
                 "choices": [{"index": 0, "text": f"t{i} ",
                              "finish_reason": "length" if i == request["max_tokens"] - 1 else None}]}
        await send({"type": "http.response.body", "body": f"data: {json.dumps(chunk)}\n\n".encode(),
                    "more_body": True})
    usage = {"choices": [], "usage": {"prompt_tokens": len(request["prompt"]),
                                      "completion_tokens": request["max_tokens"]}}
    await send({"type": "http.response.body", "body": f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode(),
                "more_body": False})


async def _respond(send, status: int, content_type: str, payload: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type.encode())]})
    await send({"type": "http.response.body", "body": payload})
