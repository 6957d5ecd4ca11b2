#!/usr/bin/env bash
# Decode step times of several variants on one machine, interleaved over rounds, so that ratios
# between them are side by side (machines of one kind differ by up to ~10% in host speed):
#
#   bash scripts/gpu_ab.sh LABEL:ENV ...        e.g.  base: new: serial:INLAID_BACKEND_LORA_OVERLAP=serial
#
# Each variant runs `scripts/gpu_engine.py --decode-only` (CUDA graphs, batches ${AB_BATCHES:-1,8,32,128})
# with its environment settings (space-separated NAME=VALUE, may be empty). The label `base` runs the
# inlaid package of another commit: `git archive -o .whl/base.tar COMMIT` before the run (.whl is
# carried to the device); this tree's gpu_engine.py drives it. ${AB_ROUNDS:-2} rounds.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -f .whl/base.tar ]; then
    rm -rf /tmp/ab-base && mkdir -p /tmp/ab-base && tar -xf .whl/base.tar -C /tmp/ab-base
fi
status=0
for round in $(seq 1 "${AB_ROUNDS:-2}"); do
    for variant in "$@"; do
        label=${variant%%:*} envs=""
        [[ $variant == *:* ]] && envs=${variant#*:}
        path=$PWD
        if [ "$label" = base ]; then
            [ -d /tmp/ab-base/inlaid ] || { echo "base: no .whl/base.tar"; continue; }
            path=/tmp/ab-base
        fi
        echo "### round $round: $label ${envs:-(defaults)}"
        # shellcheck disable=SC2086  # envs is a list of NAME=VALUE words
        env $envs PYTHONPATH="$path${PYTHONPATH:+:$PYTHONPATH}" python3 scripts/gpu_engine.py --decode-only \
            --batches "${AB_BATCHES:-1,8,32,128}" --out "/tmp/ab-out/$label-$round" > /tmp/ab-run.log 2>&1 \
            || { status=1; echo "$label failed:"; tail -5 /tmp/ab-run.log; }
        grep -E '^\[graphs\] decode|^\[matched\]|^prefill' /tmp/ab-run.log
    done
done
exit $status
