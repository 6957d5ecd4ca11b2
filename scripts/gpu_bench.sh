#!/usr/bin/env bash
# The `inlaid bench` result shapes on the lent GPU machine, one part per argument:
#
#   bash scripts/gpu_bench.sh [profile] [batch] [adapters] [rates] [engine]
#
#   tests     the GPU test suite (kernels, quantization, engine, model; the server needs fastapi).
#             pytest gets no -q: with the project's addopts (-q) that would drop the summary line
#   pytest    GPU tests of the files or node ids in ${PYTEST_ARGS:-tests/kernels} only
#   kernels   GPU tests of the kernels, then the quant_matmul block-shape sweep at M = 16, 32
#   table     scripts/bench_kernels.py: every quant_matmul backend vs cuBLAS and exllamav2, M 1-2048
#   cuda      GPU tests of the CUDA small-M GEMM (and the other quant_matmul backends), then its
#             launch-config sweep at M = ${SWEEP_M:-1 8 16 32}
#   sweep-cuda  only the CUDA GEMM's launch-config sweep (at M = ${SWEEP_M:-1 8 16 32}; kernels
#             ${SWEEP_KERNELS:-all}, e.g. 4,90), every config's time also in results/sweep_cuda.json
#   ncu       scripts/ncu_gemm.sh: Nsight Compute sections of single GEMM calls, NCU_RUNS="BACKEND M
#             K N CONFIG;..." (default: the CUDA GEMM and the Triton kernel, M = 32, gate/up)
#   attention scripts/bench_attention.py ${ATTENTION_ARGS}: the paged decode attention kernel by variant,
#             loop tile, warps and pipeline stages
#   lora      scripts/bench_lora.py --sweep, then its table: shrink/expand block configs at batch 32
#   ab        scripts/gpu_ab.sh ${AB_VARIANTS:-new:}: decode step times of variants side by side
#   profile   scripts/gpu_engine.py --profile 32 ${PROFILE_ARGS} (where a batch-32 decode step's time
#             goes; PROFILE_ARGS="--profile-adapters 8": over 8 adapters, the HF + PEFT workload)
#   batch     shape 3: prefill / decode / end-to-end latency, distinct / uniform / identical, batch 8-64,
#             vs the fp16 base (batch 1 is the same for every pattern: see batch-hf)
#   batch-hf  shape 3 at batch 1 and 8, distinct, vs HF + PEFT mixed and fp16 (HF + PEFT needs seconds a
#             step at batch 32: its batch-32 figure is in scripts/gpu_engine.py's baselines)
#   adapters  shape 1: throughput vs 1 / 10 / 100 / 1000 adapters (power law), vs fp16 and HF + PEFT
#             (ADAPTER_BASELINES="" runs inlaid alone)
#   rates     shape 2: SLO attainment vs arrival rate, `inlaid` (SLO-aware) vs `fcfs`, rates up to saturation
#   rates-plain  shape 2 for `inlaid` without the SLO targets (--no-slo-aware), same workloads
#   rates-decode-graphs  shape 2 for `inlaid` with CUDA graphs for decode steps only (--cuda-graphs
#             decode): next to `rates`, what the prefill graphs buy at the serving level
#   engine    scripts/gpu_engine.py (correctness, decode speed per batch, the HF + PEFT workload on the
#             engine, HF baselines, the ratios)
#   profile-nocuda, engine-nocuda   the same two with the CUDA small-M GEMM off (INLAID_CUDA_GEMM=0),
#             results under results/nocuda/: run next to profile / engine for a side-by-side comparison
#
# Each part runs under its own time limit (PART_TIMEOUT_<part>, seconds) so that one slow part still
# leaves the others' results. Everything lands in $OUT/results.tar.gz plus one log per part (the
# device returns at most 8 files). exllamav2 is JIT-built on first use (~2.5 min); a prebuilt
# exllamav2_ext.so.xz in .whl/ext (handed back as $OUT/exllamav2_ext.so.xz by a first run) skips that.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu-bench}"
mkdir -p "$OUT/results"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ls .whl/ext/exllamav2_ext*.so.xz >/dev/null 2>&1; then  # a build handed back by an earlier run
    mkdir -p /tmp/ext && xz -dc .whl/ext/exllamav2_ext*.so.xz > /tmp/ext/exllamav2_ext.so \
        && export PYTHONPATH="/tmp/ext${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
INLAID=(python3 -c 'import sys; from inlaid.cli.main import main; sys.argv[0] = "inlaid"; main()')
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "commit ${COMMIT:-unknown}"; } | tee "$OUT/results/gpu.txt"

# build (or load) exllamav2 once, outside every part's time limit; hand a fresh build back
t0=$(date +%s)
python3 -c "import exllamav2.ext" 2>&1 | tail -3
echo "exllamav2 ready in $(( $(date +%s) - t0 )) s"
if ! [ -f /tmp/ext/exllamav2_ext.so ]; then
    so=$(find ~/.cache/torch_extensions -name 'exllamav2_ext*.so' 2>/dev/null | head -1)
    [ -n "$so" ] && cp "$so" "$OUT/exllamav2_ext.so" && strip --strip-debug "$OUT/exllamav2_ext.so" 2>/dev/null; xz -T0 -6 "$OUT/exllamav2_ext.so"
    ls -la "$OUT"/exllamav2_ext.so* 2>/dev/null
fi

M="--model ${BENCH_MODEL:-dummy:llama-2-7b}"
part() {  # part NAME CMD...: run under its limit, log to $OUT/NAME.log
    local name=$1; shift
    local var="PART_TIMEOUT_$name"
    echo "=== $name (limit ${!var:-300} s)"
    timeout "${!var:-300}" "$@" > "$OUT/$name.log" 2>&1
    echo "=== $name rc=$? in $SECONDS s total"
    tail -40 "$OUT/$name.log"
}
rates_part() {  # rates_part NAME FLAGS...: shape 2 (SLO attainment vs arrival rate), policy inlaid + FLAGS
    local name=$1; shift
    part "$name" "${INLAID[@]}" bench sweep rates $M --adapters 5 --tasks sample \
        --rates "${RATES:-16,24,32,48}" --arrival gamma --cv 2 --requests "${RATE_REQUESTS:-300}" --realtime \
        --policy inlaid --latency-slo "${LATENCY_SLO:-10}" --ttft-slo 2 "$@" --out "$OUT/results/${name//_/-}"
}
for what in "$@"; do
    case $what in
        tests) part tests python3 -m pytest -m gpu -p no:cacheprovider tests/kernels tests/quant tests/engine \
            tests/model ;;
        pytest) read -ra files <<< "${PYTEST_ARGS:-tests/kernels}"
            part pytest python3 -m pytest -m gpu -p no:cacheprovider "${files[@]}" ;;
        kernels) part kernels bash -c "python3 -m pytest -m gpu -p no:cacheprovider tests/kernels && \
            python3 scripts/bench_kernels.py --sweep ${SWEEP_M:-16 32}" ;;
        cuda) part cuda bash -c "python3 -m pytest -m gpu -p no:cacheprovider tests/kernels/test_cuda_gemm_gpu.py \
            tests/kernels/test_quant_matmul_gpu.py && python3 scripts/bench_kernels.py --sweep-cuda ${SWEEP_M:-1 8 16 32} \
            --json $OUT/results/sweep_cuda.json" ;;
        table) part table python3 scripts/bench_kernels.py ;;
        sweep-cuda) part sweep_cuda python3 scripts/bench_kernels.py --sweep-cuda ${SWEEP_M:-1 8 16 32} \
            ${SWEEP_KERNELS:+--kernels $SWEEP_KERNELS} --json "$OUT/results/sweep_cuda.json" ;;
        ncu) if [ -n "${NCU_RUNS:-}" ]; then IFS=';' read -ra runs <<< "$NCU_RUNS"; else runs=(); fi
            part ncu bash scripts/ncu_gemm.sh "${runs[@]}" ;;
        attention) part attention python3 scripts/bench_attention.py ${ATTENTION_ARGS:-} ;;
        lora) part lora bash -c "python3 scripts/bench_lora.py --sweep && python3 scripts/bench_lora.py" ;;
        ab) read -ra variants <<< "${AB_VARIANTS:-new:}"; part ab bash scripts/gpu_ab.sh "${variants[@]}" ;;
        profile) part profile python3 scripts/gpu_engine.py --profile 32 ${PROFILE_ARGS:-} --out "$OUT/results" ;;
        batch) part batch "${INLAID[@]}" bench sweep batch $M --patterns distinct,uniform,identical \
            --batch-sizes "${BATCH_SIZES:-8,32,64}" --input-len 128 --output-len 64 --baseline fp16 \
            --out "$OUT/results/batch" ;;
        batch-hf) part batch_hf "${INLAID[@]}" bench sweep batch $M --patterns distinct --batch-sizes 1,8 \
            --input-len 128 --output-len 64 --baseline hf-peft-mixed --baseline fp16 \
            --out "$OUT/results/batch-hf" ;;
        adapters) part adapters "${INLAID[@]}" bench sweep adapters $M --rank 16 --counts "${COUNTS:-1,10,100,1000}" \
            --pattern powerlaw --alpha 1 --arrival all-at-once --requests "${ADAPTER_REQUESTS:-300}" \
            --input-len 8:512 --output-len 8:512 --max-num-seqs 128 \
            ${ADAPTER_BASELINES---baseline fp16 --baseline hf-peft --hf-max-requests ${HF_MAX_REQUESTS:-16}} \
            --out "$OUT/results/adapters" ;;
        rates) rates_part rates --baseline fcfs ;;
        rates-plain) rates_part rates_plain --no-slo-aware ;;
        rates-decode-graphs) rates_part rates_decode_graphs --cuda-graphs decode ;;
        engine) part engine python3 scripts/gpu_engine.py --out "$OUT/results" ;;
        profile-nocuda) mkdir -p "$OUT/results/nocuda"; part profile_nocuda env INLAID_CUDA_GEMM=0 \
            python3 scripts/gpu_engine.py --profile 32 --out "$OUT/results/nocuda" ;;
        engine-nocuda) mkdir -p "$OUT/results/nocuda"; part engine_nocuda env INLAID_CUDA_GEMM=0 \
            python3 scripts/gpu_engine.py --out "$OUT/results/nocuda" ;;
        *) echo "unknown part $what"; exit 2 ;;
    esac
done
tar -czf "$OUT/results.tar.gz" -C "$OUT" results && rm -rf "$OUT/results"
ls -la "$OUT"
