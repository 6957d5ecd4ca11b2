"""Server options (the engine's are :class:`inlaid.engine.llm_engine.EngineConfig`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from inlaid.errors import ConfigError


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"  # loopback only unless asked: the API has no rate limits per client
    port: int = 8000
    api_key: str | None = None  # Bearer token for every route but /health
    served_model_name: str | None = None  # None: the model directory's name (or the source as given)
    adapter_roots: tuple[str, ...] = ()  # load_lora_adapter reads only under these; none: disabled
    max_queue: int = 256  # queued + running requests; more are refused with 429
    drain_timeout: float = 30.0  # seconds in-flight requests get to finish on shutdown
    max_body_bytes: int = 32 * 2 ** 20  # larger request bodies get 413

    def __post_init__(self) -> None:
        self.adapter_roots = tuple(str(r) for r in self.adapter_roots)
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port {self.port}: must be in [0, 65535]")
        if self.max_queue < 1:
            raise ConfigError(f"--max-queue {self.max_queue}: must be >= 1")
        if self.drain_timeout < 0:
            raise ConfigError(f"--drain-timeout {self.drain_timeout}: must be >= 0")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("--api-key is empty")
        if self.served_model_name is not None and not self.served_model_name.strip():
            raise ConfigError("--served-model-name is empty")

    def resolved_adapter_roots(self) -> tuple[Path, ...]:
        """Each root with symlinks resolved; a missing root is a configuration error."""
        roots = []
        for root in self.adapter_roots:
            path = Path(root).expanduser()
            if not path.is_dir():
                raise ConfigError(f"--adapter-root {root}: not a directory")
            roots.append(path.resolve())
        return tuple(roots)


def default_model_name(model: str) -> str:
    """What clients put in ``model`` for the base: a local directory's name, else the source."""
    path = Path(model).expanduser()
    if path.exists():
        return path.resolve().name
    return model
