#!/usr/bin/env bash
# Create .venv (if missing) and install this project with its test extras.
# torch is pinned first so that the dependency resolver never swaps it: on a machine with a local
# CPU wheel (like our CI) that is the CPU build; on a GPU machine with internet, the CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "$TORCH_SPEC"
.venv/bin/python -m pip install --quiet -e '.[test]'
.venv/bin/python -c "import torch, deepspeed, transformers, apache_beam; print('installed: torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__, '| beam', apache_beam.__version__)" 2>/dev/null
