#!/usr/bin/env bash
# The H100 benchmark set in one command (bf16, random weights of real configs, fixed seeds):
# W1 ShareGPT-like throughput (pagedjax, then HF generate on the same prompts), W3 latency.
#   bash benchmarks/run_h100.sh OUTDIR      (after pip install --no-build-isolation --no-deps -e .)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUTDIR="${1:-out/bench}"
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 HF_HUB_OFFLINE=1
N="${NUM_PROMPTS:-1000}"
echo "== W1 pagedjax: $N ShareGPT-like requests, llama3-8b"
timeout 420 python3 benchmarks/throughput.py --model named:llama3-8b --dataset sharegpt --num-prompts "$N" \
  --max-len 4096 --max-num-seqs 256 --max-num-batched-tokens 2048 --quiet \
  --out "$OUTDIR/w1_pagedjax.json" 2>&1 | tail -12
echo "== W3 latency: batch 8, 32 in / 128 out, llama3-8b"
timeout 240 python3 benchmarks/latency.py --model named:llama3-8b --batch-size 8 --input-len 32 \
  --output-len 128 --out "$OUTDIR/w3_latency.json" 2>&1 | tail -16
echo "== W1 HF generate (static batches of 64), same prompts"
XLA_PYTHON_CLIENT_MEM_FRACTION=0.1 timeout 300 python3 benchmarks/hf_baseline.py --model named:llama3-8b \
  --dataset sharegpt --num-prompts "$N" --max-len 4096 --batch-size 64 --time-limit "${HF_TIME_LIMIT:-150}" \
  --out "$OUTDIR/w1_hf.json" 2>&1 | tail -20
