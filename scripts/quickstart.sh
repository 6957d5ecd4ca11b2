#!/usr/bin/env bash
# The main job on the embedded default model: quantize SmolLM2-135M-Instruct to 4 bits once for
# three demo tasks, then add a fourth task incrementally. Extra arguments go to `inlaid quantize`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
OUT="${OUT:-out}"
DEMO="$OUT/demo"
python scripts/make_demo_tasks.py "$DEMO" > /dev/null
task() { echo "--task $1=$DEMO/$1/adapter:$DEMO/$1.jsonl"; }
# shellcheck disable=SC2046
inlaid quantize default "$OUT/smollm2-w4" $(task arithmetic) $(task dates) $(task sorting) \
    --bits 4 --group-size 64 --aggregation mean --samples 32 --seq-len 256 --overwrite "$@"
# shellcheck disable=SC2046
inlaid add-task "$OUT/smollm2-w4" $(task capitals)
echo "checkpoint: $OUT/smollm2-w4 (tasks.json lists the tasks; adapters/ holds their adapters)"
