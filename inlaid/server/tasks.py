"""Task-addition endpoints — ``POST /v1/tasks`` {name, adapter_path, data_path} and
``GET /v1/tasks/{id}`` — are not built yet; they belong on this router.

How they plug in: ``create_app`` already includes ``router``; a handler reaches the engine, the
settings (``adapter_roots`` for path checks: see ``inlaid.server.adapters.resolve_adapter_path``) and
the metrics through ``inlaid.server.serving.get_state(request)``. The re-quantization runs in a
background worker; each finished layer is swapped in with ``AsyncEngine.call(fn)``, which runs
``fn(engine)`` on the engine thread between two steps, so serving never stops.
"""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["tasks"])
