"""End-to-end latency of one batch (vLLM's benchmark_latency shape) and the decode step time.

  python benchmarks/latency.py --model named:llama3-8b --batch-size 8 --input-len 32 --output-len 128
  python benchmarks/latency.py --model named:llama3-8b --variants bf16,fp8,fp8+fp8kv,awq

Reports the mean and percentiles of the batch's end-to-end time over --iters runs (after a warm-up
run), the time to first token, the time per output token of the batch, and that of a single
request (batch 1), which is the decode step time; each next to its roofline (benchmarks/roofline.py,
ceilings measured in the same process). Every run draws fresh random prompts, so the prefix
cache never shortens a prefill. `measure` also runs inside benchmarks/throughput.py (--latency).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time

import numpy as np

from common import add_variant_args, load, parse_variants, variant_table


def _run(llm, prompts, sp):
    """Seconds to finish the batch, and to its first token."""
    t0 = time.perf_counter()
    first = None
    for out in llm.stream(prompts, sp):
        if first is None and out.outputs[0].token_ids:
            first = time.perf_counter() - t0
    return time.perf_counter() - t0, first


def measure(llm, batch_size: int, input_len: int, output_len: int, iters: int = 5, seed: int = 0,
            cost=None, ceilings: dict | None = None) -> dict:
    """W3 on a built engine: batch end-to-end, TTFT, TPOT, and the batch-1 decode step (ms)."""
    import pagedjax as pj

    vocab = llm.engine.runner.config.vocab_size
    rng = np.random.default_rng([seed, 0x1A7])  # a stream no throughput workload draws from
    fresh = lambda b: [rng.integers(16, vocab, size=input_len).tolist() for _ in range(b)]  # noqa: E731
    sp = pj.SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    _run(llm, fresh(batch_size), sp)  # warm-up
    runs = [_run(llm, fresh(batch_size), sp) for _ in range(iters)]
    e2e = np.array([r[0] for r in runs])
    ttft = np.array([r[1] for r in runs])
    tpot = (e2e - ttft) / max(output_len - 1, 1)
    single = [_run(llm, fresh(1), sp) for _ in range(3)]
    step1 = float(np.median([(t - f) / max(output_len - 1, 1) for t, f in single]))
    res = {"batch_size": batch_size, "input_len": input_len, "output_len": output_len, "iters": iters,
           "e2e_mean_ms": round(1000 * e2e.mean(), 1), "e2e_p50_ms": round(1000 * np.median(e2e), 1),
           "e2e_p90_ms": round(1000 * np.percentile(e2e, 90), 1),
           "ttft_mean_ms": round(1000 * ttft.mean(), 2), "tpot_mean_ms": round(1000 * tpot.mean(), 2),
           "batch1_decode_step_ms": round(1000 * step1, 2)}
    if cost is not None and ceilings is not None:
        from roofline import decode_step_roofline

        mid = input_len + output_len // 2  # mean context over the decode steps
        t_prefill = max(x / y for x, y in zip(
            cost.step(batch_size * input_len, batch_size, batch_size * input_len,
                      batch_size * input_len * (input_len + 1) // 2),
            (ceilings["copy_bw"], ceilings["matmul_rate"])))
        t_b = decode_step_roofline(cost, ceilings, batch_size, mid)
        t_1 = decode_step_roofline(cost, ceilings, 1, mid)
        res["roofline"] = {
            "ttft_floor_ms": round(1000 * t_prefill, 2), "ttft_frac": round(t_prefill / ttft.mean(), 3),
            "tpot_floor_ms": round(1000 * t_b, 2), "tpot_frac": round(t_b / tpot.mean(), 3),
            "batch1_step_floor_ms": round(1000 * t_1, 2), "batch1_step_frac": round(t_1 / step1, 3),
            "note": "floors from benchmarks/roofline.py at the mean decode context input+output/2"}
    return res


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
    p.add_argument("--moe-impl", default=None, help="MoE models: ragged, capacity, dense, gather or auto")
    p.add_argument("--out", default=None)
    add_variant_args(p)
    args = p.parse_args(argv)

    import jax

    import pagedjax as pj
    from roofline import ModelCost, measure_ceilings

    if args.dtype is None:
        args.dtype = "bfloat16" if jax.default_backend() == "gpu" else "float32"
    ceilings = measure_ceilings()
    variants = parse_variants(args)
    res = {"date": time.strftime("%Y-%m-%d"), "device": str(jax.devices()[0].device_kind),
           "model": args.model, "dtype": args.dtype}
    by_variant = {}
    for v in variants:  # one engine at a time, each beside the first (the baseline)
        params = load(args, v.quantization)
        t0 = time.perf_counter()
        llm = pj.LLM(params, max_num_seqs=max(args.batch_size, 1), enable_prefix_caching=False,
                     max_num_batched_tokens=max(args.batch_size * args.input_len, 16),
                     max_model_len=args.input_len + args.output_len + 16, attn_impl=args.attn_impl,
                     moe_impl=args.moe_impl, kv_cache_dtype=v.kv_cache_dtype, quantization=v.quantization,
                     batch_invariant=v.batch_invariant, token_buckets=v.token_buckets)
        startup = time.perf_counter() - t0
        cost = ModelCost.from_config(params.config, args.dtype, llm.engine.runner.kv_dtype)
        by_variant[v.name] = {"startup_s": round(startup, 2), "quantization": v.quantization,
                              "kv_cache_dtype": llm.engine.runner.kv_dtype.name,
                              "weight_GB": round(cost.weight_bytes / 1e9, 3),
                              **measure(llm, args.batch_size, args.input_len, args.output_len, args.iters, args.seed,
                                        cost, ceilings)}
        del llm, params
        gc.collect()  # the pool and weights go before the next variant sizes its pool
    if len(variants) == 1:
        res.update(by_variant[variants[0].name])
    else:
        res["variants"] = by_variant
    print(json.dumps(res, indent=1))
    table = variant_table([], by_variant)
    if table:
        print(table)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
