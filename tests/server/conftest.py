"""Server fixtures: one tiny Llama with two adapters under an adapter root (plus broken adapters for
the load tests), engines sized for tests, and an in-process uvicorn server for real HTTP clients."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from inlaid.engine.llm import LLM
from inlaid.engine.llm_engine import EngineConfig, LLMEngine
from inlaid.engine.sequence import SamplingParams

from ..conftest import save_adapter

# The served engines schedule asynchronously, as on a GPU by default (step N + 1 launched before
# step N's tokens are read); the offline reference they are compared with does not.
ENGINE_OPTIONS = dict(max_loras=2, max_lora_rank=8, num_kv_blocks=256, block_size=4, max_num_seqs=64,
                      async_scheduling=True)
PROMPTS = ["hello world", "the quick brown fox", "select sum from where", "z"]


@pytest.fixture(scope="session")
def served(tmp_path_factory, tiny_model) -> SimpleNamespace:
    """base: the model dir; root: the --adapter-root; adapters: served at start-up; spare: under the
    root, not loaded; corrupt / mismatched / too_big / bad_config / nan: adapters that must fail to
    load."""
    root = tmp_path_factory.mktemp("adapter-root")
    adapters = {"sql": save_adapter(tiny_model, root / "sql", seed=11, rank=4),
                "math": save_adapter(tiny_model, root / "math", seed=12, rank=8,
                                     targets=("q_proj", "v_proj", "down_proj"))}
    spare = save_adapter(tiny_model, root / "spare", seed=13, rank=2, targets=("o_proj", "gate_proj"))
    corrupt = root / "corrupt"
    shutil.copytree(adapters["sql"], corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00not a safetensors file")
    mismatched = root / "mismatched"
    shutil.copytree(adapters["sql"], mismatched)
    _shrink_one_tensor(mismatched / "adapter_model.safetensors")
    too_big = save_adapter(tiny_model, root / "too-big", seed=14, rank=16, targets=("q_proj",))
    bad_config = root / "bad-config"
    shutil.copytree(adapters["sql"], bad_config)
    config = json.loads((bad_config / "adapter_config.json").read_text())
    (bad_config / "adapter_config.json").write_text(json.dumps({**config, "r": "abc"}))
    nan = root / "nan"
    shutil.copytree(adapters["sql"], nan)
    _poison_one_tensor(nan / "adapter_model.safetensors")
    return SimpleNamespace(base=tiny_model, root=root, adapters=adapters, spare=spare, corrupt=corrupt,
                           mismatched=mismatched, too_big=too_big, bad_config=bad_config, nan=nan)


def _shrink_one_tensor(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    key = next(k for k in sorted(tensors) if "lora_A" in k)
    tensors[key] = tensors[key][:, :-8].contiguous()  # in_features no longer match the base
    save_file(tensors, str(path))


def _poison_one_tensor(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    key = next(k for k in sorted(tensors) if "lora_B" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(path))


def make_engine(served, **overrides) -> LLMEngine:
    adapters = {name: str(path) for name, path in served.adapters.items()}
    options = {**ENGINE_OPTIONS, **overrides}
    return LLMEngine(EngineConfig(model=str(served.base), adapters=adapters, **options))


@pytest.fixture(scope="session")
def offline(served) -> LLM:
    """The offline API over the same files: what the server must reproduce."""
    return LLM(str(served.base), {n: str(p) for n, p in served.adapters.items()},
               **{**ENGINE_OPTIONS, "async_scheduling": False})


def greedy(max_tokens: int = 8, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


def free_blocks(engine: LLMEngine) -> tuple[int, int]:
    """(free, total) KV blocks; call when the engine is idle."""
    return engine.block_manager.num_free_blocks, engine.block_manager.num_blocks


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


@contextlib.contextmanager
def slow_steps(engine: LLMEngine, seconds: float = 0.05):
    """Every engine step takes at least ``seconds``, so a long request is surely still running when
    the test acts on it, however busy the machine. (One attribute store: safe while the engine
    thread runs; it picks the change up at its next step.)"""
    launch = engine.runner.launch

    def slow_launch(plan):
        time.sleep(seconds)
        return launch(plan)

    engine.runner.launch = slow_launch
    try:
        yield
    finally:
        del engine.runner.launch


@contextlib.contextmanager
def live_server(app):
    """uvicorn on 127.0.0.1 and a free port, in a thread; yields the base URL. Leaving it runs the
    app's lifespan shutdown (the engine drains and stops)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: server.started, timeout=30), "uvicorn did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
