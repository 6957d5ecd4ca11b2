"""``create_app(engine, settings)``: the FastAPI app — routers, OpenAI-style errors, API key,
metrics, and a lifespan that drains the engine on shutdown."""

from __future__ import annotations

import secrets
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from starlette.responses import Response
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inlaid import __version__
from inlaid.errors import ConfigError
from inlaid.server import adapters, chat, completions, tasks
from inlaid.server.async_engine import AsyncEngine
from inlaid.server.errors import (AuthenticationError, BadRequestError, SafeJSONResponse, UnavailableError,
                                  error_response, install_error_handlers, server_error_response)
from inlaid.server.metrics import CONTENT_TYPE, HttpMetricsMiddleware, ServerMetrics
from inlaid.server.serving import ServerState, get_state
from inlaid.server.settings import ServerSettings, default_model_name

OPEN_PATHS = frozenset({"/health"})


class ApiKeyMiddleware:
    """``Authorization: Bearer KEY`` on every path but /health; 401 otherwise."""

    def __init__(self, app: ASGIApp, api_key: str | None):
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.expected is None or scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        if secrets.compare_digest(given, self.expected):
            await self.app(scope, receive, send)
            return
        response = server_error_response(AuthenticationError(
            "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"))
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)


class _BodyTooLarge(HTTPException):
    def __init__(self, max_bytes: int):
        super().__init__(413, f"the request body is larger than {max_bytes} bytes")


class BodyLimitMiddleware:
    """413 for bodies over ``max_bytes``: at once when Content-Length says so, else while reading."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = next((v for k, v in scope["headers"] if k == b"content-length"), b"")
        if length.isdigit() and int(length) > self.max_bytes:
            exc = _BodyTooLarge(self.max_bytes)
            await error_response(413, exc.detail, BadRequestError.error_type)(scope, receive, send)
            return
        received = 0

        async def receive_with_limit() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise _BodyTooLarge(self.max_bytes)  # FastAPI re-raises HTTPExceptions from the body read
            return message

        await self.app(scope, receive_with_limit, send)


async def _health(request: Request) -> Response:
    engine = get_state(request).engine
    if engine.dead is not None:
        return server_error_response(UnavailableError(f"the engine stopped serving: {engine.dead}"))
    if not engine.is_accepting:
        return server_error_response(UnavailableError("the server is shutting down"))
    return SafeJSONResponse({"status": "ok"})


async def _metrics(request: Request) -> Response:
    return Response(get_state(request).metrics.render(), media_type=CONTENT_TYPE)


def create_app(engine: AsyncEngine, settings: ServerSettings | None = None) -> FastAPI:
    """The HTTP app over ``engine``; leaving the app's lifespan drains and stops the engine."""
    settings = settings or ServerSettings()
    base_name = settings.served_model_name or default_model_name(engine.engine.config.model)
    if base_name in engine.engine.adapters:
        raise ConfigError(f"the base model is served as {base_name!r}, which is also an adapter's name; "
                          "rename the adapter or pass --served-model-name")
    state = ServerState(engine=engine, settings=settings, base_name=base_name,
                        adapter_roots=settings.resolved_adapter_roots(), metrics=ServerMetrics(engine),
                        created=int(time.time()))

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        await engine.shutdown(settings.drain_timeout)
        state.tokenize_pool.shutdown(wait=False)

    # strict_content_type (FastAPI's default) stays on: a body without Content-Type: application/json
    # is refused, so a web page cannot drive a local server with a preflight-free "simple" request.
    app = FastAPI(title="inlaid", version=__version__, lifespan=lifespan,
                  default_response_class=SafeJSONResponse)
    app.state.inlaid = state
    install_error_handlers(app)
    for module in (completions, chat, adapters, tasks):
        app.include_router(module.router)
    app.add_api_route("/health", _health, methods=["GET", "HEAD"])  # load balancers probe with either
    app.add_api_route("/metrics", _metrics, methods=["GET"])
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    app.add_middleware(HttpMetricsMiddleware, metrics=state.metrics)  # outermost: counts 401s too
    return app
