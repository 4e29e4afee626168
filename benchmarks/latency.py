"""End-to-end latency of one batch (vLLM's benchmark_latency shape) and the decode step time.

  python benchmarks/latency.py --model named:llama3-8b --batch-size 8 --input-len 32 --output-len 128

Reports the mean and percentiles of the batch's end-to-end time over --iters runs (after a warm-up
run), the time to first token, and the time per output token of a single request (batch 1), which
is the decode step time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from throughput import load  # noqa: E402


def _run(llm, prompts, sp):
    """Seconds to finish the batch, and to its first token."""
    t0 = time.perf_counter()
    first = None
    for out in llm.stream(prompts, sp):
        if first is None and out.outputs[0].token_ids:
            first = time.perf_counter() - t0
    return time.perf_counter() - t0, first


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attn-impl", default="auto")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import jax

    import pagedjax as pj

    if args.dtype is None:
        args.dtype = "bfloat16" if jax.default_backend() == "gpu" else "float32"
    params = load(args)
    rng = np.random.default_rng(args.seed)
    prompts = [rng.integers(16, params.config.vocab_size, size=args.input_len).tolist()
               for _ in range(args.batch_size)]
    t0 = time.perf_counter()
    llm = pj.LLM(params, max_num_seqs=max(args.batch_size, 1), enable_prefix_caching=False,
                 max_num_batched_tokens=max(args.batch_size * args.input_len, 16),
                 max_model_len=args.input_len + args.output_len + 16, attn_impl=args.attn_impl)
    startup = time.perf_counter() - t0
    sp = pj.SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    _run(llm, prompts, sp)  # warm-up
    runs = [_run(llm, prompts, sp) for _ in range(args.iters)]
    e2e = np.array([r[0] for r in runs])
    ttft = np.array([r[1] for r in runs])
    single = [_run(llm, prompts[:1], sp) for _ in range(3)]
    tpot = np.median([(t - f) / (args.output_len - 1) for t, f in single])
    res = {"date": time.strftime("%Y-%m-%d"), "device": str(jax.devices()[0].device_kind),
           "model": args.model, "dtype": args.dtype, "batch_size": args.batch_size,
           "input_len": args.input_len, "output_len": args.output_len, "startup_s": round(startup, 2),
           "e2e_mean_ms": round(1000 * e2e.mean(), 1), "e2e_p50_ms": round(1000 * np.median(e2e), 1),
           "e2e_p90_ms": round(1000 * np.percentile(e2e, 90), 1),
           "ttft_mean_ms": round(1000 * ttft.mean(), 1),
           "batch1_decode_step_ms": round(1000 * tpot, 2)}
    print(json.dumps(res, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
