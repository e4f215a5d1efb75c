#!/usr/bin/env bash
# Check the Triton kernels against another triton release than the one the virtualenv has (the GPU box runs
# triton 3.6; CPU machines get the newest from the package index), without a GPU and without touching the venv:
# that release goes to its own folder, put first on PYTHONPATH, and then
#   1. tools/compile_triton_kernels.py compiles every kernel variant for sm_90 with it (its ptxas), and
#   2. the tests that run Triton (interpreter, TRITON_INTERPRET=1) run with it.
#
#   bash tools/triton_compat.sh 3.6.0          # VENV=.venv by default; the release is kept in $VENV/triton-3.6.0
#
# triton's interpreter before 3.7 fails with numpy >= 2.4 (kernels/utils.py interpreter_problem), so for those
# releases numpy < 2.4 goes into the same folder.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:?usage: bash tools/triton_compat.sh TRITON_VERSION}
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
DIR="$VENV/triton-$VERSION"
if [ ! -f "$DIR/.complete" ]; then
  NUMPY=$("$PY" -c "import sys; v = tuple(map(int, sys.argv[1].split('.')[:2])); print('numpy<2.4' if v < (3, 7) else '')" \
    "$VERSION")
  "$PY" -m pip install -q --disable-pip-version-check --no-deps --upgrade --target "$DIR" "triton==$VERSION" $NUMPY
  touch "$DIR/.complete"
fi
export PYTHONPATH="$PWD/$DIR${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import triton, numpy; print('triton', triton.__version__, 'numpy', numpy.__version__, 'from', triton.__file__)"
"$PY" tools/compile_triton_kernels.py
"$PY" -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py tests/test_triton_fused.py \
  tests/test_triton_model.py tests/test_triton_conv_transpose.py tests/test_triton_conv2d.py tests/test_lstm.py \
  tests/test_transformer_decoder.py tests/test_vae.py tests/test_gpu_decode_bench.py tests/test_generation.py
