"""Every endpoint through FastAPI's TestClient (and httpx's ASGI transport where requests must
overlap): served text equals the offline LLM, streaming adds up, lm-eval's echo+logprobs shape,
models, adapter loading, health, metrics, the API key."""

from __future__ import annotations

import asyncio
import json
import math
import os
from types import SimpleNamespace

import httpx
import pytest
from fastapi.testclient import TestClient

from inlaid.engine.llm import LLM
from inlaid.server.app import create_app
from inlaid.server.async_engine import AsyncEngine
from inlaid.server.settings import ServerSettings

from .conftest import ENGINE_OPTIONS, PROMPTS, greedy, make_engine, slow_steps, wait_until


@pytest.fixture(scope="module")
def server(served):
    engine = AsyncEngine(make_engine(served))
    app = create_app(engine, ServerSettings(adapter_roots=(str(served.root),)))
    with TestClient(app) as client:
        yield SimpleNamespace(client=client, engine=engine, app=app, base=served.base.name)


def post(server, path, body, status=200):
    response = server.client.post(path, json=body)
    assert response.status_code == status, response.text
    is_json = response.headers["content-type"].startswith("application/json")
    return response.json() if is_json else response.text


def sse_events(text: str) -> list:
    """The JSON payloads of an SSE body; asserts the ``data: [DONE]`` terminator."""
    lines = [line for line in text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


def stream(server, path, body) -> list:
    with server.client.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return sse_events("".join(response.iter_text()))


def idle_blocks(engine: AsyncEngine) -> tuple[int, int]:
    return asyncio.run(engine.call(lambda e: (e.block_manager.num_free_blocks, e.block_manager.num_blocks)))


GREEDY_BODY = {"temperature": 0, "max_tokens": 8, "ignore_eos": True}


@pytest.mark.parametrize("adapter", [None, "sql", "math"])
def test_completion_equals_offline(server, offline, adapter):
    model = adapter or server.base
    for prompt in PROMPTS[:2]:
        body = post(server, "/v1/completions", {"model": model, "prompt": prompt, **GREEDY_BODY})
        expect = offline.generate(prompt, greedy(8), adapter)[0]
        choice = body["choices"][0]
        assert choice["text"] == expect.text and choice["finish_reason"] == "length"
        assert body["model"] == model and body["object"] == "text_completion"
        assert body["usage"] == {"prompt_tokens": len(expect.prompt_token_ids), "completion_tokens": 8,
                                 "total_tokens": len(expect.prompt_token_ids) + 8}


def test_prompt_lists_and_token_ids(server, offline):
    body = post(server, "/v1/completions", {"model": "sql", "prompt": PROMPTS[:3], **GREEDY_BODY})
    expect = offline.generate(PROMPTS[:3], greedy(8), "sql")
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["text"] for c in body["choices"]] == [o.text for o in expect]
    ids = [expect[0].prompt_token_ids, expect[1].prompt_token_ids]
    by_ids = post(server, "/v1/completions", {"model": "sql", "prompt": ids, **GREEDY_BODY})
    assert [c["text"] for c in by_ids["choices"]] == [o.text for o in expect[:2]]
    single = post(server, "/v1/completions", {"model": "sql", "prompt": ids[0], **GREEDY_BODY})
    assert single["choices"][0]["text"] == expect[0].text


def test_model_field_optional_and_stop_strings(server, offline):
    free = offline.generate(PROMPTS[1], greedy(12))[0].text
    stop = free[4:6]
    body = post(server, "/v1/completions", {"prompt": PROMPTS[1], "temperature": 0, "max_tokens": 12,
                                            "ignore_eos": True, "stop": stop})
    assert body["model"] == server.base
    choice = body["choices"][0]
    assert choice["text"] == free[:free.index(stop)] and choice["finish_reason"] == "stop"


def test_echo_logprobs_in_lm_eval_shape(server, offline):
    """What lm-eval's local-completions sends for loglikelihood: token-id prompts (context +
    continuation), echo, logprobs=1, max_tokens=1; it sums token_logprobs[ctxlen:-1]."""
    context = offline.tokenizer(PROMPTS[1])["input_ids"]
    continuation = offline.tokenizer(" jumps")["input_ids"]
    ids = context + continuation
    body = post(server, "/v1/completions", {"model": "math", "prompt": [ids], "echo": True, "logprobs": 1,
                                            "max_tokens": 1, "temperature": 0, "seed": 1234})
    lp = body["choices"][0]["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(ids) + 1
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    assert all(isinstance(t, dict) and lp["tokens"][i + 1] in t for i, t in enumerate(lp["top_logprobs"][1:]))
    # the engine's own prompt logprobs, summed the way lm-eval does
    ref = offline.generate([ids], greedy(1, prompt_logprobs=1, logprobs=1), "math")[0]
    expect = sum(p.logprob for p in ref.prompt_logprobs[len(context):])
    got = sum(lp["token_logprobs"][len(context):-1])
    assert math.isclose(got, expect, abs_tol=1e-4)
    is_greedy = all(t == max(top.values()) for t, top in zip(lp["token_logprobs"][len(context):-1],
                                                             lp["top_logprobs"][len(context):-1]))
    assert is_greedy == all(p.top[p.token_id] == max(p.top.values()) if p.token_id in p.top else False
                            for p in ref.prompt_logprobs[len(context):])
    # a text prompt echoes itself in front of the completion
    text = post(server, "/v1/completions", {"prompt": PROMPTS[0], "echo": True, **GREEDY_BODY})
    assert text["choices"][0]["text"] == PROMPTS[0] + offline.generate(PROMPTS[0], greedy(8))[0].text


def test_streamed_completion_adds_up_to_the_non_streamed_one(server):
    body = {"model": "sql", "prompt": PROMPTS[1], **GREEDY_BODY, "max_tokens": 12, "logprobs": 2}
    whole = post(server, "/v1/completions", body)["choices"][0]
    events = stream(server, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    *chunks, usage = events
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    streamed_lps = [t for c in chunks for t in c["choices"][0]["logprobs"]["token_logprobs"]]
    assert streamed_lps == pytest.approx(whole["logprobs"]["token_logprobs"])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 12


@pytest.mark.parametrize("echo", [False, True])
def test_streamed_logprobs_equal_the_whole_responses_with_split_characters(server, echo):
    """The base model's greedy output here holds tokens that are bytes of one character (each alone
    decodes to U+FFFD): tokens, top_logprobs and text_offset still agree between the two paths,
    and each token's own logprob is the one in its top_logprobs."""
    body = {"prompt": PROMPTS[0], **GREEDY_BODY, "max_tokens": 12, "logprobs": 3, "echo": echo}
    whole = post(server, "/v1/completions", body)["choices"][0]["logprobs"]
    assert "\ufffd" in whole["tokens"], "the case needs a split character to test anything"
    chunks = [c["choices"][0]["logprobs"] for c in stream(server, "/v1/completions", body)]
    for key in ("tokens", "text_offset", "top_logprobs"):
        assert [x for c in chunks if c for x in c[key]] == whole[key], key
    offset = 0
    for token, at, chosen, top in zip(whole["tokens"], whole["text_offset"], whole["token_logprobs"],
                                      whole["top_logprobs"]):
        assert at == offset and (top is None or top[token] == chosen)
        offset += len(token)


def test_streamed_multi_prompt_and_echo(server, offline):
    events = stream(server, "/v1/completions", {"prompt": PROMPTS[:2], "echo": True, **GREEDY_BODY})
    texts = ["", ""]
    for event in events:
        for choice in event["choices"]:
            texts[choice["index"]] += choice["text"]
    assert texts == [p + o.text for p, o in zip(PROMPTS[:2], offline.generate(PROMPTS[:2], greedy(8)))]


def test_chat_uses_the_template_and_equals_offline(server, offline):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPTS[1]}]
    body = post(server, "/v1/chat/completions", {"model": "sql", "messages": messages, "temperature": 0,
                                                 "max_completion_tokens": 8, "ignore_eos": True,
                                                 "logprobs": True, "top_logprobs": 3})
    text = offline.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = offline.tokenizer(text, add_special_tokens=False)["input_ids"]
    expect = offline.generate([ids], greedy(8), "sql")[0]
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": expect.text}
    assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] == 8
    content = choice["logprobs"]["content"]
    assert len(content) == 8 and all(len(c["top_logprobs"]) == 3 for c in content)
    assert all(c["top_logprobs"][0]["logprob"] >= c["top_logprobs"][-1]["logprob"] for c in content)
    assert all(isinstance(c["bytes"], list) and c["logprob"] <= 0 for c in content)
    # one user turn: the same prompt LLM.chat_prompt builds
    single = post(server, "/v1/chat/completions", {"model": "math", "messages": messages[1:], **GREEDY_BODY})
    assert single["choices"][0]["message"]["content"] == \
        offline.generate([offline.chat_prompt(PROMPTS[1])], greedy(8), "math")[0].text


def test_streamed_chat_adds_up(server):
    body = {"model": "math", "messages": [{"role": "user", "content": PROMPTS[2]}], **GREEDY_BODY}
    whole = post(server, "/v1/chat/completions", body)["choices"][0]["message"]["content"]
    events = stream(server, "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}})
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    *chunks, usage = events
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 8


def test_models_lists_base_and_adapters(server, served):
    body = server.client.get("/v1/models").json()
    cards = {c["id"]: c for c in body["data"]}
    assert body["object"] == "list" and set(cards) == {server.base, "sql", "math"}
    assert cards[server.base]["parent"] is None and cards[server.base]["root"] == str(served.base)
    assert cards["sql"]["parent"] == server.base and cards["sql"]["root"] == str(served.adapters["sql"])
    assert server.client.get("/v1/models/sql").json()["id"] == "sql"
    missing = server.client.get("/v1/models/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_load_serve_unload_adapter(server, served):
    assert post(server, "/v1/load_lora_adapter", {"lora_name": "spare", "lora_path": "spare"}) \
        .startswith("Success")
    cards = {c["id"]: c for c in server.client.get("/v1/models").json()["data"]}
    assert cards["spare"]["parent"] == server.base
    got = post(server, "/v1/completions", {"model": "spare", "prompt": PROMPTS[1], **GREEDY_BODY})
    fresh = LLM(str(served.base), {"spare": str(served.spare)}, **ENGINE_OPTIONS)
    assert got["choices"][0]["text"] == fresh.generate(PROMPTS[1], greedy(8), "spare")[0].text
    again = post(server, "/v1/load_lora_adapter", {"lora_name": "spare", "lora_path": str(served.spare)}, 400)
    assert "already loaded" in again["error"]["message"]
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "spare"}).startswith("Success")
    gone = post(server, "/v1/completions", {"model": "spare", "prompt": "x"}, 404)
    assert gone["error"]["code"] == "model_not_found"
    missing = post(server, "/v1/unload_lora_adapter", {"lora_name": "spare"}, 404)
    assert missing["error"]["param"] == "lora_name"


@pytest.fixture()
def outside_adapter(served, tmp_path):
    """A valid adapter outside the root, and a symlink inside the root pointing at it."""
    import shutil

    outside = tmp_path / "outside"
    shutil.copytree(served.adapters["sql"], outside)
    link = served.root / f"link-{os.getpid()}"
    link.symlink_to(outside, target_is_directory=True)
    yield outside, link
    link.unlink()


def test_load_adapter_refusals_leave_the_server_serving(server, served, outside_adapter):
    outside, link = outside_adapter
    cases = [
        ({"lora_name": "x", "lora_path": str(outside)}, 403, "outside"),
        ({"lora_name": "x", "lora_path": link.name}, 403, "outside"),  # symlink resolved first
        ({"lora_name": "x", "lora_path": f"../{outside.parent.name}/outside"}, 403, "outside"),
        ({"lora_name": "x", "lora_path": "no-such-adapter"}, 400, "no such"),
        ({"lora_name": "x", "lora_path": "bad\u0000path"}, 400, "lora_path"),
        ({"lora_name": "x", "lora_path": str(served.corrupt)}, 400, "cannot read"),
        ({"lora_name": "x", "lora_path": "mismatched"}, 400, "another base"),
        ({"lora_name": "x", "lora_path": "too-big"}, 400, "max_lora_rank"),
        ({"lora_name": "x", "lora_path": "bad-config"}, 400, "positive integer"),
        ({"lora_name": "x", "lora_path": "nan"}, 400, "NaN"),
        ({"lora_name": "sql", "lora_path": "spare"}, 400, "already loaded"),
        ({"lora_name": server.base, "lora_path": "spare"}, 400, "base model"),
        ({"lora_name": "", "lora_path": "spare"}, 400, "lora_name"),
        ({"lora_path": "spare"}, 400, "lora_name"),
    ]
    for body, status, needle in cases:
        error = post(server, "/v1/load_lora_adapter", body, status)["error"]
        assert needle in error["message"], (body, error)
    assert {c["id"] for c in server.client.get("/v1/models").json()["data"]} == {server.base, "sql", "math"}
    assert post(server, "/v1/completions", {"model": "sql", "prompt": "hi", **GREEDY_BODY})["choices"]
    metrics = server.client.get("/metrics").text
    assert 'inlaid_adapter_api_calls_total{op="load",outcome="error"}' in metrics


def test_loading_is_off_without_adapter_roots(server, served):
    client = TestClient(create_app(server.engine, ServerSettings()))  # no lifespan: shares the engine
    response = client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(served.spare)})
    assert response.status_code == 403 and "--adapter-root" in response.json()["error"]["message"]


def test_unloading_an_adapter_in_use_conflicts(server):
    async def go():
        transport = httpx.ASGITransport(app=server.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            long_request = {"model": "math", "prompt": PROMPTS[0], "temperature": 0, "max_tokens": 20,
                            "ignore_eos": True}
            busy = asyncio.create_task(client.post("/v1/completions", json=long_request))
            while server.engine.num_in_flight == 0:
                await asyncio.sleep(0.002)
            refused = await client.post("/v1/unload_lora_adapter", json={"lora_name": "math"})
            return refused, await busy

    with slow_steps(server.engine.engine):  # >= 1 s for the busy request
        refused, busy = asyncio.run(go())
    assert refused.status_code == 409 and "in flight" in refused.json()["error"]["message"]
    assert busy.status_code == 200 and busy.json()["usage"]["completion_tokens"] == 20
    assert "math" in {c["id"] for c in server.client.get("/v1/models").json()["data"]}


def test_health_metrics_and_no_leaked_blocks(server):
    assert server.client.get("/health").json() == {"status": "ok"}
    assert server.client.head("/health").status_code == 200  # load balancers probe with HEAD too
    post(server, "/v1/completions", {"prompt": "hi", **GREEDY_BODY})
    text = server.client.get("/metrics").text
    for needle in ['inlaid_http_requests_total{method="POST",route="/v1/completions",status="200"}',
                   'inlaid_requests_finished_total{reason="length"}', "inlaid_num_requests_running 0.0",
                   "inlaid_num_requests_waiting 0.0", "inlaid_kv_blocks_used 0.0",
                   "inlaid_kv_blocks_total 256.0", "inlaid_adapter_loads_total", "inlaid_prompt_tokens_total",
                   "inlaid_generation_tokens_total",
                   "inlaid_time_to_first_token_seconds_bucket", "inlaid_e2e_request_latency_seconds_count",
                   "inlaid_engine_up 1.0"]:
        assert needle in text, needle
    free, total = idle_blocks(server.engine)
    assert free == total


def test_api_key(server):
    client = TestClient(create_app(server.engine, ServerSettings(api_key="s3cret")))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        response = client.get("/v1/models", headers=headers)
        assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    assert client.post("/v1/completions", json={"prompt": "hi"}).status_code == 401
    assert client.get("/metrics").status_code == 401
    assert client.get("/health").status_code == 200  # open for load balancers
    assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_loading_an_adapter_does_not_pause_serving(server, monkeypatch):
    """Reading, checking and copying an adapter happen off the engine thread: while a load is held
    inside that part, requests on other adapters still complete; the load then lands."""
    import threading

    adapters = server.engine.engine.adapters
    prepare, gate, threads = adapters.prepare, threading.Event(), []

    def held_prepare(name, path):
        threads.append(threading.current_thread().name)
        assert gate.wait(10)
        return prepare(name, path)

    monkeypatch.setattr(adapters, "prepare", held_prepare)
    result = {}
    body = {"lora_name": "spare2", "lora_path": "spare"}
    loader = threading.Thread(target=lambda: result.update(r=server.client.post("/v1/load_lora_adapter",
                                                                                json=body)))
    loader.start()
    try:
        assert wait_until(lambda: threads)
        assert post(server, "/v1/completions", {"model": "sql", "prompt": "hi", **GREEDY_BODY})["choices"]
        assert loader.is_alive()  # still held: the completion did not wait for it
    finally:
        gate.set()
        loader.join(30)
    assert result["r"].status_code == 200, result["r"].text
    assert post(server, "/v1/completions", {"model": "spare2", "prompt": "hi", **GREEDY_BODY})["choices"]
    post(server, "/v1/unload_lora_adapter", {"lora_name": "spare2"})
