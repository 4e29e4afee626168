#!/usr/bin/env bash
# On a GPU machine: build, then profile the Llama-3-8B decode step (host vs device) at batch 1,
# under a few settings (VARIANTS: name=ENV... pairs; see below).
#   bash tools/gpu_profile.sh [OUTDIR]
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUTDIR="${1:-${OUT:-out/profile}}"
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 HF_HUB_OFFLINE=1
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  start=$(date +%s)
  python3 -m pip install --no-build-isolation --no-deps -e . >"$OUTDIR/build.log" 2>&1 \
    || { echo "BUILD FAILED"; tail -40 "$OUTDIR/build.log"; exit 1; }
  echo "build took $(( $(date +%s) - start )) s"
fi
run() {  # name, extra args...
  local name=$1; shift
  echo "== $name"
  timeout 240 python3 benchmarks/profile_step.py --model named:llama3-8b --context 512 --steps 30 \
    --max-num-batched-tokens 16 --out "$OUTDIR/profile_$name.json" "$@" 2>&1 \
    | python3 -c 'import sys, json; t = sys.stdin.read(); i = t.find("{\n"); d = json.loads(t[i:]) if i >= 0 else None
print(t[-3000:] if d is None else json.dumps({k: v for k, v in d.items() if k != "trace"}))
tr = (d or {}).get("trace") or {}
print("gpu ms/step", tr.get("gpu_ms_per_step"))
for k in tr.get("top_host_events_ms_per_step", [])[:18]: print("  host", k)
for k in tr.get("top_kernels_ms_per_step", [])[:8]: print("  gpu ", k)'
}
run b1 --batch-size 1 --trace-dir "$OUTDIR/trace_b1"
XLA_FLAGS="--xla_gpu_enable_command_buffer=" run b1_nocmdbuf --batch-size 1 --trace-dir "$OUTDIR/trace_b1_nocmdbuf"
run b1_reference --batch-size 1 --attn-impl reference
