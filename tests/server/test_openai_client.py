"""The official ``openai`` client against a real uvicorn server (127.0.0.1, a free port, API key
on): results equal the offline LLM, streaming, errors as the client's exception types, 200
concurrent requests, and client disconnects (streamed and not) that free their KV blocks."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import httpx
import openai
import pytest

from inlaid.server.app import create_app
from inlaid.server.async_engine import AsyncEngine
from inlaid.server.settings import ServerSettings

from .conftest import PROMPTS, greedy, live_server, make_engine, slow_steps, wait_until

KEY = "test-key"
GREEDY = dict(temperature=0, max_tokens=8, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def server(served):
    engine = AsyncEngine(make_engine(served))
    app = create_app(engine, ServerSettings(api_key=KEY, served_model_name="base",
                                            adapter_roots=(str(served.root),)))
    with live_server(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
        yield SimpleNamespace(url=url, engine=engine, client=client, app=app)


def engine_idle(engine: AsyncEngine) -> bool:
    free, total, busy = asyncio.run(engine.call(
        lambda e: (e.block_manager.num_free_blocks, e.block_manager.num_blocks, e.has_unfinished_requests())))
    return free == total and not busy and engine.num_in_flight == 0


def test_completions_and_chat_equal_offline(server, offline):
    for model, adapter in (("base", None), ("sql", "sql"), ("math", "math")):
        got = server.client.completions.create(model=model, prompt=PROMPTS[1], **GREEDY)
        assert got.choices[0].text == offline.generate(PROMPTS[1], greedy(8), adapter)[0].text
        assert got.usage.completion_tokens == 8
    chat = server.client.chat.completions.create(
        model="sql", messages=[{"role": "user", "content": PROMPTS[2]}], **GREEDY)
    expect = offline.generate([offline.chat_prompt(PROMPTS[2])], greedy(8), "sql")[0].text
    assert chat.choices[0].message.content == expect and chat.choices[0].finish_reason == "length"


def test_streaming_through_the_client(server):
    messages = [{"role": "user", "content": PROMPTS[0]}]
    whole = server.client.chat.completions.create(model="math", messages=messages, **GREEDY)
    chunks = list(server.client.chat.completions.create(model="math", messages=messages, stream=True,
                                                        stream_options={"include_usage": True}, **GREEDY))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and chunks[-1].usage.completion_tokens == 8
    completion = list(server.client.completions.create(model="sql", prompt=PROMPTS[1], stream=True, **GREEDY))
    plain = server.client.completions.create(model="sql", prompt=PROMPTS[1], **GREEDY)
    assert "".join(c.choices[0].text for c in completion) == plain.choices[0].text


def test_echo_logprobs_and_models_through_the_client(server, offline):
    ids = offline.tokenizer(PROMPTS[1])["input_ids"]
    got = server.client.completions.create(model="sql", prompt=[ids], echo=True, logprobs=1, max_tokens=1,
                                           temperature=0)
    lp = got.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.tokens) == len(lp.text_offset) == len(ids) + 1
    models = {m.id: m for m in server.client.models.list()}
    assert set(models) == {"base", "sql", "math"} and models["sql"].parent == "base"
    assert server.client.models.retrieve("math").id == "math"


def test_adapter_loading_through_the_clients_low_level_post(server, offline):
    """vLLM's adapter endpoints are not in the OpenAI SDK; its generic ``post`` reaches them."""
    spare = {"lora_name": "spare", "lora_path": "spare"}
    loaded = server.client.post("/load_lora_adapter", body=spare, cast_to=str)
    assert "spare" in loaded and "spare" in {m.id for m in server.client.models.list()}
    served_by_spare = server.client.completions.create(model="spare", prompt=PROMPTS[0], **GREEDY)
    assert served_by_spare.usage.completion_tokens == 8
    with pytest.raises(openai.BadRequestError, match="already loaded"):
        server.client.post("/load_lora_adapter", body=spare, cast_to=str)
    with pytest.raises(openai.PermissionDeniedError):
        server.client.post("/load_lora_adapter", body={"lora_name": "x", "lora_path": "/"}, cast_to=str)
    server.client.post("/unload_lora_adapter", body={"lora_name": "spare"}, cast_to=str)
    with pytest.raises(openai.NotFoundError):
        server.client.completions.create(model="spare", prompt=PROMPTS[0], **GREEDY)
    metrics = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert 'inlaid_adapter_api_calls_total{op="load",outcome="ok"} 1.0' in metrics


def test_errors_arrive_as_the_clients_exception_types(server):
    with pytest.raises(openai.NotFoundError):
        server.client.completions.create(model="nope", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="context length"):
        server.client.completions.create(model="base", prompt="hi", max_tokens=10 ** 6)
    with pytest.raises(openai.BadRequestError):
        server.client.chat.completions.create(model="base", messages=[], max_tokens=4)
    wrong_key = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong_key.models.list()
    assert httpx.get(f"{server.url}/health").status_code == 200  # no key needed


def test_two_hundred_concurrent_requests(server, offline):
    models = [("base", None), ("sql", "sql"), ("math", "math")]
    jobs = [(PROMPTS[i % len(PROMPTS)], *models[i % len(models)]) for i in range(200)]
    expect = {(p, a): offline.generate(p, greedy(8), a)[0].text for p, _, a in set(jobs)}

    async def run_all():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)
        async with client:
            return await asyncio.gather(*(client.completions.create(model=m, prompt=p, **GREEDY)
                                          for p, m, _ in jobs))

    results = asyncio.run(run_all())
    assert [r.choices[0].text for r in results] == [expect[(p, a)] for p, _, a in jobs]
    assert engine_idle(server.engine)  # no KV block leaked


@pytest.fixture()
def slow_engine(server):
    """>= 50 ms a step: a 200-token request needs >= 10 s, so blocks freed within 5 s were freed by
    the disconnect, not by the request's end."""
    with slow_steps(server.engine.engine, 0.05):
        yield


def _aborted(server) -> float:
    return server.app.state.inlaid.metrics.finished.labels("abort")._value.get()


def test_disconnect_mid_stream_frees_blocks(server, slow_engine):
    body = {"model": "sql", "prompt": PROMPTS[1], "max_tokens": 200, "temperature": 0, "ignore_eos": True,
            "stream": True}
    before = _aborted(server)
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        first = next(line for line in response.iter_lines() if line.startswith("data: "))
        assert '"finish_reason":null' in first
        assert server.engine.num_in_flight == 1
    # leaving the block closed the connection: the server aborts the request
    assert wait_until(lambda: server.engine.num_in_flight == 0, timeout=5)
    assert engine_idle(server.engine) and _aborted(server) == before + 1


def test_disconnect_while_waiting_for_a_whole_response_frees_blocks(server, slow_engine):
    body = {"model": "math", "prompt": PROMPTS[0], "max_tokens": 200, "temperature": 0, "ignore_eos": True}
    before = _aborted(server)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.3),
                   headers={"Authorization": f"Bearer {KEY}"})
    assert wait_until(lambda: server.engine.num_in_flight == 0, timeout=5)
    assert engine_idle(server.engine) and _aborted(server) == before + 1
    stats = server.engine.stats
    assert stats["kv_blocks_used"] == 0 and stats["running"] == 0


def test_lm_eval_local_completions_scores_through_the_server(server, served, offline, monkeypatch):
    """lm-eval's own client (needs lm-eval[api], i.e. tenacity): loglikelihoods equal the engine's."""
    pytest.importorskip("tenacity")
    api = pytest.importorskip("lm_eval.models.openai_completions")
    from lm_eval.api.instance import Instance

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    lm = api.LocalCompletionsAPI(base_url=f"{server.url}/v1/completions", model="sql",
                                 tokenizer=str(served.base), tokenizer_backend="huggingface",
                                 tokenized_requests=True, max_retries=1)
    pairs = [("hello", " world"), ("the quick brown", " fox")]
    got = lm.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i)
                            for i, p in enumerate(pairs)])
    for (context, continuation), (logprob, _) in zip(pairs, got):
        ids = offline.tokenizer(context + continuation)["input_ids"]
        num_context = len(offline.tokenizer(context)["input_ids"])
        ref = offline.generate([ids], greedy(1, prompt_logprobs=1), "sql")[0]
        assert logprob == pytest.approx(sum(p.logprob for p in ref.prompt_logprobs[num_context:]), abs=1e-4)
