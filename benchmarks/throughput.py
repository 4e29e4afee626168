"""Offline throughput, in the shape of vLLM's benchmark_throughput: req/s and tok/s.

Prompts are random token ids with lengths either fixed (--dataset random) or drawn from a
heavy-tailed ShareGPT-like distribution (--dataset sharegpt: log-normal, mean about 230 in and
200 out, clipped to [4, 2048]), from a seed; every request runs exactly its output length
(ignore_eos). With --hf-baseline, HF transformers' `generate` (static batches, greedy) runs on the
same prompts in the same process, for a figure measured side by side.

  python benchmarks/throughput.py                                  # bundled SmolLM2, CPU-sized
  python benchmarks/throughput.py --model named:llama3-8b --num-prompts 1000 --dataset sharegpt
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def make_requests(args, vocab_size: int, num_special: int = 16):
    """[(prompt ids, output len)] from the seed."""
    rng = np.random.default_rng(args.seed)
    n = args.num_prompts
    if args.dataset == "sharegpt":
        # log-normal with sigma 1: mean = exp(mu + 1/2); tail to ~2k, as ShareGPT's.
        ins = np.exp(rng.normal(np.log(230) - 0.5, 1.0, n))
        outs = np.exp(rng.normal(np.log(200) - 0.5, 1.0, n))
        ins = np.clip(ins, 4, args.max_len // 2).astype(int)
        outs = np.clip(outs, 4, args.max_len // 2).astype(int)
    else:
        ins = np.full(n, args.input_len)
        outs = np.full(n, args.output_len)
    return [(rng.integers(num_special, vocab_size, size=int(i)).tolist(), int(o))
            for i, o in zip(ins, outs)]


def load(args):
    import jax.numpy as jnp

    import pagedjax as pj
    from pagedjax.models.config import get_config

    dtype = jnp.dtype(args.dtype)
    if args.model and args.model.startswith("named:"):
        from pagedjax.models.random_init import random_params

        return random_params(get_config(args.model[6:]), dtype=dtype, seed=args.seed)
    return pj.load_params(args.model, dtype=dtype)


def run_pagedjax(args, params, requests) -> dict:
    import pagedjax as pj

    t0 = time.perf_counter()
    llm = pj.LLM(params, max_num_seqs=args.max_num_seqs,
                 max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_len,
                 attn_impl=args.attn_impl)
    startup = time.perf_counter() - t0
    sps = [pj.SamplingParams(max_tokens=o, temperature=1.0, top_p=1.0, ignore_eos=True, seed=i)
           for i, (_, o) in enumerate(requests)]
    t0 = time.perf_counter()
    outs = llm.generate([p for p, _ in requests], sps, use_tqdm=not args.quiet)
    elapsed = time.perf_counter() - t0
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    assert n_out == sum(o for _, o in requests), "ignore_eos: every request runs its full length"
    return _figures("pagedjax", requests, elapsed, startup=startup, steps=llm.engine.num_steps,
                    preemptions=llm.engine.stats().num_preemptions)


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
    return _figures(f"hf-generate(batch={B})", requests, time.perf_counter() - t0)


def _figures(name, requests, elapsed, **extra) -> dict:
    n_in = sum(len(p) for p, _ in requests)
    n_out = sum(o for _, o in requests)
    return {"engine": name, "requests": len(requests), "elapsed_s": round(elapsed, 3),
            "req_per_s": round(len(requests) / elapsed, 3),
            "output_tok_per_s": round(n_out / elapsed, 1),
            "total_tok_per_s": round((n_in + n_out) / elapsed, 1), **extra}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="HF folder, .gguf, or named:<config> for random weights (default: bundled SmolLM2)")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--dataset", choices=["random", "sharegpt"], default="random")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--max-len", type=int, default=2048, help="max_model_len")
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--attn-impl", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hf-baseline", action="store_true", help="also run HF generate on the same prompts")
    p.add_argument("--hf-batch-size", type=int, default=16)
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    import jax

    if args.dtype is None:
        args.dtype = "bfloat16" if jax.default_backend() == "gpu" else "float32"
    params = load(args)
    requests = make_requests(args, params.config.vocab_size)
    results = {"date": time.strftime("%Y-%m-%d"), "device": str(jax.devices()[0].device_kind),
               "model": args.model or "bundled SmolLM2-135M-Instruct", "dtype": args.dtype,
               "dataset": args.dataset, "num_prompts": args.num_prompts,
               "mean_input_len": float(np.mean([len(p) for p, _ in requests])),
               "mean_output_len": float(np.mean([o for _, o in requests])), "runs": []}
    results["runs"].append(run_pagedjax(args, params, requests))
    if args.hf_baseline:
        results["runs"].append(run_hf(args, params, requests))
    print(json.dumps(results, indent=1))
    print("\n| engine | req/s | output tok/s | total tok/s | elapsed s |\n|---|---|---|---|---|")
    for r in results["runs"]:
        print(f"| {r['engine']} | {r['req_per_s']} | {r['output_tok_per_s']} | "
              f"{r['total_tok_per_s']} | {r['elapsed_s']} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
