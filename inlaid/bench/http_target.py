"""Load-generate against any OpenAI-compatible server: streaming ``/v1/completions`` over httpx.

Each request is sent at its arrival time (or at once with ``realtime=False``) under a bound on
requests in flight; its clock starts at the scheduled arrival, so waiting for a free slot counts.
The server streams Server-Sent Events (``data: {json}`` lines, ``data: [DONE]`` at the end): the
first chunk carrying text is the first token, the last chunk the finish. Output tokens are the
``usage.completion_tokens`` of the final chunk (``stream_options.include_usage``) when the server
sends it, else the number of text chunks. ``model`` is the adapter name; ``ignore_eos`` (a vLLM
extension other servers ignore) and ``max_tokens`` fix the output length.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from inlaid.bench.metrics import RequestTimeline
from inlaid.bench.requests import Workload, map_adapters, prompt_ids
from inlaid.bench.workload import Request
from inlaid.errors import ConfigError

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class HttpOptions:
    url: str
    max_concurrency: int = 64
    api_key: str | None = None
    timeout_s: float = 600.0
    realtime: bool = True
    seed: int = 0
    warmup_requests: int = 1  # short requests before timing (connections, the server's first request)

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"--url {self.url!r}: expected http://HOST:PORT")
        if self.max_concurrency < 1:
            raise ConfigError("--max-concurrency must be at least 1")

    @property
    def base(self) -> str:
        return self.url.rstrip("/").removesuffix("/v1")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def _client(options: HttpOptions):
    import httpx

    limits = httpx.Limits(max_connections=options.max_concurrency,
                          max_keepalive_connections=options.max_concurrency)
    return httpx.AsyncClient(base_url=options.base, headers=options.headers(), limits=limits,
                             timeout=httpx.Timeout(options.timeout_s, connect=30.0))


async def served_models(client) -> tuple[str | None, list[str]]:
    """(base model id, adapter ids) from ``GET /v1/models``: adapters are the cards with a ``parent``
    (vLLM's convention); a server that lists no parents has base = first card, adapters = the rest."""
    try:
        response = await client.get("/v1/models")
    except Exception as exc:  # connection refused, DNS, timeout: one clear line
        raise ConfigError(f"cannot reach {client.base_url}: {type(exc).__name__}: {exc}") from None
    if response.status_code != 200:
        raise ConfigError(f"GET /v1/models answered {response.status_code}: {response.text[:200]}")
    cards = response.json().get("data") or []
    ids = [c["id"] for c in cards if isinstance(c, dict) and "id" in c]
    if not ids:
        raise ConfigError("GET /v1/models lists no models")
    adapters = [c["id"] for c in cards if c.get("parent")]
    if adapters:
        base = next((c["id"] for c in cards if not c.get("parent")), None)
        return base, adapters
    return ids[0], ids[1:]


def request_body(request: Request, model: str | None, seed: int) -> dict:
    body = {"prompt": request.prompt or prompt_ids(request, seed), "max_tokens": request.output_len,
            "temperature": 0.0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    if model is not None:
        body["model"] = model
    return body


async def _send(client, request: Request, body: dict, t0: float) -> RequestTimeline:
    arrival = request.arrival_s
    first = last = None
    chunks, usage_tokens, error = 0, None, None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                error = f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')[:200]}"
            else:
                async for line in response.aiter_lines():
                    now = time.monotonic() - t0
                    event = _parse_event(line)
                    if event is None:
                        continue
                    if event == "[DONE]":
                        break
                    if "error" in event:
                        error = str(event["error"])[:200]
                        break
                    choices = event.get("choices") or []
                    if any(c.get("text") for c in choices):
                        chunks += 1
                        first = now if first is None else first
                    if choices:
                        last = now
                    usage_tokens = (event.get("usage") or {}).get("completion_tokens", usage_tokens)
    except Exception as exc:  # connection refused, reset, timeout: the request failed, the run goes on
        error = f"{type(exc).__name__}: {exc}"
    end = time.monotonic() - t0
    tokens = usage_tokens if usage_tokens is not None else chunks
    if error is None and (last is None or tokens < 1):
        error = "the stream ended without output"
    if error is not None:
        return RequestTimeline(arrival, None, max(end, arrival), request.input_len, 0,
                               request_id=request.request_id, adapter=request.adapter, error=error)
    first = last if first is None else first
    return RequestTimeline(arrival, max(first, arrival), max(last, first, arrival), request.input_len, tokens,
                           request_id=request.request_id, adapter=request.adapter)


def _parse_event(line: str):
    line = line.strip()
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return data
    try:
        event = json.loads(data)
    except json.JSONDecodeError:
        return {"error": f"bad SSE data: {data[:100]}"}
    return event if isinstance(event, dict) else None


async def _run(options: HttpOptions, workload: Workload, no_lora: bool,
               progress: Progress | None) -> list[RequestTimeline]:
    async with _client(options) as client:
        base, adapters = await served_models(client)
        models = {name: base for name in workload.adapter_names} if no_lora else \
            map_adapters(workload.adapter_names, adapters)
        warm = Request(-1, 0.0, workload.adapter_names[0], 16, 4)
        for _ in range(options.warmup_requests):
            await _send(client, warm, request_body(warm, models[warm.adapter], options.seed), time.monotonic())
        semaphore = asyncio.Semaphore(options.max_concurrency)
        timelines: list[RequestTimeline] = []
        t0 = time.monotonic()

        async def one(request: Request) -> None:
            arrival = request.arrival_s if options.realtime else 0.0
            await asyncio.sleep(max(0.0, t0 + arrival - time.monotonic()))
            async with semaphore:
                timed = Request(request.request_id, arrival, request.adapter, request.input_len,
                                request.output_len, request.prompt)
                timelines.append(await _send(client, timed, request_body(request, models[request.adapter],
                                                                          options.seed), t0))
            if progress is not None:
                progress(len(timelines), len(workload.requests))

        await asyncio.gather(*(one(r) for r in workload.requests))
    return sorted(timelines, key=lambda t: t.request_id)


def run_http(options: HttpOptions, workload: Workload, no_lora: bool = False,
             progress: Progress | None = None) -> list[RequestTimeline]:
    """Send every request of ``workload`` to the server; failures are recorded, not raised."""
    try:
        import httpx  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"benchmarking a server needs httpx: pip install httpx ({exc})") from exc
    return asyncio.run(_run(options, workload, no_lora, progress))
