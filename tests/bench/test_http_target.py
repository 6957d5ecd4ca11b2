"""The OpenAI-API load generator against servers on 127.0.0.1: a stub that speaks only the wire format,
and the real inlaid server over dummy:tiny when ``inlaid.server`` imports."""

import pytest

from inlaid.bench.http_target import HttpOptions, _parse_event, run_http
from inlaid.bench.runner import BenchConfig, run_all
from inlaid.errors import ConfigError

from .conftest import live_server, stub_openai_app, tiny_engine_config, tiny_workload


@pytest.fixture(scope="module")
def workload():
    return tiny_workload(num_requests=6, num_adapters=3, arrival="poisson", rate=200.0)


def _check(timelines, workload):
    assert [t.request_id for t in timelines] == [r.request_id for r in workload.requests]
    for t, r in zip(timelines, workload.requests):
        assert t.is_ok, t.error
        assert t.output_tokens == r.output_len and t.input_tokens == r.input_len
        assert t.arrival_s == pytest.approx(r.arrival_s) and t.arrival_s <= t.first_token_s <= t.finish_s


def test_stub_server_streams_and_bounded_concurrency(workload):
    with live_server(stub_openai_app) as url:
        timelines = run_http(HttpOptions(url, max_concurrency=2), workload)
        _check(timelines, workload)
        assert all(t.finish_s - t.first_token_s > 0 for t in timelines if t.output_tokens > 1)  # streamed
        base = run_http(HttpOptions(url + "/v1", max_concurrency=1), workload, no_lora=True)
        _check(base, workload)


def test_errors_are_recorded_not_raised(workload):
    async def refusing_app(scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/v1/completions":
            await send({"type": "http.response.start", "status": 429, "headers": []})
            await send({"type": "http.response.body", "body": b'{"error": {"message": "busy"}}'})
        else:
            await stub_openai_app(scope, receive, send)

    with live_server(refusing_app) as url:
        timelines = run_http(HttpOptions(url, warmup_requests=0), workload)
    assert all(not t.is_ok and t.error.startswith("HTTP 429") for t in timelines)
    with pytest.raises(ConfigError, match="cannot reach"):
        run_http(HttpOptions("http://127.0.0.1:9"), workload)
    assert _parse_event("data: [DONE]") == "[DONE]" and _parse_event(": keep-alive") is None


def test_real_inlaid_server(workload):
    pytest.importorskip("fastapi")
    try:
        from inlaid.engine.llm_engine import LLMEngine
        from inlaid.server.app import create_app
        from inlaid.server.async_engine import AsyncEngine
    except ImportError as exc:  # the server is not there: the stub test above covers the client
        pytest.skip(f"inlaid.server is not importable: {exc}")
    engine = AsyncEngine(LLMEngine(tiny_engine_config(dummy_adapters=3)))
    try:
        with live_server(create_app(engine)) as url:
            results = run_all(BenchConfig(url=url, baselines=("no-lora",), ttft_slo_s=30.0), workload)
    finally:
        engine.close()
    assert [r.name for r in results] == ["server", "no-lora"]
    for result in results:
        _check(result.timelines(), workload)
        assert result.target == "http" and result.summary["slo"]["attainment"] == 1.0
