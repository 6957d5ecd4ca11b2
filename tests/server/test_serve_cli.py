"""``inlaid serve``: help, options reaching the library unchanged, one-line errors, and a real
process that drains an in-flight request on SIGTERM and exits 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.request

import pytest
import torch
from typer.testing import CliRunner

from inlaid.cli.main import app

from .conftest import wait_until
from ..conftest import run_cli


def test_help():
    result = CliRunner().invoke(app, ["serve", "--help"])
    assert result.exit_code == 0
    for flag in ("--adapter", "--adapter-root", "--api-key", "--max-queue", "--served-model-name",
                 "--policy"):
        assert flag in result.output


def test_options_reach_the_library(monkeypatch, served):
    seen = {}
    monkeypatch.setattr("inlaid.server.launch.serve",
                        lambda config, settings: seen.update(c=config, s=settings))
    sql = served.adapters["sql"]
    code = run_cli(["serve", served.base, "--adapter", f"sql={sql}", "-a", f"math = {served.adapters['math']}",
                "--adapter-root", served.root, "--host", "0.0.0.0", "--port", "9001", "--api-key", "k",
                "--served-model-name", "tiny", "--max-loras", "3", "--max-lora-rank", "16",
                "--max-num-seqs", "7", "--max-model-len", "128", "--policy", "inlaid", "--device", "cpu",
                "--dtype", "float32", "--num-kv-blocks", "99", "--max-queue", "5", "--drain-timeout", "2.5",
                "--ttft-slo", "1.5", "--latency-slo", "8", "--scheduling", "async", "--cuda-graphs", "decode",
                "--gpu-memory-utilization", "0.5", "--kv-cache-gib", "0.25", "--block-size", "8",
                "--max-num-batched-tokens", "512", "--max-tasks-per-step", "4"])
    assert code == 0
    c, s = seen["c"], seen["s"]
    assert c.model == str(served.base)
    assert c.adapters == {"sql": str(sql), "math": str(served.adapters["math"])}
    assert (c.max_loras, c.max_lora_rank, c.max_num_seqs, c.max_model_len, c.policy, c.device, c.dtype,
            c.num_kv_blocks, c.ttft_slo_s, c.latency_slo_s, c.async_scheduling, c.enforce_eager,
            c.prefill_graphs) == (3, 16, 7, 128, "inlaid", "cpu", "float32", 99, 1.5, 8.0, True, False, False)
    assert (c.gpu_memory_utilization, c.kv_cache_gib, c.block_size, c.max_num_batched_tokens,
            c.max_tasks_per_step) == (0.5, 0.25, 8, 512, 4)
    assert (s.host, s.port, s.api_key, s.served_model_name, s.adapter_roots) == \
        ("0.0.0.0", 9001, "k", "tiny", (str(served.root),))
    assert (s.max_queue, s.drain_timeout) == (5, 2.5)


@pytest.mark.parametrize("args, needle", [
    (["--adapter", "nonsense"], "expected NAME=PATH"),
    (["--adapter", "=x"], "expected NAME=PATH"),
    (["--adapter", "a=/no/such/dir"], "not a directory"),
    (["--adapter-root", "/no/such/root"], "not a directory"),
    (["--max-queue", "0"], "--max-queue"),
    (["--ttft-slo", "0"], "ttft_slo_s"),
    (["--latency-slo", "5"], "need --policy inlaid"),
    (["--scheduling", "eager"], "--scheduling"),
    (["--cuda-graphs", "some"], "--cuda-graphs"),
    (["--gpu-memory-utilization", "1.5"], "gpu_memory_utilization"),
    (["--kv-cache-gib", "0"], "kv_cache_gib"),
    (["--block-size", "0"], "block_size"),
])
def test_bad_options_exit_1_with_one_line(capsys, served, args, needle):
    assert run_cli(["serve", served.base, *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


def test_missing_model_exits_1_with_one_line(capsys, tmp_path):
    assert run_cli(["serve", tmp_path / "no-model"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not found" in err[0]


def test_an_adapter_named_like_a_checkpoint_task_is_refused(capsys, monkeypatch, tmp_path, served, tiny_tasks):
    """A checkpoint serves each task's adapter under the task's name; ``-a`` with that name would
    silently serve the flag's adapter in its place."""
    from inlaid.config import QuantConfig, TaskSpec
    from inlaid.quant import pipeline

    ckpt = tmp_path / "q"
    pipeline.quantize(str(served.base), ckpt, [TaskSpec("sql", *tiny_tasks["sql"])],
                      QuantConfig(group_size=32, method="rtn"))
    seen = {}
    monkeypatch.setattr("inlaid.server.launch.serve", lambda config, settings: seen.update(c=config))
    other = served.adapters["math"]
    for command in (["serve", ckpt], ["bench", "serve", "--model", ckpt]):
        assert run_cli([*command, "-a", f"sql={other}"]) == 1, command
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--adapter 'sql'" in err[0] and "pick another name" in err[0], err
    assert "c" not in seen
    assert run_cli(["serve", ckpt, "-a", f"sql2={other}"]) == 0
    assert seen["c"].adapters == {"sql2": str(other)}


def test_port_in_use_or_bad_host_is_one_line_before_the_model_loads(capsys, served, monkeypatch):
    def no_engine(*args, **kwargs):
        raise AssertionError("the model loaded before the port was checked")

    monkeypatch.setattr("inlaid.server.launch.LLMEngine", no_engine)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert run_cli(["serve", served.base, "--port", str(port)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot listen on 127.0.0.1:{port}" in err[0], err
    assert run_cli(["serve", served.base, "--host", "999.1.1.1", "--port", str(port)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "999.1.1.1" in err[0], err


@pytest.mark.parametrize("device", ["tpu", "cuda:banana"] + ([] if torch.cuda.is_available() else ["cuda"]))
def test_bad_device_is_one_line(capsys, served, device):
    assert run_cli(["serve", served.base, "--device", device, "--port", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --device"), err


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sigterm_drains_in_flight_requests_then_exits_0(served, tmp_path):
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-c", "from inlaid.cli.main import main; main()", "serve", str(served.base),
               "--port", str(port), "--num-kv-blocks", "128", "--max-loras", "1", "--max-lora-rank", "8"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: _get(f"{url}/health") == 200, timeout=60), "server did not start"
        results = []
        body = json.dumps({"prompt": "hi", "max_tokens": 240, "temperature": 0, "ignore_eos": True}).encode()

        def request():
            req = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as response:
                results.append((response.status, json.loads(response.read())))

        threads = [threading.Thread(target=request) for _ in range(4)]
        for thread in threads:
            thread.start()
        assert wait_until(lambda: "inlaid_num_requests_in_flight 4.0" in _metrics(url), timeout=30,
                          interval=0.005)
        proc.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(60)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [(status, body["usage"]["completion_tokens"]) for status, body in results] == [(200, 240)] * 4


def _metrics(url: str) -> str:
    with urllib.request.urlopen(f"{url}/metrics", timeout=2) as response:
        return response.read().decode()


def _get(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except OSError:
        return None
