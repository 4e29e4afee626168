#!/usr/bin/env bash
# On a GPU machine, one call: build (the built extension is saved to OUTDIR/so for later calls),
# the `gpu` tests, the Llama-3-8B decode-step profile (async and sync scheduling), then the
# paged-attention split sweep. Each part under its own timeout.
#   bash tools/gpu_round.sh [OUTDIR]
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUTDIR="${1:-${OUT:-out/round}}"
mkdir -p "$OUTDIR/so"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
start=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps -e . >"$OUTDIR/build.log" 2>&1 \
  || { echo "BUILD FAILED"; tail -40 "$OUTDIR/build.log"; exit 1; }
cp "$(python3 -c "import pagedjax._kernels as k; print(k.__file__)")" "$OUTDIR/so/" || true
echo "build took $(( $(date +%s) - start )) s"
echo "== gpu tests"
PAGEDJAX_TEST_GPU=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 timeout "${TEST_TIMEOUT:-240}" python3 -m pytest \
  tests/test_kv_write.py tests/test_paged_attention_ffi.py tests/test_paged_attention_variants.py tests/test_gpu_engine.py tests/test_moe.py -m gpu -q -rs -x \
  -p no:cacheprovider 2>&1 | tee "$OUTDIR/gpu_tests.log" | tail -15
if [ "${SKIP_PROFILE:-0}" != 1 ]; then
  for mode in async sync; do
    flag=""; [ "$mode" = sync ] && flag="--sync"
    echo "== profile b1 $mode"
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 timeout 150 python3 benchmarks/profile_step.py --model named:llama3-8b \
      --batch-size 1 --context 512 --steps 30 --max-num-batched-tokens 16 $flag \
      --out "$OUTDIR/profile_b1_$mode.json" > "$OUTDIR/profile_b1_$mode.log" 2>&1
    python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); d.pop("trace"); print(json.dumps(d))' \
      "$OUTDIR/profile_b1_$mode.json" || tail -5 "$OUTDIR/profile_b1_$mode.log"
  done
fi
echo "== split sweep"
XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout "${SWEEP_TIMEOUT:-200}" python3 benchmarks/kernels/paged_attention.py \
  --sweep-splits --kernels tensor_core --out "$OUTDIR/split_sweep.json" > "$OUTDIR/split_sweep.log" 2>&1
tail -45 "$OUTDIR/split_sweep.log"
