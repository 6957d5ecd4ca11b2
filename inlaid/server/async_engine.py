"""The single-threaded :class:`LLMEngine` behind an asyncio API.

One background thread owns the engine. It loops: run the queued commands (add, abort, adapter
changes, any :meth:`AsyncEngine.call`), then ``step()`` while requests exist, else sleep until a
command arrives. Coroutines never touch the engine: they enqueue a command and await its Future, so
every engine call happens on that thread, between steps. Each request's outputs go to its own
asyncio.Queue through ``loop.call_soon_threadsafe``: the engine thread never waits on a client.

Failures: a step that raises fails every in-flight request with :class:`EngineFailedError` (nothing
waits forever), then the engine is emptied with aborts and keeps serving. When even that fails, or
the thread itself dies, the engine is marked dead: new requests get 503 and /health says so.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import TypeVar

from inlaid.engine.llm_engine import LLMEngine, RequestOutput
from inlaid.engine.sequence import SamplingParams
from inlaid.server.errors import (BadRequestError, ConflictError, EngineFailedError, NotFoundError,
                                  QueueFullError, UnavailableError, model_not_found)

log = logging.getLogger(__name__)
T = TypeVar("T")


class _Consumer:
    """Engine-thread record of who waits for a request's outputs."""

    __slots__ = ("loop", "queue", "adapter")

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, adapter: str | None):
        self.loop, self.queue, self.adapter = loop, queue, adapter


class RequestStream:
    """Async iterator over one request's outputs; the last one has ``finished`` set.

    Leaving early — :meth:`abort`, leaving ``async with``, or being cancelled while waiting (the
    client disconnected) — aborts the request in the engine, which frees its KV blocks.
    """

    def __init__(self, owner: AsyncEngine, request_id: str, queue: asyncio.Queue):
        self.request_id = request_id
        self.finished = False
        self._owner, self._queue = owner, queue

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except BaseException:  # cancelled: nobody will read the rest
            self.abort()
            raise
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self._owner._abort_soon(self.request_id)

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.abort()


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_queue: int = 256):
        self.engine = engine
        self.max_queue = max_queue  # queued + running requests; more raise QueueFullError (429)
        self.dead: str | None = None  # why the engine stopped serving, once it did
        self._consumers: dict[str, _Consumer] = {}  # engine thread only (len() read elsewhere)
        self._commands: deque[tuple[Callable[[], object], Future]] = deque()
        self._lock = threading.Lock()  # guards _commands and _stopped
        self._wake = threading.Event()
        self._stopped = False  # no more commands are accepted
        self._exit = False
        self._accepting = True
        self._stats = self._read_stats()
        self._thread = threading.Thread(target=self._run, name="inlaid-engine", daemon=True)
        self._thread.start()

    # --- state (readable from any thread) --------------------------------------------------------
    @property
    def num_in_flight(self) -> int:
        return len(self._consumers)

    @property
    def is_accepting(self) -> bool:
        return self._accepting and self.dead is None and not self._stopped

    @property
    def stats(self) -> dict:
        """The engine's counters as of the last step or command (no round trip to the thread)."""
        return self._stats

    # --- requests --------------------------------------------------------------------------------
    async def generate(self, prompt: str | list[int], sampling: SamplingParams | None = None,
                       adapter: str | None = None, request_id: str | None = None) -> RequestStream:
        """Queue one request and return its output stream. Input errors (RequestError, unknown
        adapter, a full queue) raise here, before any output, so a server can still answer 4xx."""
        if not self._accepting:
            raise UnavailableError("the server is shutting down")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        request_id = request_id or f"req-{uuid.uuid4().hex}"

        def add() -> None:
            if self.dead is not None:
                raise UnavailableError(f"the engine stopped serving ({self.dead}); restart the server")
            if len(self._consumers) >= self.max_queue:
                raise QueueFullError(f"the server already holds {self.max_queue} queued or running "
                                     "requests; retry later", code="queue_full")
            if adapter is not None and adapter not in self.engine.adapters:
                raise model_not_found(adapter)
            self.engine.add_request(prompt, sampling or SamplingParams(), adapter, request_id)
            self._consumers[request_id] = _Consumer(loop, queue, adapter)

        future = self._submit(add)
        try:
            await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            self._abort_soon(request_id)  # it may have been added before the cancel arrived
            raise
        return RequestStream(self, request_id, queue)

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run ``fn(engine)`` on the engine thread between two steps and return its result.

        The hook for anything that must change the engine while it serves (e.g. swapping a
        re-quantized layer in): it never overlaps a step or another command."""
        return await asyncio.wrap_future(self._submit(lambda: fn(self.engine)))

    def call_blocking(self, fn: Callable[[LLMEngine], T]) -> T:
        """:meth:`call` for worker threads (not the event loop): blocks until ``fn`` has run."""
        return self._submit(lambda: fn(self.engine)).result()

    def _abort_soon(self, request_id: str) -> None:
        def abort() -> None:
            self._consumers.pop(request_id, None)
            self.engine.abort_request(request_id)

        try:
            self._submit(abort)
        except UnavailableError:
            pass  # the thread is gone and took every request with it

    # --- adapters --------------------------------------------------------------------------------
    async def load_adapter(self, name: str, path: str | Path) -> None:
        def refuse_loaded() -> None:
            if name in self.engine.adapters:
                raise BadRequestError(f"adapter {name!r} is already loaded; unload it first",
                                      param="lora_name")

        refuse_loaded()  # early, before reading anything; checked again where it counts
        # reading, checking and copying the adapter happen on a worker thread, so the engine
        # thread keeps stepping; only the registration itself waits for a gap between steps
        prepared = await asyncio.to_thread(self.engine.adapters.prepare, name, path)

        def install() -> None:
            refuse_loaded()
            self.engine.register_adapter(name, prepared)

        await asyncio.wrap_future(self._submit(install))

    async def unload_adapter(self, name: str) -> None:
        def unload() -> None:
            if name not in self.engine.adapters:
                raise NotFoundError(f"adapter {name!r} is not loaded", param="lora_name",
                                    code="model_not_found")
            busy = sum(c.adapter == name for c in self._consumers.values())
            if busy:
                raise ConflictError(f"adapter {name!r} has {busy} request(s) in flight; unload it "
                                    "when they have finished", param="lora_name")
            self.engine.unregister_adapter(name)

        await asyncio.wrap_future(self._submit(unload))

    async def adapters(self) -> dict[str, str]:
        """Registered adapter name -> the directory it was read from."""
        return await self.call(lambda e: {n: str(e.adapters.info(n).path) for n in e.adapters.names})

    # --- shutdown --------------------------------------------------------------------------------
    async def shutdown(self, timeout: float = 30.0) -> None:
        """Refuse new requests, give in-flight ones ``timeout`` seconds, abort the rest, stop."""
        self._accepting = False
        deadline = time.monotonic() + timeout
        while self._consumers and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self._consumers:
            log.warning("shutdown: aborting %d requests still in flight", len(self._consumers))
        await asyncio.to_thread(self.close)

    def close(self, join_timeout: float = 30.0) -> None:
        """Abort whatever is in flight and stop the engine thread (blocking, idempotent)."""
        self._accepting = False

        def exit_loop() -> None:
            self._fail_all(lambda: UnavailableError("the server shut down before this request finished"))
            self._exit = True

        try:
            self._submit(exit_loop)
        except UnavailableError:
            pass
        if threading.current_thread() is not self._thread:
            self._thread.join(join_timeout)

    # --- the engine thread -----------------------------------------------------------------------
    def _submit(self, fn: Callable[[], object]) -> Future:
        future: Future = Future()
        with self._lock:
            if self._stopped:
                raise UnavailableError("the engine has stopped")
            self._commands.append((fn, future))
        self._wake.set()
        return future

    def _run(self) -> None:
        try:
            while not self._exit:
                self._wake.clear()
                self._run_commands()
                if self._exit:
                    break
                if self.dead is None and self.engine.has_unfinished_requests():
                    self._step()
                else:
                    self._wake.wait()
        except BaseException as exc:  # a bug in this loop: never leave callers hanging
            log.exception("the engine thread crashed")
            self.dead = f"engine thread crashed: {type(exc).__name__}: {exc}"
        finally:
            self._stop_thread()

    def _run_commands(self) -> None:
        while True:
            with self._lock:
                if not self._commands:
                    break
                fn, future = self._commands.popleft()
            if not future.set_running_or_notify_cancel():
                continue  # its caller was cancelled before it ran
            try:
                future.set_result(fn())
            except Exception as exc:
                future.set_exception(exc)
        self._stats = self._read_stats()

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:
            log.exception("engine step failed; failing %d in-flight requests", len(self._consumers))
            message = f"the engine failed while running this request ({type(exc).__name__}: {exc})"
            self._fail_all(lambda: EngineFailedError(message))
            return
        for out in outputs:
            consumer = self._consumers.get(out.request_id)
            if consumer is None:
                continue
            if out.finished:
                del self._consumers[out.request_id]
            self._deliver(consumer, out)
        self._stats = self._read_stats()

    def _fail_all(self, make_error: Callable[[], BaseException]) -> None:
        consumers, self._consumers = self._consumers, {}
        for request_id, consumer in consumers.items():
            self._deliver(consumer, make_error())
            try:
                self.engine.abort_request(request_id)
            except Exception as exc:
                log.exception("abort of %s failed", request_id)
                self.dead = f"cannot abort {request_id} after a failure: {type(exc).__name__}: {exc}"
        if self.dead is None and self.engine.has_unfinished_requests():
            self.dead = "requests remain in the engine after aborting them all"

    @staticmethod
    def _deliver(consumer: _Consumer, item: RequestOutput | BaseException) -> None:
        try:
            consumer.loop.call_soon_threadsafe(consumer.queue.put_nowait, item)
        except RuntimeError:
            pass  # that event loop is closed: nobody waits for this request any more

    def _stop_thread(self) -> None:
        with self._lock:
            self._stopped = True
            pending = list(self._commands)
            self._commands.clear()
        for _, future in pending:
            if future.set_running_or_notify_cancel():
                future.set_exception(UnavailableError("the engine has stopped"))
        reason = self.dead or "the engine has stopped"
        consumers, self._consumers = self._consumers, {}
        for consumer in consumers.values():
            self._deliver(consumer, UnavailableError(reason))
        self._stats = {**self._stats, "in_flight": 0}

    def _read_stats(self) -> dict:
        return {**self.engine.stats(), "in_flight": len(self._consumers)}
