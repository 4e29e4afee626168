"""Offline throughput, in the shape of vLLM's benchmark_throughput: req/s and tok/s.

Prompts are random token ids with lengths either fixed (--dataset random) or drawn from a
heavy-tailed ShareGPT-like distribution (--dataset sharegpt: log-normal, mean about 230 in and
200 out, clipped to [4, 2048]), from a seed; every request runs exactly its output length
(ignore_eos). With --hf-baseline, HF transformers' `generate` (static batches, greedy) runs on the
same prompts in the same process, for a figure measured side by side.

Several workloads (--workload, repeatable) run one after another on one engine, so start-up is
paid once; --latency runs W3 (benchmarks/latency.py) on it too. Each run reports req/s, input and
output tok/s, TTFT and TPOT (from RequestOutput.metrics: all requests arrive at once, so TTFT
includes queueing, as in vLLM's offline numbers), and its roofline fractions against a copy
bandwidth and matmul rate measured at the start of the same process (benchmarks/roofline.py).
With --time-limit a workload stops there and reports only the requests that finished.

  python benchmarks/throughput.py                                  # bundled SmolLM2, CPU-sized
  python benchmarks/throughput.py --model named:llama3-8b --num-prompts 1000 --dataset sharegpt
  python benchmarks/throughput.py --model named:llama3-8b --max-len 4096 --latency 8:32:128 \\
      --workload sharegpt:1000 --workload random:1000:512:128 --workload random:500:1024:1024

Quantized weights and the FP8 KV cache run beside their bf16 baseline, one engine after the other
in the same process (random weights of a named config quantized on the device at load):

  python benchmarks/throughput.py --model named:llama3-8b --quantization fp8 --kv-cache-dtype fp8 ...
  python benchmarks/throughput.py --model named:llama3-8b --variants bf16,fp8,fp8+fp8kv,awq ...
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import numpy as np

from common import (add_variant_args, figures, latencies, load, make_requests, parse_variants,  # noqa: F401
                    parse_workload, stats_ms, summary_table, variant_table)

T_START = time.perf_counter()


def run_pagedjax(llm, requests, *, tag: str, time_limit: float = 0, cost=None, ceilings=None) -> dict:
    """Runs the requests on a built engine (all queued at once), stopping at time_limit if set."""
    import pagedjax as pj
    from pagedjax.sampling_params import RequestOutputKind
    from roofline import StepLog, summarize

    eng = llm.engine
    log = StepLog()
    unwrap = log.wrap(eng.runner)
    steps0, pre0 = eng.num_steps, eng.stats().num_preemptions
    ids = [f"{tag}-{i}" for i in range(len(requests))]
    t0 = time.perf_counter()
    for i, (rid, (p, o)) in enumerate(zip(ids, requests)):
        eng.add_request(rid, p, pj.SamplingParams(max_tokens=o, temperature=1.0, top_p=1.0, ignore_eos=True,
                                                  seed=i, output_kind=RequestOutputKind.FINAL_ONLY))
    done = {}
    while len(done) < len(ids):
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
        if time_limit and time.perf_counter() - t0 > time_limit:
            break
    elapsed = time.perf_counter() - t0
    unwrap()
    if len(done) < len(ids):  # time limit: give the pages back, drop the partial requests
        eng.abort_request([r for r in ids if r not in done])
        for _ in range(10):
            eng.step()
            if not eng.has_unfinished_requests():
                break
    outs = [done[r] for r in ids if r in done]
    finished = [req for r, req in zip(ids, requests) if r in done]
    short = sum(len(o.outputs[0].token_ids) != n for o, (_, n) in zip(outs, finished))
    res = figures("pagedjax", finished, elapsed, completed=f"{len(outs)}/{len(ids)}",
                   time_limited=len(outs) < len(ids), steps=eng.num_steps - steps0,
                   preemptions=eng.stats().num_preemptions - pre0, **latencies(outs))
    if short:
        res["ignore_eos_violations"] = short  # requests that ended before their output length
    if cost is not None:
        res["roofline"] = summarize(log, cost, ceilings, elapsed)
    return res


def run_hf(args, params, requests) -> dict:
    """HF transformers generate, static batches of --hf-batch-size, left-padded, greedy."""
    import torch
    import transformers

    if args.model is None:
        from pagedjax.tokenizer import bundled_model_path

        path = str(bundled_model_path())
        model = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
    elif args.model.startswith("named:"):
        raise SystemExit("--hf-baseline with named: configs lives in benchmarks/hf_baseline.py")
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device).eval()
    if device == "cuda":
        model = model.to(torch.bfloat16)
    pad = 0
    t0 = time.perf_counter()
    B = args.hf_batch_size
    order = sorted(range(len(requests)), key=lambda i: len(requests[i][0]))
    for s in range(0, len(order), B):
        batch = [requests[i] for i in order[s:s + B]]
        L = max(len(p) for p, _ in batch)
        ids = torch.full((len(batch), L), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), L), dtype=torch.long)
        for r, (p, _) in enumerate(batch):
            ids[r, L - len(p):] = torch.tensor(p)
            mask[r, L - len(p):] = 1
        new = max(o for _, o in batch)
        with torch.no_grad():
            model.generate(ids.to(device), attention_mask=mask.to(device), do_sample=False,
                           max_new_tokens=new, min_new_tokens=new, pad_token_id=pad)
    if device == "cuda":
        torch.cuda.synchronize()
    return figures(f"hf-generate(batch={B})", requests, time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="HF folder, .gguf, or named:<config> for random weights (default: bundled SmolLM2)")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--dataset", choices=["random", "sharegpt"], default="random")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--workload", action="append", default=[],
                   help="sharegpt:N or random:N:IN:OUT, repeatable: several workloads on one engine "
                        "(replaces --dataset/--num-prompts/--input-len/--output-len)")
    p.add_argument("--time-limit", type=float, default=0,
                   help="per workload: stop after this many seconds, report the requests finished")
    p.add_argument("--budget", type=float, default=0,
                   help="seconds for the whole process: each workload's time limit shrinks to what is "
                        "left (less 15 s to write up), so a capped stage still reports")
    p.add_argument("--latency", default=None, metavar="B:IN:OUT",
                   help="also run W3 (benchmarks/latency.py) on this engine first, e.g. 8:32:128")
    p.add_argument("--max-len", type=int, default=2048, help="max_model_len")
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--attn-impl", default="auto")
    p.add_argument("--num-pages", type=int, default=None, help="KV pages (default: as many as fit)")
    p.add_argument("--moe-impl", default=None, help="MoE models: ragged, capacity, dense, gather or auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hf-baseline", action="store_true",
                   help="also run HF generate on the same prompts (HF folders only; named: configs: hf_baseline.py)")
    p.add_argument("--hf-batch-size", type=int, default=16)
    p.add_argument("--out", default=None, help="write the figures as JSON here (after every workload)")
    p.add_argument("--quiet", action="store_true", help="print only the summary table")
    add_variant_args(p)
    args = p.parse_args(argv)

    import jax

    import pagedjax as pj
    from roofline import ModelCost, measure_ceilings

    if args.dtype is None:
        args.dtype = "bfloat16" if jax.default_backend() == "gpu" else "float32"
    variants = parse_variants(args)
    ceilings = measure_ceilings()  # before the weights: it needs a few GiB of free device memory
    results = {"date": time.strftime("%Y-%m-%d"), "device": str(jax.devices()[0].device_kind),
               "model": args.model or "bundled SmolLM2-135M-Instruct", "dtype": args.dtype,
               "variants": [v.name for v in variants], "engines": {}, "ceilings": ceilings, "runs": []}
    latency: dict[str, dict] = {}

    def save():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)

    specs = args.workload or [None]
    startup_est = 0.0
    first_pool = None  # the first engine's KV pool (pages, bytes a page): later variants get as many bytes
    for vi, v in enumerate(variants):  # one engine at a time: each takes the device's memory for its pool
        t0 = time.perf_counter()
        params = load(args, v.quantization)
        jax.block_until_ready(jax.tree.leaves(params.variables))
        weights_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        num_pages = args.num_pages
        if num_pages is None and first_pool is not None:
            # XLA's VMM allocator (SKIP_TEMP command buffers, pagedjax's GPU default) keeps the memory
            # of the engine just dropped, so the device would report it in use: the later variants'
            # pools get the first one's bytes (1 + that many pages: page 0 is the null page).
            # Same model and page size: a page's bytes scale with the KV dtype's.
            pages, itemsize = first_pool
            num_pages = 1 + pages * itemsize // (1 if v.kv_cache_dtype == "fp8" else jax.numpy.dtype(args.dtype).itemsize)
        llm = pj.LLM(params, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                     max_model_len=args.max_len, attn_impl=args.attn_impl, moe_impl=args.moe_impl,
                     num_pages=num_pages,
                     kv_cache_dtype=v.kv_cache_dtype, quantization=v.quantization,
                     batch_invariant=v.batch_invariant, token_buckets=v.token_buckets)
        startup = time.perf_counter() - t0
        startup_est = max(startup_est, weights_s + startup)
        r = llm.engine.runner
        if first_pool is None:
            first_pool = (r.num_pages - 1, r.kv_dtype.itemsize)
        cost = ModelCost.from_config(params.config, args.dtype, r.kv_dtype)
        results["engines"][v.name] = {
            "max_model_len": r.max_model_len, "max_num_seqs": r.max_num_seqs,
            "max_num_batched_tokens": r.max_num_batched_tokens, "num_pages": r.num_pages, "page_size": r.page_size,
            "attn_impl": r.attn_impl, "quantization": v.quantization, "kv_cache_dtype": r.kv_dtype.name,
            "batch_invariant": v.batch_invariant, "token_buckets": r.token_buckets,
            "weight_GB": round(cost.weight_bytes / 1e9, 3), "expert_GB": round(cost.expert_bytes / 1e9, 3),
            "weights_s": round(weights_s, 2),
            "startup_s": round(startup, 2)}
        if vi == 0:  # the figures of one engine, where they always were
            results.update(engine=results["engines"][v.name], weights_s=round(weights_s, 2),
                           startup_s=round(startup, 2))
        print(f"[{v.name}] weights {weights_s:.1f} s, engine start-up {startup:.1f} s, {r.num_pages} KV pages of "
              f"{r.kv_dtype.name}, weights {cost.weight_bytes / 1e9:.2f} GB"
              + (f" + experts {cost.expert_bytes / 1e9:.2f} GB" if cost.expert_bytes else ""), flush=True)
        if args.latency:
            from latency import measure

            b, i, o = map(int, args.latency.split(":"))
            latency[v.name] = measure(llm, b, i, o, seed=args.seed, cost=cost, ceilings=ceilings)
            results["latency"] = latency if len(variants) > 1 else latency[v.name]
            save()
            print("latency", v.name, json.dumps(latency[v.name]), flush=True)
        for si, spec in enumerate(specs):
            w = parse_workload(spec, args) if spec else argparse.Namespace(
                name=f"{args.dataset}:{args.num_prompts}" + (
                    f":{args.input_len}:{args.output_len}" if args.dataset == "random" else ""),
                dataset=args.dataset, num_prompts=args.num_prompts, input_len=args.input_len,
                output_len=args.output_len, max_len=args.max_len, seed=args.seed)
            requests = make_requests(w, params.config.vocab_size)
            limit = args.time_limit
            if args.budget:  # a fair share of what is left, less the start-ups still to come
                left = args.budget - (time.perf_counter() - T_START) - 15
                runs_left = (len(variants) - vi) * len(specs) - si
                share = (left - startup_est * (len(variants) - vi - 1)) / runs_left
                if share < 5:
                    results["runs"].append({"workload": w.name, "engine": "pagedjax", "variant": v.name,
                                            "skipped": "no budget left"})
                    save()
                    continue
                limit = min(limit or share, share)
            run = run_pagedjax(llm, requests, tag=f"{v.name}-{w.name}", time_limit=limit, cost=cost,
                               ceilings=ceilings)
            run.update(workload=w.name, variant=v.name, engine=f"pagedjax[{v.name}]" if len(variants) > 1 else
                       "pagedjax", mean_input_len=float(np.mean([len(q) for q, _ in requests])),
                       mean_output_len=float(np.mean([o for _, o in requests])))
            results["runs"].append(run)
            save()
            if not args.quiet:
                print(json.dumps(run), flush=True)
            if args.hf_baseline and vi == 0:
                hf = run_hf(args, params, requests)
                hf["workload"] = w.name
                results["runs"].append(hf)
                save()
        del llm, params, r
        gc.unfreeze()  # the engine froze its heap (freeze_gc_heap), cycles and all
        gc.collect()  # the pool and weights go before the next variant loads and sizes its pool
    e = next(iter(results["engines"].values()))
    print(f"\n{results['device']}, {results['model']}, {args.dtype}; weights {e['weights_s']:.1f} s, engine "
          f"start-up {e['startup_s']:.1f} s; copy {ceilings['copy_bw'] / 1e9:.0f} GB/s, matmul "
          f"{ceilings['matmul_rate'] / 1e12:.1f} TFLOP/s ({ceilings['matmul_dtype']})")
    print(summary_table(results["runs"]))
    table = variant_table(results["runs"], latency)
    if table:
        print("\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
