"""Live task addition: re-quantize the served checkpoint for a new task while the engine serves.

A job runs in a worker thread: ``inlaid.quant.pipeline.add_task`` on the served checkpoint (forwards
for the new task only, Hessians folded into the stored state, re-solve, atomic checkpoint swap on
disk — exactly the offline ``inlaid add-task``). Then each re-quantized layer is copied into the live
model through ``run_on_engine`` (the server's engine thread runs it between two steps), the new
adapter is registered and, on a GPU, the step graphs are re-captured. Serving never stops: requests
in flight during the swap see some layers old and some new, which is the price of not pausing.

A failure leaves the old weights serving and the old checkpoint on disk, and the job reports the
error. An adapter the engine cannot take (shapes, rank over ``max_lora_rank``) is refused before any
work. A failure while re-quantizing changes nothing (add_task only renames a complete checkpoint
into place, and keeps the replaced one beside it until the job is done); one after that (swapping,
registering) puts the previous weights back into the layers already swapped and the previous
checkpoint back on disk. Jobs run one at a time, in submission order: each folds into the state the
previous one wrote.
"""

from __future__ import annotations

import itertools
import logging
import shutil
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
        self._check_adapter = engine.check_adapter
        self._prepare_adapter = engine.adapters.prepare
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

        previous = self.checkpoint.with_name(f".{self.checkpoint.name}.inlaid-previous")
        committed = False
        try:
            job.status = "quantizing"
            if spec.adapter is not None:  # an adapter the engine cannot take fails before any work
                self._check_adapter(spec.name, spec.adapter)
            started = time.perf_counter()
            pipeline.add_task(self.checkpoint, [spec], device=self.device, keep_previous=previous)
            committed = True
            job.quantize_seconds = time.perf_counter() - started
            weights = load_weights(self.checkpoint, quantized=True)
            job.status = "swapping"
            for layer in range(self.num_layers):
                self.run_on_engine(lambda engine, i=layer: engine.swap_layer(i, weights))
                job.layers_swapped = layer + 1
            # read and copied here, registered on the engine thread between two steps
            prepared = None if spec.adapter is None else \
                self._prepare_adapter(spec.name, self.checkpoint / "adapters" / spec.name)

            def finish(engine):
                engine.finish_weight_swap()
                if prepared is not None:
                    engine.register_adapter(spec.name, prepared)

            self.run_on_engine(finish)
            shutil.rmtree(previous, ignore_errors=True)
            job.finished = time.time()  # before the status: a client that sees "done" sees the time
            job.status = "done"
        except Exception as exc:  # report, never kill the worker: the server keeps serving
            if not isinstance(exc, InlaidError):
                log.exception("task addition %s failed", job.id)
            error = str(exc) if isinstance(exc, InlaidError) else f"{type(exc).__name__}: {exc}"
            if committed:
                error += self._roll_back(job, previous)
            job.error, job.finished = error, time.time()
            job.status = "failed"  # last: a client that sees the end state sees its error and time

    def _roll_back(self, job: TaskJob, previous: Path) -> str:
        """After a failure past the checkpoint's swap on disk: put the previous weights back into
        the layers already swapped and the previous checkpoint back on disk. Returns what to add
        to the job's error."""
        from inlaid.engine.model import load_weights

        try:
            if job.layers_swapped:
                old = load_weights(previous, quantized=True)
                for layer in range(job.layers_swapped):
                    self.run_on_engine(lambda engine, i=layer: engine.swap_layer(i, old))
                self.run_on_engine(lambda engine: engine.finish_weight_swap())
            failed = self.checkpoint.with_name(f".{self.checkpoint.name}.inlaid-failed")
            shutil.rmtree(failed, ignore_errors=True)
            self.checkpoint.rename(failed)
            previous.rename(self.checkpoint)
            shutil.rmtree(failed, ignore_errors=True)
        except Exception as exc:
            log.exception("rolling back task addition %s failed", job.id)
            return f"; rolling back failed too ({type(exc).__name__}: {exc}): restart the server"
        job.layers_swapped = 0
        return "; rolled back: the previous weights and checkpoint serve"
