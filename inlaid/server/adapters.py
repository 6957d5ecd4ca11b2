"""``GET /v1/models`` (base + adapters, vLLM style: an adapter's ``parent`` is the base's id) and
run-time adapter changes, ``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter``.

Loading reads a directory on the server's disk, so it is confined to ``--adapter-root`` directories:
the path is resolved (symlinks and ``..`` included) before the check, and loading is off when no root
is configured. Adapters given at start-up (``--adapter``, a checkpoint's tasks) are not restricted.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from fastapi import APIRouter, Request
from starlette.responses import PlainTextResponse

from inlaid.engine.adapters import check_adapter_name
from inlaid.errors import AdapterError
from inlaid.server.errors import BadRequestError, PermissionDeniedError, model_not_found
from inlaid.server.protocol import LoadLoraAdapterRequest, ModelCard, ModelList, UnloadLoraAdapterRequest
from inlaid.server.serving import ServerState, get_state

router = APIRouter()


def resolve_adapter_path(raw: str, roots: tuple[Path, ...]) -> Path:
    """``raw`` (absolute, or relative to a root) resolved, if it lies under one of ``roots``."""
    if not roots:
        raise PermissionDeniedError("loading adapters at run time is disabled; start the server with "
                                    "--adapter-root DIR to allow adapters under DIR", param="lora_path")
    try:
        given = Path(raw)
        bases = [given] if given.is_absolute() else [root / given for root in roots]
        candidates = [p.resolve() for p in bases]
        inside = [p for p in candidates if any(p.is_relative_to(root) for root in roots)]
        if not inside:
            raise PermissionDeniedError(f"lora_path {raw!r} is outside the allowed adapter roots",
                                        param="lora_path")
        found = next((p for p in inside if p.is_dir()), None)
    except (OSError, ValueError, RuntimeError) as exc:  # NUL bytes, undecodable names, symlink loops
        raise BadRequestError(f"lora_path {raw!r}: {exc}", param="lora_path") from None
    if found is None:
        raise BadRequestError(f"lora_path {raw!r}: no such adapter directory", param="lora_path")
    return found


def _card(state: ServerState, model_id: str, root: str | None, parent: str | None) -> ModelCard:
    return ModelCard(id=model_id, created=state.created, root=root, parent=parent,
                     max_model_len=state.max_model_len)


async def _cards(state: ServerState) -> list[ModelCard]:
    adapters = await state.engine.adapters()
    base_path = state.llm.model_path  # None for dummy:<shape> models
    cards = [_card(state, state.base_name, str(base_path) if base_path else None, None)]
    cards += [_card(state, name, path, state.base_name) for name, path in sorted(adapters.items())]
    return cards


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    return ModelList(data=await _cards(get_state(request)))


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    for card in await _cards(get_state(request)):
        if card.id == model_id:
            return card
    raise model_not_found(model_id)


@contextmanager
def _counted(state: ServerState, action: str):
    """Count one adapter change in /metrics as ok or error (the error still propagates)."""
    try:
        yield
    except Exception:
        state.metrics.adapter_changes.labels(action, "error").inc()
        raise
    state.metrics.adapter_changes.labels(action, "ok").inc()


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: LoadLoraAdapterRequest, request: Request):
    state = get_state(request)
    name = body.lora_name
    with _counted(state, "load"):
        if name == state.base_name:
            raise BadRequestError(f"{name!r} is the base model's name; pick another adapter name",
                                  param="lora_name")
        try:
            check_adapter_name(name)
        except AdapterError as exc:
            raise BadRequestError(str(exc), param="lora_name") from None
        path = resolve_adapter_path(body.lora_path, state.adapter_roots)
        await state.engine.load_adapter(name, path)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoraAdapterRequest, request: Request):
    state = get_state(request)
    name = body.lora_name
    with _counted(state, "unload"):
        if name == state.base_name:
            raise BadRequestError("the base model cannot be unloaded", param="lora_name")
        await state.engine.unload_adapter(name)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")
