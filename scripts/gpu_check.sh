#!/usr/bin/env bash
# One GPU run: GPU tests, the exllamav2 compatibility check of our GPTQ layout, the per-layer
# quantization timing on Llama-2-7B shapes, and the kernel benchmarks (quant_matmul, multi-LoRA).
# Writes logs and tables under $OUT (default: out/gpu). About 8-9 minutes on an H100, most of it
# exllamav2's first-use CUDA build.
# On the lent GPU machine (no registry): carry .whl (exllamav2 and friends) and call this script.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu}"
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
git rev-parse HEAD 2>/dev/null | tee -a "$OUT/gpu.txt"
status=0
python3 -m pytest -m gpu -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
rc=$?; [ $rc -eq 0 ] || [ $rc -eq 5 ] || status=1  # 5: no GPU tests collected
INLAID_EXPORTED_LAYER=/tmp/inlaid_exported_layer.safetensors python3 scripts/gpu_quant_timing.py "$@" 2>&1 | tee "$OUT/quant_timing.log" || status=1
INLAID_EXPORTED_LAYER=/tmp/inlaid_exported_layer.safetensors python3 scripts/exllama_check.py 2>&1 | tee "$OUT/exllama_check.log" || status=1
python3 scripts/bench_kernels.py 2>&1 | tee "$OUT/bench_kernels.log" || status=1
python3 scripts/bench_lora.py 2>&1 | tee "$OUT/bench_lora.log" || status=1
exit $status
