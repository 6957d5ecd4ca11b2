"""Live task addition through the server: requests keep succeeding while a task is re-quantized and
swapped in, the new adapter serves afterwards, and everything equals an offline ``add-task``."""

from __future__ import annotations

import shutil
import threading
import time

import pytest
from fastapi.testclient import TestClient

from inlaid.config import QuantConfig, TaskSpec
from inlaid.engine.llm import LLM
from inlaid.engine.llm_engine import EngineConfig, LLMEngine
from inlaid.quant import pipeline
from inlaid.server.app import create_app
from inlaid.server.async_engine import AsyncEngine
from inlaid.server.settings import ServerSettings

from .conftest import ENGINE_OPTIONS, greedy

QCFG = QuantConfig(bits=4, group_size=32, samples=4, seq_len=32)
PROMPT = "select sum from where"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_model, tiny_tasks):
    """(served checkpoint with task sql, offline reference = the same + add-task math)."""
    root = tmp_path_factory.mktemp("live-tasks")
    served = root / "served"
    pipeline.quantize(str(tiny_model), served, [TaskSpec("sql", *tiny_tasks["sql"])], QCFG)
    offline = root / "offline"
    shutil.copytree(served, offline)
    pipeline.add_task(offline, [TaskSpec("math", *tiny_tasks["math"])])
    return served, offline


def completion(client, model, max_tokens=6):
    return client.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": max_tokens,
                                                "temperature": 0})


def wait_job(client, job_id, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/tasks/{job_id}").json()
        if job["status"] in ("done", "failed"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"{job_id} did not finish")


def test_live_task_addition_serves_through_and_equals_offline(checkpoints, tiny_tasks):
    served, offline = checkpoints
    adapter, data = tiny_tasks["math"]
    engine = AsyncEngine(LLMEngine(EngineConfig(model=str(served), **ENGINE_OPTIONS)))
    app = create_app(engine, ServerSettings(adapter_roots=(str(adapter.parent),), served_model_name="base"))
    with TestClient(app) as client:
        statuses, finished_at, stop = [], [], threading.Event()

        def traffic():
            while not stop.is_set():
                statuses.append(completion(client, "sql").status_code)
                finished_at.append(time.time())

        worker = threading.Thread(target=traffic)
        worker.start()
        try:
            resp = client.post("/v1/tasks", json={"name": "math", "adapter_path": str(adapter),
                                                  "data_path": str(data)})
            assert resp.status_code == 202, resp.text
            job = wait_job(client, resp.json()["id"])
        finally:
            stop.set()
            worker.join()
        assert job["status"] == "done", job
        assert job["layers_swapped"] == job["num_layers"] == 2
        assert statuses and set(statuses) == {200}  # no request failed during the swap
        # and requests did complete while the job ran, not only before and after it
        assert any(job["submitted"] < t < job["finished"] for t in finished_at)
        reference = LLM(str(offline), **{**ENGINE_OPTIONS, "async_scheduling": False})
        for model in ("sql", "math"):
            want = reference.generate(PROMPT, greedy(6), model)[0].text
            assert completion(client, model).json()["choices"][0]["text"] == want, model
        listed = {m["id"] for m in client.get("/v1/models").json()["data"]}
        assert {"base", "sql", "math"} <= listed
        # the checkpoint on disk now holds the task too
        assert (served / "adapters" / "math").is_dir()


def test_task_addition_bad_input_and_failure_keep_serving(checkpoints, tiny_tasks, tmp_path):
    served, _ = checkpoints
    adapter, data = tiny_tasks["chat"]
    work = tmp_path / "served"
    shutil.copytree(served, work)
    engine = AsyncEngine(LLMEngine(EngineConfig(model=str(work), **ENGINE_OPTIONS)))
    roots = (str(adapter.parent),)
    with TestClient(create_app(engine, ServerSettings(adapter_roots=roots))) as client:
        before = completion(client, "sql").json()["choices"][0]["text"]
        outside = {"name": "x", "adapter_path": str(tmp_path), "data_path": str(data)}
        assert client.post("/v1/tasks", json=outside).status_code == 403
        missing = {"name": "x", "adapter_path": str(adapter), "data_path": str(adapter.parent / "nope.jsonl")}
        assert client.post("/v1/tasks", json=missing).status_code == 400
        duplicate = {"name": "sql", "adapter_path": str(adapter), "data_path": str(data)}
        assert client.post("/v1/tasks", json=duplicate).status_code == 400
        assert client.post("/v1/tasks", json={"name": "bad name!", "adapter_path": "a",
                                              "data_path": "b"}).status_code in (400, 422)
        assert client.get("/v1/tasks/task-999").status_code == 404
        broken = adapter.parent / "broken.jsonl"
        broken.write_text('{"unknown_field": 1}\n')
        resp = client.post("/v1/tasks", json={"name": "chat", "adapter_path": str(adapter),
                                              "data_path": str(broken)})
        job = wait_job(client, resp.json()["id"])
        assert job["status"] == "failed" and job["error"] and job["layers_swapped"] == 0
        assert completion(client, "sql").json()["choices"][0]["text"] == before  # old weights serve
        assert completion(client, "chat").status_code == 404


def test_task_addition_needs_a_checkpoint(served):
    from .conftest import make_engine

    engine = AsyncEngine(make_engine(served))
    with TestClient(create_app(engine, ServerSettings(adapter_roots=(str(served.root),)))) as client:
        resp = client.post("/v1/tasks", json={"name": "t", "adapter_path": str(served.spare),
                                              "data_path": str(served.spare / "adapter_config.json")})
        assert resp.status_code == 400 and "checkpoint" in resp.json()["error"]["message"]


def _tasks_on_disk(checkpoint):
    import json

    return [t["name"] for t in json.loads((checkpoint / "tasks.json").read_text())["tasks"]]


def test_an_adapter_the_engine_cannot_take_fails_before_any_work(checkpoints, tiny_model, tmp_path):
    """Rank over max_lora_rank: refused up front, so nothing is re-quantized or swapped, the old
    weights and checkpoint stay, and the name stays free for a corrected adapter."""
    from ..conftest import save_adapter, write_data

    served, _ = checkpoints
    work = tmp_path / "served"
    shutil.copytree(served, work)
    wide = save_adapter(tiny_model, tmp_path / "adapters" / "wide", seed=21, rank=16)
    data = write_data(tmp_path / "adapters" / "wide.jsonl", seed=21, kind="text")
    engine = AsyncEngine(LLMEngine(EngineConfig(model=str(work), **{**ENGINE_OPTIONS, "max_lora_rank": 8})))
    roots = (str(wide.parent),)
    tasks = _tasks_on_disk(work)
    with TestClient(create_app(engine, ServerSettings(adapter_roots=roots))) as client:
        before = completion(client, "sql").json()["choices"][0]["text"]
        resp = client.post("/v1/tasks", json={"name": "wide", "adapter_path": str(wide),
                                              "data_path": str(data)})
        job = wait_job(client, resp.json()["id"])
        assert job["status"] == "failed" and "max_lora_rank" in job["error"], job
        assert job["layers_swapped"] == 0 and job["quantize_seconds"] is None
        assert completion(client, "sql").json()["choices"][0]["text"] == before
        assert _tasks_on_disk(work) == tasks
        assert not (work.parent / f".{work.name}.inlaid-previous").exists()


def test_a_failure_after_the_swap_rolls_back_weights_and_checkpoint(checkpoints, tiny_tasks, tmp_path):
    """A failure past the checkpoint's swap on disk (here: registering the adapter) puts the
    previous weights back into the swapped layers and the previous checkpoint back on disk: the
    base serves what it served before, and the name can be added again."""
    served, _ = checkpoints
    adapter, data = tiny_tasks["chat"]
    work, offline = tmp_path / "served", tmp_path / "offline"
    shutil.copytree(served, work)
    shutil.copytree(served, offline)
    pipeline.add_task(offline, [TaskSpec("chat", adapter, data)])
    tasks = _tasks_on_disk(work)
    inner = LLMEngine(EngineConfig(model=str(work), **ENGINE_OPTIONS))
    register = inner.register_adapter
    calls = []

    def flaky_register(name, path):
        calls.append(name)
        if len(calls) == 1:
            raise RuntimeError("injected failure")
        return register(name, path)

    inner.register_adapter = flaky_register
    engine = AsyncEngine(inner)
    app = create_app(engine, ServerSettings(adapter_roots=(str(adapter.parent),), served_model_name="base"))
    with TestClient(app) as client:
        before = {m: completion(client, m).json()["choices"][0]["text"] for m in ("base", "sql")}
        body = {"name": "chat", "adapter_path": str(adapter), "data_path": str(data)}
        job = wait_job(client, client.post("/v1/tasks", json=body).json()["id"])
        assert job["status"] == "failed" and "injected failure" in job["error"], job
        assert "rolled back" in job["error"] and job["layers_swapped"] == 0
        assert {m: completion(client, m).json()["choices"][0]["text"] for m in before} == before
        assert _tasks_on_disk(work) == tasks and not (work / "adapters" / "chat").exists()
        assert not (work.parent / f".{work.name}.inlaid-previous").exists()
        # the same task again, now without the fault: done, and equal to an offline add-task
        job = wait_job(client, client.post("/v1/tasks", json=body).json()["id"])
        assert job["status"] == "done", job
        reference = LLM(str(offline), **{**ENGINE_OPTIONS, "async_scheduling": False})
        for model in ("base", "chat"):
            want = reference.generate(PROMPT, greedy(6), None if model == "base" else model)[0].text
            assert completion(client, model).json()["choices"][0]["text"] == want, model


def test_task_endpoints_through_the_openai_clients_low_level_calls(checkpoints, tiny_tasks, tmp_path):
    """``/v1/tasks`` is not in the OpenAI SDK; its generic ``post`` / ``get`` reach it (a live uvicorn,
    API key on), errors arrive as the client's exception types, and ``/health`` / ``/metrics`` (outside
    ``/v1``) answer through the same client by absolute URL."""
    import openai

    from .conftest import live_server

    served, _ = checkpoints
    adapter, data = tiny_tasks["chat"]
    work = tmp_path / "served"
    shutil.copytree(served, work)
    engine = AsyncEngine(LLMEngine(EngineConfig(model=str(work), **ENGINE_OPTIONS)))
    settings = ServerSettings(api_key="k", adapter_roots=(str(adapter.parent),), served_model_name="base")
    with live_server(create_app(engine, settings)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0, timeout=60)
        body = {"name": "chat", "adapter_path": str(adapter), "data_path": str(data)}
        job = client.post("/tasks", body=body, cast_to=object)
        assert job["status"] in ("queued", "running") and job["name"] == "chat"
        deadline = time.monotonic() + 300
        while job["status"] not in ("done", "failed") and time.monotonic() < deadline:
            time.sleep(0.1)
            job = client.get(f"/tasks/{job['id']}", cast_to=object)
        assert job["status"] == "done", job
        assert [j["id"] for j in client.get("/tasks", cast_to=object)["data"]] == [job["id"]]
        served_by_chat = client.completions.create(model="chat", prompt=PROMPT, max_tokens=4, temperature=0)
        assert served_by_chat.usage.completion_tokens >= 1
        with pytest.raises(openai.NotFoundError):
            client.get("/tasks/task-999", cast_to=object)
        with pytest.raises(openai.BadRequestError, match="already served"):
            client.post("/tasks", body=body, cast_to=object)
        with pytest.raises(openai.PermissionDeniedError):
            client.post("/tasks", body={**body, "name": "other", "adapter_path": str(tmp_path)}, cast_to=object)
        assert client.get(f"{url}/health", cast_to=object) == {"status": "ok"}
        assert "inlaid_" in client.get(f"{url}/metrics", cast_to=str)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).get("/tasks", cast_to=object)
