#!/usr/bin/env bash
# Nsight Compute sections of single quant_matmul calls (one per run, the 11th call of 20):
#   bash scripts/ncu_gemm.sh "BACKEND M K N CONFIG" ...    CONFIG: nw,unroll,split,stages or -
# Default: the CUDA GEMM (its default config) and the Triton kernel at M = 32 on the gate/up shape.
# NCU_EXTRA: more ncu options (e.g. "--metrics group:smsp__pcsamp_warp_stall_reasons").
# --clock-control none: leave the GPU's clocks as they are (the device's METHOD.md).
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || set -- "cuda 32 4096 22016 -" "triton 32 4096 22016 -"
for run in "$@"; do
    read -r backend m k n cfg <<< "$run"
    echo "##### $backend M=$m K=$k N=$n config=$cfg"
    extra=()
    [ "${cfg:--}" != - ] && extra=(--config "$cfg")
    ncu --clock-control none --launch-skip 10 --launch-count 1 -k "regex:qgemm4|quant_matmul" \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
        --section WarpStateStats --section SchedulerStats --section LaunchStats ${NCU_EXTRA:-} \
        python3 scripts/bench_kernels.py --repeat "$backend" "$m" "$k" "$n" "${extra[@]}" 2>&1 \
        | grep -v "^==PROF=="
done
