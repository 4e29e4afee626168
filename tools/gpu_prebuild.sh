#!/usr/bin/env bash
# Builds the extension with its CUDA handlers (sm_90a) into .gpu/kernels/, stamped with a digest of
# its sources, for `tools/gpu_stage.sh setup` to carry to a GPU machine instead of building there.
# Needs nvcc (a CUDA toolkit); the result links the CUDA runtime statically.
#
#   bash tools/gpu_prebuild.sh [PYTHON]     PYTHON defaults to the test venv's interpreter
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${1:-$(ls -d "${PAGEDJAX_CACHE:-$HOME/.cache/pagedjax}"/venv-test-*/bin/python 2>/dev/null | head -1)}"
[ -x "$py" ] || { echo "gpu_prebuild.sh: no Python given and no test venv found (run tools/test.sh once)" >&2; exit 1; }
build="$root/build/gpu-prebuild"
cmake -S xla_kernels -B "$build" -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$py" \
  -Dpybind11_DIR="$("$py" -m pybind11 --cmakedir)" -DPAGEDJAX_CUDA=ON >/dev/null
cmake --build "$build" -j "$(nproc)" >&2
mkdir -p .gpu/kernels
rm -f .gpu/kernels/_kernels*.so
cp "$build"/_kernels*.so .gpu/kernels/
(LC_ALL=C; cat xla_kernels/* pyproject.toml) | sha256sum | cut -c1-32 > .gpu/kernels/SOURCE  # as gpu_stage.sh
echo "built $(ls .gpu/kernels/_kernels*.so) from sources $(cat .gpu/kernels/SOURCE)"
