#!/usr/bin/env bash
# Create .venv (if missing) and install this project with its test extras.
# torch is pinned first so that the dependency resolver never swaps it. From PyPI, torch==2.13.0 is the CUDA
# build on Linux x86-64 (several GB with its nvidia-* wheels, a few minutes to download; it runs on CPU too);
# set TORCH_SPEC (e.g. a local CPU wheel) to install another build.
# Then, where Go exists, Beam's Prism job server (the portable runner tests/e2e/test_portable_runner.py runs on) is
# built from the Go module proxy into ~/.cache/distill-kd/prism-BEAMVERSION/ (~65 MB, ~3 minutes on 2 cores the
# first time; cached after). Skip it with PRISM=0.
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
if [ "${PRISM:-1}" != 0 ] && command -v go >/dev/null; then
    .venv/bin/python -c "from launch.portable_cluster import prism_binary; print('prism:', prism_binary(build=True))"
fi
