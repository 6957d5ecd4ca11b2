"""Live task addition over HTTP: ``POST /v1/tasks`` {name, adapter_path, data_path} queues a job
(202), ``GET /v1/tasks/{id}`` and ``GET /v1/tasks`` report its status.

The work is :class:`inlaid.engine.task_addition.TaskAdder`: re-quantize the served checkpoint in a
worker thread, then swap each layer in through ``AsyncEngine.call_blocking`` (between two steps), so
serving never stops. Both paths are confined to the ``--adapter-root`` directories, like adapter
loading: the server reads them from its own disk.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse

from inlaid.config import TASK_NAME, TaskSpec
from inlaid.errors import ConfigError, InlaidError
from inlaid.server.adapters import resolve_adapter_path
from inlaid.server.errors import BadRequestError, NotFoundError, PermissionDeniedError
from inlaid.server.serving import get_state

router = APIRouter(tags=["tasks"])


class AddTaskRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=f"^{TASK_NAME.pattern}$")
    adapter_path: str
    data_path: str


def _resolve_data_path(raw: str, roots: tuple[Path, ...]) -> Path:
    try:
        path = Path(raw)
        candidates = [path] if path.is_absolute() else [root / path for root in roots]
        for candidate in (c.resolve() for c in candidates):
            if any(candidate.is_relative_to(root) for root in roots) and candidate.is_file():
                return candidate
    except (OSError, ValueError, RuntimeError) as exc:
        raise BadRequestError(f"data_path {raw!r}: {exc}", param="data_path") from None
    if not roots:
        raise PermissionDeniedError("task addition reads files from the server's disk; start the server "
                                    "with --adapter-root DIR to allow files under DIR", param="data_path")
    raise BadRequestError(f"data_path {raw!r}: no such file under the adapter roots", param="data_path")


def _adder(state):
    from inlaid.engine.task_addition import TaskAdder

    adder = getattr(state, "task_adder", None)
    if adder is None:
        try:
            adder = TaskAdder(state.llm, state.engine.call_blocking)
        except ConfigError as exc:
            raise BadRequestError(str(exc)) from None
        state.task_adder = adder
    return adder


@router.post("/v1/tasks")
async def add_task(body: AddTaskRequest, request: Request):
    state = get_state(request)
    adapter = resolve_adapter_path(body.adapter_path, state.adapter_roots)
    data = _resolve_data_path(body.data_path, state.adapter_roots)
    if body.name == state.base_name or body.name in state.llm.adapters:
        raise BadRequestError(f"{body.name!r} is already served; pick another task name", param="name")
    try:
        job = _adder(state).submit(TaskSpec(body.name, adapter, data))
    except InlaidError as exc:
        raise BadRequestError(str(exc), param="name") from None
    return JSONResponse(job.to_dict(), status_code=202)


@router.get("/v1/tasks")
async def list_tasks(request: Request):
    adder = getattr(get_state(request), "task_adder", None)
    return {"data": [job.to_dict() for job in (adder.jobs.values() if adder else [])]}


@router.get("/v1/tasks/{job_id}")
async def get_task(job_id: str, request: Request):
    adder = getattr(get_state(request), "task_adder", None)
    if adder is None or job_id not in adder.jobs:
        raise NotFoundError(f"no task job {job_id!r}", param="job_id")
    return adder.jobs[job_id].to_dict()
