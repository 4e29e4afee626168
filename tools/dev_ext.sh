#!/usr/bin/env bash
# Builds the pagedjax._kernels extension in place (pagedjax/_kernels*.so) for working on a
# checkout without installing it: then `PYTHONPATH=. python -m pytest tests/test_x.py` runs
# against this tree. CPU handlers only by default (seconds); `--cuda` also compiles the CUDA
# handlers (sm_90a), to check that they build.
#
#   bash tools/dev_ext.sh [--cuda] [PYTHON]     PYTHON defaults to the test venv's interpreter
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cuda=OFF
if [ "${1:-}" = "--cuda" ]; then cuda=ON; shift; fi
py="${1:-}"
if [ -z "$py" ]; then
  py="$(ls -d "${PAGEDJAX_CACHE:-$HOME/.cache/pagedjax}"/venv-test-*/bin/python 2>/dev/null | head -1)"
fi
[ -x "$py" ] || { echo "dev_ext.sh: no Python given and no test venv found (run tools/test.sh once)" >&2; exit 1; }
build="$root/build/dev-$cuda"
cmake -S "$root/xla_kernels" -B "$build" -DCMAKE_BUILD_TYPE=Release \
  -DPython_EXECUTABLE="$py" -Dpybind11_DIR="$("$py" -m pybind11 --cmakedir)" \
  -DPAGEDJAX_CUDA="$cuda" >/dev/null
cmake --build "$build" >&2
cp "$build"/_kernels*.so "$root/pagedjax/"
echo "built $(ls "$root"/pagedjax/_kernels*.so)"
