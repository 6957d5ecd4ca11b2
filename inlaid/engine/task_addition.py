"""Live task addition: re-quantize the served checkpoint for a new task while the engine serves.

A job runs in a worker thread: ``inlaid.quant.pipeline.add_task`` on the served checkpoint (forwards
for the new task only, Hessians folded into the stored state, re-solve, atomic checkpoint swap on
disk — exactly the offline ``inlaid add-task``). Then each re-quantized layer is copied into the live
model through ``run_on_engine`` (the server's engine thread runs it between two steps), the new
adapter is registered and, on a GPU, the step graphs are re-captured. Serving never stops: requests
in flight during the swap see some layers old and some new, which is the price of not pausing.

A failure while re-quantizing leaves the old weights serving and the old checkpoint on disk
(add_task only renames a complete checkpoint into place); the job reports the error. Jobs run one at
a time, in submission order: each folds into the state the previous one wrote.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from inlaid.config import TaskSpec
from inlaid.errors import ConfigError, InlaidError

log = logging.getLogger(__name__)

STATUSES = ("queued", "quantizing", "swapping", "done", "failed")


@dataclass
class TaskJob:
    id: str
    name: str
    status: str = "queued"
    error: str | None = None
    layers_swapped: int = 0
    num_layers: int = 0
    submitted: float = field(default_factory=time.time)
    finished: float | None = None
    quantize_seconds: float | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class TaskAdder:
    """One worker thread that runs task additions for the checkpoint an engine serves."""

    def __init__(self, engine, run_on_engine: Callable[[Callable], object], device: str | None = None):
        if not getattr(engine, "is_checkpoint", False):
            raise ConfigError("live task addition needs the server to serve an inlaid checkpoint "
                              "(it re-quantizes that checkpoint)")
        self.checkpoint = Path(engine.model_path)
        self.num_layers = engine.model.shape.num_layers
        self.run_on_engine = run_on_engine
        self.device = device
        self.jobs: dict[str, TaskJob] = {}
        self._queue: list[tuple[TaskJob, TaskSpec]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._ids = itertools.count(1)
        self._thread = threading.Thread(target=self._loop, name="inlaid-task-adder", daemon=True)
        self._thread.start()

    def submit(self, spec: TaskSpec) -> TaskJob:
        with self._lock:
            pending = {job.name for job in self.jobs.values() if job.status not in ("done", "failed")}
            if spec.name in pending:
                raise ConfigError(f"task {spec.name!r} is already being added")
            job = TaskJob(id=f"task-{next(self._ids)}", name=spec.name, num_layers=self.num_layers)
            self.jobs[job.id] = job
            self._queue.append((job, spec))
        self._wake.set()
        return job

    def wait(self, job_id: str, timeout: float | None = None) -> TaskJob:
        deadline = None if timeout is None else time.monotonic() + timeout
        job = self.jobs[job_id]
        while job.status not in ("done", "failed"):
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{job_id} is still {job.status}")
            time.sleep(0.05)
        return job

    def _loop(self) -> None:
        while True:
            self._wake.wait()
            with self._lock:
                item = self._queue.pop(0) if self._queue else None
                if not self._queue:
                    self._wake.clear()
            if item is not None:
                self._run(*item)

    def _run(self, job: TaskJob, spec: TaskSpec) -> None:
        from inlaid.engine.model import load_weights
        from inlaid.quant import pipeline

        try:
            job.status = "quantizing"
            started = time.perf_counter()
            pipeline.add_task(self.checkpoint, [spec], device=self.device)
            job.quantize_seconds = time.perf_counter() - started
            weights = load_weights(self.checkpoint, quantized=True)
            job.status = "swapping"
            for layer in range(self.num_layers):
                self.run_on_engine(lambda engine, i=layer: engine.swap_layer(i, weights))
                job.layers_swapped = layer + 1
            adapter_dir = self.checkpoint / "adapters" / spec.name
            self.run_on_engine(lambda engine: (engine.finish_weight_swap(),
                                               engine.register_adapter(spec.name, adapter_dir)))
            job.status = "done"
        except InlaidError as exc:
            job.status, job.error = "failed", str(exc)
        except Exception as exc:  # report, never kill the worker: the server keeps serving
            log.exception("task addition %s failed", job.id)
            job.status, job.error = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            job.finished = time.time()
