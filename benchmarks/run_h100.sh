#!/usr/bin/env bash
# The H100 benchmark set in stages, each one command well under 10 minutes (bf16, random weights
# of real configs, ignore_eos, fixed seeds). A stage writes JSON and its full log to OUTDIR and
# prints its summary table; every command runs under `timeout`, and the Python side stops early
# (--budget / --time-limit) so a capped stage still writes what it measured.
#   bash benchmarks/run_h100.sh OUTDIR STAGE     (after pip install --no-build-isolation --no-deps -e .)
# Stages, in priority order, with the wall time expected on one H100:
#   llama3     pagedjax, Llama-3-8B, one engine: ceilings, W3 latency (batch 8, 32 in / 128 out;
#              batch-1 decode step), W2 1000 x 512/128, W1 1000 ShareGPT-like, W2 500 x 1024/1024
#              (~60 s start-up + 15 + 35 + 55 + 110 s: ~5 min; capped at BUDGET)
#   startup    3 fresh processes to the first token, Llama-3-8B, compile cache cold / warm / off
#              (~70 + 35 + 70 s: ~3-4 min)
#   hf-llama3  HF generate (static batches of 64) on W2 512/128; HF generate_batch on W2 512/128,
#              W1 and W2 1024/1024; each HF_TIME_LIMIT s (+ set-up): ~5 min
#   llama2     pagedjax, Llama-2-7B: W2 1000 x 512/128, W2 500 x 1024/1024 (its KV is 4x Llama-3's:
#              ~50 sequences of 2048 fit): ~60 + 35 + 250 s: ~6 min; capped at BUDGET
#   hf-llama2  HF generate (static 64) and generate_batch on W2 512/128, generate_batch on
#              W2 1024/1024: ~4 min
#   smoke      every script at toy scale (tiny-llama), any device: ~2 min on 2 CPU cores
#   family     pagedjax on MODEL (env: qwen3-8b, gemma2-9b, gemma3-12b, mistral-7b or phi3-mini): W3
#              latency, W2 1000 x 512/128, W2 500 x 1024/1024; capped at BUDGET (~6 min)
#   families-smoke  the same on tiny-qwen2/3, tiny-mistral, tiny-gemma2/3, tiny-phi3, any device:
#              ~1 min each on 2 CPU cores
#   quant-fp8, quant-fp8kv, quant-awq
#              Llama-3-8B, one process each: the bf16 engine, then the quantized one (fp8 weights;
#              fp8 weights + fp8 KV cache; int4 AWQ-layout weights), random weights quantized on
#              the device at load: W3 latency (batch-1 step), W2 1000 x 512/128, W1 1000 ShareGPT-like
#              (~2 x 170 s; capped at BUDGET)
#   quant-smoke  the quantized variants at toy scale (tiny-llama), any device
# Knobs (env): N1, N2A, N2B prompt counts (1000, 1000, 500); HF_TIME_LIMIT (45 s per HF run);
# BUDGET (540 s per pagedjax stage).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUTDIR="${1:?usage: run_h100.sh OUTDIR STAGE}"
STAGE="${2:?stages: llama3 startup hf-llama3 llama2 hf-llama2 smoke family families-smoke quant-fp8 quant-fp8kv quant-awq quant-smoke}"
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY="${PYTHON:-python3}"
N1="${N1:-1000}" N2A="${N2A:-1000}" N2B="${N2B:-500}"
HF_T="${HF_TIME_LIMIT:-45}" BUDGET="${BUDGET:-540}"
ENGINE=(--max-len 4096 --max-num-seqs 256 --max-num-batched-tokens 2048)

run() {  # run NAME TIMEOUT CMD...: full log to OUTDIR/NAME.log, its summary to stdout
  local name="$1" limit="$2"; shift 2
  echo "== $name: $*"
  timeout "$limit" "$@" > "$OUTDIR/$name.log" 2>&1
  local rc=$?
  grep -E '^(\||latency |cold |warm |off |[A-Za-z].*(GB/s|seconds from spawn))' "$OUTDIR/$name.log" | cut -c1-800
  [ "$rc" = 0 ] || { echo "!! $name exited $rc; last lines:"; tail -n 8 "$OUTDIR/$name.log"; }
}

pagedjax() {  # pagedjax MODEL NAME [--latency B:IN:OUT] WORKLOADS...
  local model="$1" name="$2"; shift 2
  run "$name" $((BUDGET + 40)) "$PY" benchmarks/throughput.py --model "named:$model" "${ENGINE[@]}" \
    --budget "$BUDGET" --quiet --out "$OUTDIR/$name.json" "$@"
}

hf() {  # hf MODEL NAME ARGS...: jax only counts params here, so it must not take the GPU's memory
  local model="$1" name="$2"; shift 2
  XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.05 run "$name" 570 "$PY" benchmarks/hf_baseline.py --model "named:$model" --max-len 4096 \
    --engines generate,generate_batch --batch-size 64 --time-limit "$HF_T" --cb-kv-gb 24 \
    --out "$OUTDIR/$name.json" "$@"
}

case "$STAGE" in
  llama3)
    pagedjax llama3-8b llama3 --latency 8:32:128 --workload "random:$N2A:512:128" \
      --workload "sharegpt:$N1" --workload "random:$N2B:1024:1024" ;;
  startup)
    run startup 570 "$PY" benchmarks/startup.py --model named:llama3-8b --max-len 4096 --max-num-seqs 256 \
      --max-num-batched-tokens 2048 --child-timeout 180 --out "$OUTDIR/startup.json" ;;
  hf-llama3)
    hf llama3-8b hf-llama3 --workload "random:$N2A:512:128" --workload "sharegpt:$N1@generate_batch" \
      --workload "random:$N2B:1024:1024@generate_batch" ;;
  llama2)
    pagedjax llama2-7b llama2 --workload "random:$N2A:512:128" --workload "random:$N2B:1024:1024" ;;
  hf-llama2)
    hf llama2-7b hf-llama2 --workload "random:$N2A:512:128" --workload "random:$N2B:1024:1024@generate_batch" ;;
  smoke)
    ENGINE=(--max-len 128 --max-num-seqs 8 --max-num-batched-tokens 64)
    BUDGET=120 pagedjax tiny-llama smoke-pagedjax --latency 4:16:16 --workload random:16:32:16 --workload sharegpt:16
    HF_T=20 hf tiny-llama smoke-hf --max-len 128 --batch-size 8 --cb-kv-gb 0.01 --cb-block-size 16 \
      --cb-max-batch-tokens 128 --cb-max-requests 8 --workload random:16:32:16 --workload sharegpt:16@generate_batch
    run smoke-startup 300 "$PY" benchmarks/startup.py --model named:tiny-llama --max-len 128 --max-num-seqs 8 \
      --max-num-batched-tokens 64 --child-timeout 90 --out "$OUTDIR/smoke-startup.json" ;;
  family)
    pagedjax "${MODEL:?set MODEL to a named config}" "family-$MODEL" --latency 8:32:128 \
      --workload "random:$N2A:512:128" --workload "random:$N2B:1024:1024" ;;
  families-smoke)
    ENGINE=(--max-len 128 --max-num-seqs 8 --max-num-batched-tokens 64)
    for m in tiny-qwen2 tiny-qwen3 tiny-mistral tiny-gemma2 tiny-gemma3 tiny-phi3; do
      BUDGET=120 pagedjax "$m" "smoke-$m" --latency 4:16:16 --workload random:16:48:32
    done ;;
  quant-fp8|quant-fp8kv|quant-awq)
    variant="${STAGE#quant-}"; [ "$variant" = fp8kv ] && variant=fp8+fp8kv
    pagedjax llama3-8b "$STAGE" --variants "bf16,$variant" --latency 8:32:128 --workload "random:$N2A:512:128" \
      --workload "sharegpt:$N1" ;;
  quant-smoke)
    ENGINE=(--max-len 128 --max-num-seqs 8 --max-num-batched-tokens 64)
    BUDGET=240 pagedjax tiny-llama quant-smoke --variants bf16,fp8,fp8+fp8kv,awq --latency 4:16:16 \
      --workload random:16:32:16 --workload sharegpt:16
    run quant-smoke-latency 300 "$PY" benchmarks/latency.py --model named:tiny-llama --batch-size 4 --input-len 16 \
      --output-len 16 --iters 2 --variants bf16,fp8,fp8+fp8kv,awq --out "$OUTDIR/quant-smoke-latency.json" ;;
  *) echo "unknown stage $STAGE"; exit 2 ;;
esac
