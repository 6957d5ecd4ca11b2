"""Run the server under uvicorn: build the engine, the app, then serve until SIGINT/SIGTERM.

On a signal uvicorn stops accepting connections and gives open requests ``drain_timeout`` seconds;
the app's lifespan then drains and stops the engine thread. The process then exits 0: a requested
stop is not an error (stock uvicorn re-raises the signal, which the CLI would report as an
interrupt). A second Ctrl-C forces the exit.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading

import uvicorn

from inlaid.engine.llm_engine import EngineConfig, LLMEngine
from inlaid.errors import ConfigError
from inlaid.server.app import create_app
from inlaid.server.async_engine import AsyncEngine
from inlaid.server.settings import ServerSettings


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        signals = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, taken before the model loads: a port in use or a bad host is a
    one-line error at once, not after a minute of loading (and not uvicorn's exit status 3)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as exc:
        raise ConfigError(f"--host {host!r}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def serve(engine_config: EngineConfig, settings: ServerSettings) -> None:
    """Blocks until the server stops (SIGINT / SIGTERM)."""
    sock = bind(settings.host, settings.port)
    try:
        engine = AsyncEngine(LLMEngine(engine_config), max_queue=settings.max_queue)
    except BaseException:
        sock.close()
        raise
    try:
        app = create_app(engine, settings)
        config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info",
                                timeout_graceful_shutdown=settings.drain_timeout)
        state = app.state.inlaid
        roots = ", ".join(map(str, state.adapter_roots))
        logging.getLogger("uvicorn.error").info(
            "serving %r with adapters [%s]; run-time adapter loading %s; API key %s", state.base_name,
            ", ".join(engine.engine.adapters.names), f"under {roots}" if roots else "off",
            "required" if settings.api_key else "off")
        _Server(config).run(sockets=[sock])
    finally:
        sock.close()
        engine.close()
