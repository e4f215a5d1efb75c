#!/usr/bin/env bash
# Create (or reuse) the virtualenv and install aigc_rt into it, with what the tests and benchmarks need.
#   torch: reuse one that is already installed (GPU boxes); otherwise torch==2.13.0 (the CPU wheel here:
#   a bare `torch` requirement would download a multi-GB CUDA build).
set -euo pipefail
VENV=${1:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m venv --system-site-packages "$VENV"   # keep the machine's torch (and its CUDA build)
  else
    "$PY" -m venv "$VENV"
  fi
fi
pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"$VENV/bin/python" -c "import torch" 2>/dev/null || "${pip[@]}" torch==2.13.0
"${pip[@]}" -r requirements-dev.txt || echo "bootstrap: warning: could not install every test requirement (offline?)" >&2
"${pip[@]}" --no-build-isolation --no-deps -e .
