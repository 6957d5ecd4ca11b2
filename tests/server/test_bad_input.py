"""Bad input never gives a 500: each case gets a 4xx OpenAI-style error naming the problem, and the
server keeps serving afterwards with no KV blocks leaked. Also: the queue bound (429), an engine
failure mid-request (500 for that request only), the body size limit (413)."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import httpx
import pytest
from fastapi.testclient import TestClient

from inlaid.server.app import create_app
from inlaid.server.async_engine import AsyncEngine
from inlaid.server.protocol import MAX_CHAT_ITEMS, MAX_PROMPT_ITEMS, ChatCompletionRequest, CompletionRequest
from inlaid.server.settings import ServerSettings

from .conftest import PROMPTS, greedy, make_engine, slow_steps

MAX_MODEL_LEN = 64


@pytest.fixture(scope="module")
def server(served):
    engine = AsyncEngine(make_engine(served, max_model_len=MAX_MODEL_LEN))
    app = create_app(engine, ServerSettings(adapter_roots=(str(served.root),)))
    with TestClient(app) as client:
        yield SimpleNamespace(client=client, engine=engine, app=app)


C, CHAT = "/v1/completions", "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]
CASES = {
    # body problems
    "malformed-json": (C, b'{"prompt": "hi", ', 400, None),
    "invalid-utf8": (C, b'{"prompt": "\xff\xfe"}', 400, None),
    "lone-surrogate": (C, b'{"prompt": "\\udc80"}', 400, "prompt"),
    "not-an-object": (C, [1, 2], 400, None),
    "empty-body": (C, b"", 400, None),
    "missing-prompt": (C, {"max_tokens": 4}, 400, "prompt"),
    "prompt-wrong-type": (C, {"prompt": 5}, 400, "prompt"),
    "prompt-mixed-list": (C, {"prompt": ["a", 1]}, 400, "prompt"),
    "empty-prompt": (C, {"prompt": ""}, 400, "prompt"),
    "empty-prompt-list": (C, {"prompt": []}, 400, "prompt"),
    "empty-token-list": (C, {"prompt": [[]]}, 400, "prompt"),
    "negative-token-id": (C, {"prompt": [-1, 5]}, 400, None),
    "token-id-outside-vocab": (C, {"prompt": [1, 10 ** 6]}, 400, None),
    "token-id-overflow": (C, {"prompt": [1, 2 ** 70]}, 400, None),
    # limits
    "prompt-longer-than-context": (C, {"prompt": "x" * (MAX_MODEL_LEN + 10)}, 400, "prompt"),
    "prompt-megabytes": (C, {"prompt": "x" * 10 ** 6}, 400, "prompt"),
    "prompt-plus-max-tokens-too-long": (C, {"prompt": "x" * 40, "max_tokens": 40}, 400, "max_tokens"),
    "max-tokens-huge": (C, {"prompt": "hi", "max_tokens": 10 ** 12}, 400, "max_tokens"),
    "max-tokens-negative": (C, {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    "max-tokens-zero": (C, {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    "max-tokens-string": (C, {"prompt": "hi", "max_tokens": "16"}, 400, "max_tokens"),
    "max-tokens-bool": (C, {"prompt": "hi", "max_tokens": True}, 400, "max_tokens"),
    "max-tokens-float": (C, {"prompt": "hi", "max_tokens": 1.5}, 400, "max_tokens"),
    # sampling options
    "temperature-negative": (C, {"prompt": "hi", "temperature": -0.5}, 400, "temperature"),
    "temperature-string": (C, {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    "top-p-zero": (C, {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    "top-k-below-minus-one": (C, {"prompt": "hi", "top_k": -2}, 400, "top_k"),
    "seed-too-large": (C, {"prompt": "hi", "seed": 2 ** 70}, 400, "seed"),
    "stop-empty-string": (C, {"prompt": "hi", "stop": [""]}, 400, "stop"),
    "stop-too-many": (C, {"prompt": "hi", "stop": [f"s{i}" for i in range(65)]}, 400, "stop"),
    "stop-wrong-type": (C, {"prompt": "hi", "stop": 5}, 400, "stop"),
    "logprobs-too-many": (C, {"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    "n-two": (C, {"prompt": "hi", "n": 2}, 400, "n"),
    "best-of": (C, {"prompt": "hi", "best_of": 3}, 400, "best_of"),
    "suffix": (C, {"prompt": "hi", "suffix": "end"}, 400, "suffix"),
    "presence-penalty": (C, {"prompt": "hi", "presence_penalty": 0.5}, 400, "presence_penalty"),
    "logit-bias": (C, {"prompt": "hi", "logit_bias": {"5": 10}}, 400, "logit_bias"),
    "stream-options-without-stream": (C, {"prompt": "hi", "stream_options": {"include_usage": True}}, 400,
                                      "stream_options"),
    "stream-wrong-type": (C, {"prompt": "hi", "stream": "yes"}, 400, "stream"),
    # models
    "unknown-model": (C, {"model": "nope", "prompt": "hi"}, 404, "model"),
    "unknown-model-chat": (CHAT, {"model": "nope", "messages": USER}, 404, "model"),
    "model-wrong-type": (C, {"model": 3, "prompt": "hi"}, 400, "model"),
    # chat
    "chat-missing-messages": (CHAT, {"max_tokens": 4}, 400, "messages"),
    "chat-empty-messages": (CHAT, {"messages": []}, 400, "messages"),
    "chat-message-not-object": (CHAT, {"messages": ["hi"]}, 400, "messages"),
    "chat-message-without-role": (CHAT, {"messages": [{"content": "hi"}]}, 400, "messages"),
    "chat-image-part": (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
                        "messages"),
    "chat-too-long": (CHAT, {"messages": [{"role": "user", "content": "x" * MAX_MODEL_LEN}]}, 400,
                      "messages"),
    "chat-too-many-messages": (CHAT, {"messages": USER * (MAX_CHAT_ITEMS + 1)}, 400, "messages"),
    "chat-too-many-content-parts": (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]
                                                         * MAX_CHAT_ITEMS}]}, 400, "messages"),
    "chat-max-tokens-too-long": (CHAT, {"messages": USER, "max_tokens": MAX_MODEL_LEN}, 400, "max_tokens"),
    "chat-max-completion-tokens-negative": (CHAT, {"messages": USER, "max_completion_tokens": -3}, 400,
                                            "max_completion_tokens"),
    "chat-top-logprobs-without-logprobs": (CHAT, {"messages": USER, "top_logprobs": 2}, 400, "top_logprobs"),
    "chat-top-logprobs-too-many": (CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 21}, 400,
                                   "top_logprobs"),
    "chat-n-two": (CHAT, {"messages": USER, "n": 2}, 400, "n"),
    # adapters and routes
    "unload-unknown-adapter": ("/v1/unload_lora_adapter", {"lora_name": "nope"}, 404, "lora_name"),
    "unload-base-model": ("/v1/unload_lora_adapter", {"lora_name": "tiny-llama"}, 400, "lora_name"),
    "load-missing-path": ("/v1/load_lora_adapter", {"lora_name": "x"}, 400, "lora_path"),
    "load-name-edge-space": ("/v1/load_lora_adapter", {"lora_name": "x ", "lora_path": "spare"}, 400,
                             "lora_name"),
    "load-name-control-char": ("/v1/load_lora_adapter", {"lora_name": "a\nb", "lora_path": "spare"}, 400,
                               "lora_name"),
    "task-name-dots": ("/v1/tasks", {"name": "..", "adapter_path": "spare", "data_path": "x"}, 400, "name"),
    "unknown-route": ("/v1/nope", {}, 404, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_a_4xx_with_an_openai_error(server, case):
    path, body, status, param = CASES[case]
    if isinstance(body, bytes):
        response = server.client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        response = server.client.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and isinstance(error["type"], str)
    if param is not None:
        assert error["param"] == param, error


def test_bodies_must_be_declared_json(server):
    """Without Content-Type: application/json the body is refused (a web page's "simple" request,
    which skips the CORS preflight, cannot drive the server)."""
    for content_type in (None, "text/plain", "application/x-www-form-urlencoded"):
        headers = {"content-type": content_type} if content_type else {}
        response = server.client.post(C, content=b'{"prompt": "hi"}', headers=headers)
        assert response.status_code == 400 and "application/json" in response.json()["error"]["message"]


def test_wrong_method_and_streaming_bad_input_is_not_a_stream(server):
    response = server.client.get(C)
    assert response.status_code == 405 and response.json()["error"]["message"]
    # validation happens before the event stream starts, so the client gets a plain 4xx
    response = server.client.post(C, json={"prompt": "hi", "stream": True, "max_tokens": 10 ** 9})
    assert response.status_code == 400 and response.headers["content-type"].startswith("application/json")


def test_server_keeps_serving_without_leaks_after_bad_input(server, offline):
    response = server.client.post(C, json={"model": "sql", "prompt": PROMPTS[1], "temperature": 0,
                                           "max_tokens": 8, "ignore_eos": True})
    assert response.json()["choices"][0]["text"] == offline.generate(PROMPTS[1], greedy(8), "sql")[0].text
    free, total, busy = asyncio.run(server.engine.call(
        lambda e: (e.block_manager.num_free_blocks, e.block_manager.num_blocks, e.has_unfinished_requests())))
    assert free == total and not busy and server.engine.num_in_flight == 0
    metrics = server.client.get("/metrics").text
    assert 'route="/v1/completions",status="400"' in metrics and 'status="500"' not in metrics


def test_burst_beyond_the_queue_bound_gets_429s_and_the_server_keeps_serving(server, offline):
    body = {"model": "sql", "prompt": PROMPTS[1], "temperature": 0, "max_tokens": 24, "ignore_eos": True}
    expect = offline.generate(PROMPTS[1], greedy(24), "sql")[0].text

    async def burst():
        transport = httpx.ASGITransport(app=server.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            return await asyncio.gather(*(client.post(C, json=body) for _ in range(16)))

    server.engine.max_queue = 3
    try:
        with slow_steps(server.engine.engine, 0.02):  # the first three surely still run at the end
            responses = asyncio.run(burst())
    finally:
        server.engine.max_queue = 256
    codes = [r.status_code for r in responses]
    assert set(codes) == {200, 429} and codes.count(200) >= 3, codes
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["error"]["type"] == "rate_limit_error" and refused.headers["retry-after"]
    assert all(r.json()["choices"][0]["text"] == expect for r in responses if r.status_code == 200)
    assert server.client.post(C, json=body).json()["choices"][0]["text"] == expect


def test_engine_failure_fails_that_request_with_500_and_the_server_recovers(server):
    def boom(_plan):
        raise RuntimeError("device fell over")

    body = {"prompt": PROMPTS[0], "temperature": 0, "max_tokens": 4, "ignore_eos": True}
    asyncio.run(server.engine.call(lambda e: setattr(e.runner, "launch", boom)))
    try:
        failed = server.client.post(C, json=body)
        with server.client.stream("POST", C, json={**body, "stream": True}) as response:
            events = "".join(response.iter_text())
    finally:
        asyncio.run(server.engine.call(lambda e: delattr(e.runner, "launch")))
    assert failed.status_code == 500 and "device fell over" in failed.json()["error"]["message"]
    assert '"error"' in events and "device fell over" in events and events.endswith("data: [DONE]\n\n")
    assert server.client.post(C, json=body).status_code == 200
    assert server.client.get("/health").status_code == 200


def test_extreme_but_valid_values_do_not_crash_the_batch(server, offline):
    """A denormal temperature overflows softmax and an out-of-range seed overflows torch's generator
    inside the engine step (failing every request in the batch): the server treats temperatures
    below 1e-5 as greedy (as vLLM does) and refuses seeds torch cannot take."""
    body = {"prompt": PROMPTS[1], "max_tokens": 8, "ignore_eos": True}
    tiny = server.client.post(C, json={**body, "temperature": 1e-320})
    assert tiny.status_code == 200
    assert tiny.json()["choices"][0]["text"] == offline.generate(PROMPTS[1], greedy(8))[0].text
    for seed in (2 ** 64 - 1, -(2 ** 63)):
        assert server.client.post(C, json={**body, "seed": seed}).status_code == 200
    assert server.client.post(C, json={**body, "seed": 2 ** 64}).status_code == 400


def test_body_over_the_size_limit_is_413(server):
    client = TestClient(create_app(server.engine, ServerSettings(max_body_bytes=1000)))
    response = client.post(C, json={"prompt": "x" * 5000})
    assert response.status_code == 413 and response.json()["error"]["message"]


def test_prompts_are_tokenized_off_the_event_loop_and_the_first_that_does_not_fit_ends_it(server):
    """Tokenizing a large multi-prompt body takes seconds: it runs on the tokenizer thread, so the
    event loop keeps answering (here /health while the tokenizer is held), and the first prompt too
    long for the context refuses the request before the other prompts are tokenized."""
    state = server.app.state.inlaid
    entered, release, calls = threading.Event(), threading.Event(), []
    encode = state.encode

    def held_encode(text, **kwargs):
        calls.append(text)
        entered.set()
        assert release.wait(5), "the event loop waited for the tokenizer"
        return encode(text, **kwargs)

    result = {}
    body = {"prompt": ["x" * (MAX_MODEL_LEN + 10)] + ["hi"] * 50}
    worker = threading.Thread(target=lambda: result.update(r=server.client.post(C, json=body)))
    state.encode = held_encode
    try:
        worker.start()
        assert entered.wait(10)
        assert server.client.get("/health").status_code == 200  # answered while the tokenizer works
        release.set()
        worker.join(30)
    finally:
        release.set()
        del state.encode
    response = result["r"]
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
    assert len(calls) == 1


def test_a_huge_message_list_is_refused_before_its_messages_are_validated(server):
    """400k messages fit in the body limit; validating each on the event loop held every other
    request for seconds. They are counted first: a 400 naming the limit, the tokenizer never runs."""
    state = server.app.state.inlaid
    state.encode = lambda *a, **k: pytest.fail("a refused chat reached the tokenizer")
    try:
        response = server.client.post(CHAT, json={"messages": USER * 400_000})
    finally:
        del state.encode
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == "messages"
    assert f"at most {MAX_CHAT_ITEMS} messages" in error["message"] and "400000" in error["message"]
    # the limit counts messages and their content parts; as many as it allows still validate
    parts = [{"type": "text", "text": "a"}] * (MAX_CHAT_ITEMS // 2 - 1)
    assert len(ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": parts}] * 2})
               .messages) == 2
    response = server.client.post(CHAT, json={"messages": USER, "max_tokens": 4, "temperature": 0})
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] is not None


def test_a_huge_token_id_prompt_is_refused_before_its_ids_are_validated(server):
    """Token ids fit in the body limit by the million; validating them held the event loop. The
    prompt's items are counted first (ids, strings, the ids of every listed prompt): a 400 naming
    the limit, the tokenizer never runs. As many as the limit allows still validate."""
    state = server.app.state.inlaid
    state.encode = lambda *a, **k: pytest.fail("a refused prompt reached the tokenizer")
    try:
        for prompt in ([1] * 400_000, [[1] * (MAX_PROMPT_ITEMS // 2), [2] * (MAX_PROMPT_ITEMS // 2)]):
            response = server.client.post(C, json={"prompt": prompt, "max_tokens": 1})
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["param"] == "prompt" and f"at most {MAX_PROMPT_ITEMS} token ids" in error["message"]
    finally:
        del state.encode
    assert "400000" in server.client.post(C, json={"prompt": [1] * 400_000}).json()["error"]["message"]
    allowed = [[1] * (MAX_PROMPT_ITEMS // 2 - 1)] * 2
    assert CompletionRequest.model_validate({"prompt": allowed}).prompt == allowed
    assert CompletionRequest.model_validate({"prompt": ["a"] * MAX_PROMPT_ITEMS}).prompt[0] == "a"


def test_max_tokens_beyond_the_kv_cache_is_a_400_naming_it(served):
    """A context longer than the KV cache: an explicit max_tokens that could never fit is refused
    up front with the numbers (not the engine's internal request id)."""
    engine = AsyncEngine(make_engine(served, max_model_len=MAX_MODEL_LEN, num_kv_blocks=4))  # 16 slots
    with TestClient(create_app(engine, ServerSettings())) as client:
        response = client.post(C, json={"prompt": "hi", "max_tokens": 30})
        error = response.json()["error"]
        assert response.status_code == 400 and error["param"] == "max_tokens", error
        assert "16 token slots" in error["message"] and "cmpl-" not in error["message"]
        assert client.post(C, json={"prompt": "hi", "max_tokens": 4}).status_code == 200
