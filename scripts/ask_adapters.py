"""Send one chat request per task adapter of a running `inlaid serve` and print the answers.

    python scripts/ask_adapters.py CHECKPOINT [--url http://127.0.0.1:8000] [--max-tokens 48]

Each task's question is the first prompt of its calibration data (tasks.json records the file), so
the answer shows what that adapter does on the shared quantized base. The base model answers the
first question too, for contrast. Uses only the OpenAI wire format (any compatible server works).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import httpx


def first_prompt(data_file: str) -> str:
    with open(data_file) as fh:
        row = json.loads(fh.readline())
    if "messages" in row:
        return next(m["content"] for m in row["messages"] if m["role"] == "user")
    return row.get("prompt") or row["text"][:200]


def ask(client: httpx.Client, model: str, question: str, max_tokens: int) -> str:
    resp = client.post("/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens, "temperature": 0})
    if resp.status_code != 200:
        return f"<HTTP {resp.status_code}: {resp.json().get('error', {}).get('message', resp.text)}>"
    return resp.json()["choices"][0]["message"]["content"].strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    tasks = json.loads((args.checkpoint / "tasks.json").read_text())["tasks"]
    with httpx.Client(base_url=args.url, timeout=300) as client:
        models = client.get("/v1/models").json()["data"]
        base = next(m["id"] for m in models if m.get("parent") is None)
        pairs = [(t["name"], first_prompt(t["data"])) for t in tasks]
        pairs.append((base, pairs[0][1]))
        for model, question in pairs:
            print(f"[{model}] Q: {question}")
            print(f"[{model}] A: {ask(client, model, question, args.max_tokens)}\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
