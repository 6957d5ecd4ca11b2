"""HTTP errors as OpenAI-style JSON: ``{"error": {"message", "type", "param", "code"}}``.

Every failure a client can cause maps to a 4xx here; a 500 means a bug or a failed engine step.
Engine errors (``RequestError``, ``AdapterError``: bad sampling options, a prompt over the context,
a corrupt adapter) arrive as :class:`inlaid.errors.InlaidError` and become 400s.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from inlaid.errors import InlaidError

log = logging.getLogger(__name__)


class ServerError(InlaidError):
    """A failure with its HTTP status; ``param`` names the request field at fault."""

    status_code = 500
    error_type = "internal_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class BadRequestError(ServerError):
    status_code, error_type = 400, "invalid_request_error"


class AuthenticationError(ServerError):
    status_code, error_type = 401, "authentication_error"


class PermissionDeniedError(ServerError):
    status_code, error_type = 403, "permission_error"


class NotFoundError(ServerError):
    status_code, error_type = 404, "not_found_error"


class ConflictError(ServerError):
    status_code, error_type = 409, "conflict_error"


class QueueFullError(ServerError):
    status_code, error_type = 429, "rate_limit_error"


class EngineFailedError(ServerError):
    """The engine raised while running the request (a bug or a device failure, not the input)."""

    status_code, error_type = 500, "internal_error"


class UnavailableError(ServerError):
    """Shutting down, or the engine is dead: retry elsewhere."""

    status_code, error_type = 503, "service_unavailable"


def model_not_found(model: str) -> NotFoundError:
    return NotFoundError(f"the model {model!r} does not exist (GET /v1/models lists the served models)",
                         param="model", code="model_not_found")


class SafeJSONResponse(JSONResponse):
    """JSONResponse that survives lone surrogates (JSON ``"\\udc80"`` escapes) in echoed input."""

    def render(self, content: Any) -> bytes:
        try:
            return json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        except UnicodeEncodeError:
            return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_body(message: str, error_type: str, param: str | None = None,
               code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(status: int, message: str, error_type: str, param: str | None = None,
                   code: str | int | None = None, headers: dict | None = None) -> SafeJSONResponse:
    return SafeJSONResponse(error_body(message, error_type, param, code), status_code=status, headers=headers)


def server_error_response(exc: ServerError) -> SafeJSONResponse:
    headers = {"Retry-After": "1"} if exc.status_code in (429, 503) else None
    return error_response(exc.status_code, exc.message, exc.error_type, exc.param, exc.code, headers)


def to_server_error(exc: BaseException) -> ServerError:
    """Any exception as the ServerError a client should see (engine input errors: 400)."""
    if isinstance(exc, ServerError):
        return exc
    if isinstance(exc, InlaidError):
        return BadRequestError(str(exc), param=getattr(exc, "param", None))
    return EngineFailedError(f"internal error: {type(exc).__name__}: {exc}")


_UNION_HINTS = {
    "prompt": "a string, a list of strings, a list of token ids or a list of token-id lists",
    "stop": "a string or a list of strings",
}
_TYPE_TAGS = {"body", "str", "int", "float", "bool", "none", "list", "dict"}


def _is_type_tag(part) -> bool:
    """Union members appear in pydantic error locations ('str', 'list[int]', 'ContentPart')."""
    return isinstance(part, str) and (part in _TYPE_TAGS or "[" in part or part[:1].isupper())


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if errors and errors[0].get("type") == "json_invalid":
        detail = (errors[0].get("ctx") or {}).get("error", "invalid JSON")
        return f"malformed JSON body: {detail}", None
    if errors and tuple(errors[0].get("loc", ())) == ("body",) and isinstance(errors[0].get("input"), bytes):
        return "the request body must be a JSON object (send Content-Type: application/json)", None
    parts, param, seen = [], None, set()
    for err in errors:
        field = ".".join(str(p) for p in err.get("loc", ()) if not _is_type_tag(p))
        top = field.split(".")[0]
        param = param or (top or None)
        if top in _UNION_HINTS and err.get("type") != "too_long":  # one line for the field, not one per member
            if top not in seen:
                parts.append(f"{top}: must be {_UNION_HINTS[top]}")
        elif len(parts) < 3:
            parts.append(f"{field or 'body'}: {err.get('msg', 'invalid value')}")
        seen.add(top)
    return "; ".join(parts) or "invalid request", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServerError)
    async def _server_error(_request: Request, exc: ServerError):
        if exc.status_code >= 500:
            log.error("%s", exc.message)
        return server_error_response(exc)

    @app.exception_handler(InlaidError)
    async def _inlaid_error(_request: Request, exc: InlaidError):
        return error_response(400, str(exc), BadRequestError.error_type)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(400, message, BadRequestError.error_type, param)

    @app.exception_handler(HTTPException)
    async def _http_error(_request: Request, exc: HTTPException):
        error_type = BadRequestError.error_type if exc.status_code < 500 else "internal_error"
        if exc.status_code == 404:
            error_type = NotFoundError.error_type
        return error_response(exc.status_code, str(exc.detail), error_type, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception):
        log.exception("unhandled error")
        return error_response(500, f"internal error: {type(exc).__name__}", "internal_error")
