#!/usr/bin/env bash
# On a GPU machine: build the extension with its CUDA handlers, run the tests
# marked `gpu`, run the kernel benchmarks, and write every log to one folder.
#
#   bash tools/gpu_check.sh [OUTDIR]       (default: $OUT if set, else out/gpu)
#
# Assumes an image with jax 0.11.2 + the CUDA plugin, flax, transformers,
# scikit-build-core, pybind11, cmake and nvcc (the GPU image). Wheels for
# anything missing there can sit in .whl/ (installed into /tmp/site first).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUTDIR="${1:-${OUT:-out/gpu}}"
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY="${PY:-python3}"

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

{
  date -u; git rev-parse HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c 'import jax, flax, sys; print(sys.version); print("jax", jax.__version__, jax.devices())'
} 2>&1 | tee "$OUTDIR/env.txt"

echo "== build" | tee "$OUTDIR/build.log"
start=$(date +%s)
"$PY" -m pip install --no-build-isolation --no-deps -e . >>"$OUTDIR/build.log" 2>&1 \
  || { echo "BUILD FAILED"; tail -50 "$OUTDIR/build.log"; exit 1; }
echo "build took $(( $(date +%s) - start )) s" | tee -a "$OUTDIR/build.log"
"$PY" -c 'import pagedjax, pagedjax._ffi as f; print("with_cuda", f.with_cuda(), sorted(f.register()))' \
  2>&1 | tee -a "$OUTDIR/build.log"

echo "== gpu tests"
# The files with `gpu` tests (the rest need packages the GPU image may lack, e.g. openai).
GPU_TEST_FILES="${GPU_TEST_FILES:-tests/test_kv_write.py tests/test_paged_attention_ffi.py tests/test_paged_attention_variants.py tests/test_gpu_engine.py tests/test_quantization_matmul.py tests/test_gpu_quantized.py tests/test_moe.py}"
PAGEDJAX_TEST_GPU=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 timeout "${TEST_TIMEOUT:-600}" "$PY" -m pytest $GPU_TEST_FILES -m gpu -q -rs \
  -p no:cacheprovider 2>&1 | tee "$OUTDIR/gpu_tests.log" | tail -40
rc=${PIPESTATUS[0]}

if [ "${SKIP_BENCH:-0}" != 1 ]; then
  echo "== kernel benchmarks"
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout 300 "$PY" benchmarks/kernels/paged_attention.py \
    --out "$OUTDIR/paged_attention.json" 2>&1 | tee "$OUTDIR/bench_paged_attention.log" | tail -60
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout 400 "$PY" benchmarks/kernels/moe.py \
    --out "$OUTDIR/moe.json" 2>&1 | tee "$OUTDIR/bench_moe.log" | tail -20
fi
exit $rc
