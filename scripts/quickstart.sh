#!/usr/bin/env bash
# The main job on the embedded default model: quantize SmolLM2-135M-Instruct to 4 bits once for
# three tasks of the built-in suite (their trained adapters ship in examples/adapters), add a fourth
# task incrementally, then serve the checkpoint with every adapter, ask each adapter one question
# over the OpenAI API, and stop the server.
# Extra arguments go to `inlaid quantize`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
OUT="${OUT:-out}"
task() { echo "--task $1=examples/adapters/$1:examples/tasks/$1/calib.jsonl"; }
# shellcheck disable=SC2046
inlaid quantize default "$OUT/smollm2-w4" $(task number_words_fr) $(task date_de) $(task sentiment) \
    --bits 4 --group-size 64 --aggregation mean --samples 32 --seq-len 256 --overwrite "$@"
# shellcheck disable=SC2046
inlaid add-task "$OUT/smollm2-w4" $(task geography_qa)
echo "checkpoint: $OUT/smollm2-w4 (tasks.json lists the tasks; adapters/ holds their adapters)"

PORT="${PORT:-8765}"
inlaid serve "$OUT/smollm2-w4" --port "$PORT" --served-model-name smollm2-w4 > "$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null || true' EXIT
python - "$PORT" "$SERVER" <<'PY'
import os, sys, time, httpx
port, pid = sys.argv[1], int(sys.argv[2])
for _ in range(600):
    try:
        if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
            sys.exit(0)
    except httpx.HTTPError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("the server exited; see its log")
    time.sleep(0.5)
sys.exit("the server did not become healthy in 5 minutes")
PY
echo "server: http://127.0.0.1:$PORT (log: $OUT/serve.log)"
python scripts/ask_adapters.py "$OUT/smollm2-w4" --url "http://127.0.0.1:$PORT"
kill -TERM "$SERVER"
wait "$SERVER" || true
trap - EXIT
echo "server stopped"
