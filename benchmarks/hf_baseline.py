"""HF transformers baselines on the same prompts as benchmarks/throughput.py, each time-capped.

A random-weight HF model is built from one of our named configs (bf16 on the GPU), prompts come
from throughput.make_requests with the same seed and lengths (ignore_eos: every request runs its
full output length). Two engines:

- `generate`: static batches of --batch-size taken in prompt order (no sorting, as vLLM's HF
  baseline), left-padded, greedy; each batch runs to its longest output. TTFT is the batch's
  first token from the start of the run (all requests arrive at once), TPOT its decode step.
- `generate_batch`: HF's continuous batching, with a KV budget that fits beside the model
  (--cb-kv-gb of blocks of --cb-block-size tokens) and attn_implementation --cb-attn (the GPU
  image has no flash-attn: "paged|eager"). Its warm-up is timed apart, not in the rate.

With --time-limit each (workload, engine) stops there: `generate` starts no batch after it and
cuts one still running at 1.5 x the limit, `generate_batch` stops hard at it. Only finished
requests count (req/s and tok/s over the time taken); "completed" says how many of the prompts
that is, so a prefix that finished is labeled as such. Ceilings (copy bandwidth, matmul rate)
are measured through torch in this process; `generate` gets a roofline from the steps its
batches must run (benchmarks/roofline.py).

  python benchmarks/hf_baseline.py --model named:llama3-8b --workload sharegpt:1000 \\
      --workload random:1000:512:128 --engines generate,generate_batch --time-limit 60
  (jax only counts the model's params here: run with XLA_PYTHON_CLIENT_PREALLOCATE=false)
"""

from __future__ import annotations

import argparse
import json
import sys
import time



from common import figures, make_requests, parse_workload, stats_ms, summary_table


# our architecture -> (HF model_type, its config's extra fields from our config)
HF_FAMILIES = {
    "llama": ("llama", lambda c: {}),
    "mistral": ("mistral", lambda c: {"sliding_window": c.sliding_window}),
    "qwen3": ("qwen3", lambda c: {}),
    "qwen3_moe": ("qwen3_moe", lambda c: {
        "num_experts": c.num_experts, "num_experts_per_tok": c.num_experts_per_tok,
        "moe_intermediate_size": c.moe_intermediate_size, "norm_topk_prob": c.norm_topk_prob,
        "decoder_sparse_step": 1, "mlp_only_layers": []}),
    "mixtral": ("mixtral", lambda c: {"num_local_experts": c.num_experts,
                                      "num_experts_per_tok": c.num_experts_per_tok}),
    "gemma2": ("gemma2", lambda c: {
        "hidden_activation": c.activation, "query_pre_attn_scalar": int(c.query_pre_attn_scalar),
        "sliding_window": c.sliding_window, "attn_logit_softcapping": c.attn_logit_softcap,
        "final_logit_softcapping": c.final_logit_softcap, "layer_types": list(c.layer_types)}),
}


def hf_config(name: str):
    """The transformers config of one of our named configs (the families HF_FAMILIES maps)."""
    import transformers

    from pagedjax.models.config import get_config

    c = get_config(name)
    if c.architecture not in HF_FAMILIES:
        raise SystemExit(f"hf_baseline: {c.architecture} configs are not mapped (have {sorted(HF_FAMILIES)})")
    model_type, extra = HF_FAMILIES[c.architecture]
    if c.architecture == "qwen3_moe" and any(not c.is_moe_layer(i) for i in range(c.num_layers)):
        raise SystemExit(f"hf_baseline: {name} has dense layers, which this mapping does not say")
    scaling = None
    if c.rope_scaling.type == "llama3":
        s = c.rope_scaling
        scaling = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                   "high_freq_factor": s.high_freq_factor,
                   "original_max_position_embeddings": s.original_max_position_embeddings}
    elif c.rope_scaling.type not in (None, "none", "default"):
        raise SystemExit(f"hf_baseline: rope scaling {c.rope_scaling.type!r} is not mapped")
    return transformers.CONFIG_MAPPING[model_type](
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_theta, rope_scaling=scaling, tie_word_embeddings=c.tie_word_embeddings,
        torch_dtype="bfloat16", **extra(c))


def hf_model(name: str, device: str):
    """A random-weight transformers model with the architecture of our named config."""
    import torch
    import transformers

    cfg = hf_config(name)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    return model.eval()


class _FirstToken:
    """A generate streamer that notes when the first new tokens arrive (its 1st put is the prompt)."""

    def __init__(self):
        self.puts, self.first = 0, None

    def put(self, value):
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter()

    def end(self):
        pass


def run_generate(model, requests, batch_size: int, time_limit: float, device: str) -> tuple[dict, list]:
    """Static batches in prompt order; returns the figures and the batches done.

    A batch starts only before time_limit; one still running at 1.5 x time_limit is cut (a
    stopping criterion) and not counted.
    """
    import torch
    import transformers

    class Deadline(transformers.StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            cut = bool(time_limit) and time.perf_counter() - t0 > 1.5 * time_limit
            return torch.full((input_ids.shape[0],), cut, dtype=torch.bool, device=input_ids.device)

    done, ttft, tpot, cut = [], [], [], 0
    t0 = time.perf_counter()
    for s in range(0, len(requests), batch_size):
        batch = requests[s:s + batch_size]
        L = max(len(q) for q, _ in batch)
        ids = torch.zeros((len(batch), L), dtype=torch.long)
        mask = torch.zeros((len(batch), L), dtype=torch.long)
        for r, (q, _) in enumerate(batch):
            ids[r, L - len(q):] = torch.tensor(q)
            mask[r, L - len(q):] = 1
        new = max(o for _, o in batch)
        streamer = _FirstToken()
        with torch.no_grad():
            out = model.generate(ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=new, min_new_tokens=new, pad_token_id=0, streamer=streamer,
                                 stopping_criteria=transformers.StoppingCriteriaList([Deadline()]))
        if device == "cuda":
            torch.cuda.synchronize()
        end = time.perf_counter()
        if out.shape[1] - L < new:  # cut by the deadline
            cut = len(batch)
            break
        done.append(batch)
        ttft += [streamer.first - t0] * len(batch)
        tpot += [(end - streamer.first) / max(new - 1, 1)] * len(batch)
        if time_limit and end - t0 > time_limit:
            break
    finished = [r for b in done for r in b]
    res = figures(f"hf-generate(static batch {batch_size})", finished, time.perf_counter() - t0,
                   completed=f"{len(finished)}/{len(requests)}", time_limited=len(finished) < len(requests),
                   **stats_ms("ttft", ttft), **stats_ms("tpot", tpot))
    if cut:
        res["cut_unfinished"] = cut  # requests of the batch stopped at 1.5 x time_limit
    return res, done


def run_generate_batch(model, requests, args, time_limit: float) -> dict:
    """HF continuous batching (generate_batch's manager), all requests queued at once."""
    import transformers

    c = model.config
    kv_per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 2  # bf16
    num_blocks = int(args.cb_kv_gb * 1e9 // (args.cb_block_size * kv_per_token))
    cb = transformers.ContinuousBatchingConfig(
        block_size=args.cb_block_size, num_blocks=num_blocks, max_batch_tokens=args.cb_max_batch_tokens,
        max_requests_per_batch=args.cb_max_requests, allow_block_sharing=False, seed=0)
    gen = transformers.GenerationConfig(do_sample=False, max_new_tokens=max(o for _, o in requests),
                                        pad_token_id=0, eos_token_id=None)
    model.set_attn_implementation(args.cb_attn)
    results, n = {}, len(requests)
    t_setup = time.perf_counter()
    with model.continuous_batching_context_manager(generation_config=gen, continuous_batching_config=cb,
                                                   block=True, timeout=30) as manager:
        t0 = time.perf_counter()
        setup = t0 - t_setup  # cache allocation and warm-up
        for i, (p, o) in enumerate(requests):
            manager.add_request(p, request_id=f"r{i}", max_new_tokens=o, record_timestamps=True, eos_token_id=-1)
        while len(results) < n and not (time_limit and time.perf_counter() - t0 > time_limit):
            out = manager.get_result(timeout=0.5)
            if out is not None and out.is_finished():
                results[out.request_id] = out
            elif out is None and not manager.is_running():
                break
        elapsed = time.perf_counter() - t0
        if len(results) < n:
            manager.stop(block=True, timeout=60, hard_stop=True)
    ok = {rid: r for rid, r in results.items() if r.error is None}
    finished = [requests[int(rid[1:])] for rid in ok]
    short = sum(len(r.generated_tokens) != requests[int(rid[1:])][1] for rid, r in ok.items())
    ttft = [r.timestamps[0] - t0 for r in ok.values() if r.timestamps]
    tpot = [(r.timestamps[-1] - r.timestamps[0]) / (len(r.timestamps) - 1)
            for r in ok.values() if r.timestamps and len(r.timestamps) > 1]
    res = figures(f"hf-generate_batch({args.cb_attn})", finished, elapsed,
                   completed=f"{len(finished)}/{n}", time_limited=len(finished) < n,
                   failed=len(results) - len(ok), setup_s=round(setup, 2),
                   kv_cache={"num_blocks": num_blocks, "block_size": args.cb_block_size,
                             "GB": round(num_blocks * args.cb_block_size * kv_per_token / 1e9, 2),
                             "max_batch_tokens": args.cb_max_batch_tokens,
                             "max_requests_per_batch": args.cb_max_requests},
                   **stats_ms("ttft", ttft), **stats_ms("tpot", tpot))
    if short:
        res["ignore_eos_violations"] = short
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="named:llama3-8b")
    p.add_argument("--dataset", choices=["random", "sharegpt"], default="sharegpt")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--workload", action="append", default=[],
                   help="sharegpt:N or random:N:IN:OUT, repeatable (replaces --dataset etc.); "
                        "a suffix @ENGINE[,ENGINE] overrides --engines for it")
    p.add_argument("--max-len", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engines", default="generate", help="comma list of generate, generate_batch")
    p.add_argument("--batch-size", type=int, default=64, help="generate: static batch size")
    p.add_argument("--time-limit", type=float, default=0,
                   help="per (workload, engine): stop after this many seconds (0: no limit)")
    p.add_argument("--cb-kv-gb", type=float, default=24, help="generate_batch: KV cache budget, GB")
    p.add_argument("--cb-block-size", type=int, default=256)
    p.add_argument("--cb-max-batch-tokens", type=int, default=512)
    p.add_argument("--cb-max-requests", type=int, default=64,
                   help="generate_batch: requests per batch (eager attention's memory grows with it)")
    p.add_argument("--cb-attn", default="paged|eager")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import torch

    from pagedjax.models.config import get_config
    from roofline import ModelCost, measure_ceilings_torch, static_batches_log, summarize

    name = args.model.removeprefix("named:")
    config = get_config(name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ceilings = measure_ceilings_torch()
    t0 = time.perf_counter()
    model = hf_model(name, device)
    with torch.no_grad():  # warm-up: the first generate loads kernels, which no run should pay
        model.generate(torch.full((2, 8), 16, device=device), max_new_tokens=2, min_new_tokens=2, pad_token_id=0)
    if device == "cuda":
        torch.cuda.synchronize()
    cost = ModelCost.from_config(config, "bfloat16")
    out = {"date": time.strftime("%Y-%m-%d"), "model": args.model,
           "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
           "torch": torch.__version__, "transformers": __import__("transformers").__version__,
           "model_init_s": round(time.perf_counter() - t0, 2), "ceilings": ceilings, "runs": []}
    specs = args.workload or [f"{args.dataset}:{args.num_prompts}" + (
        f":{args.input_len}:{args.output_len}" if args.dataset == "random" else "")]
    for spec in specs:
        spec, _, engines = spec.partition("@")  # "random:1000:512:128@generate_batch": this workload's engines
        w = parse_workload(spec, args)
        requests = make_requests(w, config.vocab_size)
        for engine in (engines or args.engines).split(","):
            t_run = time.perf_counter()
            try:
                if engine == "generate":
                    model.set_attn_implementation("sdpa")
                    res, batches = run_generate(model, requests, args.batch_size, args.time_limit, device)
                    log = static_batches_log([[(len(q), o) for q, o in b] for b in batches])
                    res["roofline"] = summarize(log, cost, ceilings, res["elapsed_s"])
                elif engine == "generate_batch":
                    res = run_generate_batch(model, requests, args, args.time_limit)
                else:
                    raise SystemExit(f"unknown engine {engine!r}")
            except (RuntimeError, MemoryError, ValueError) as e:  # OOM included: keep the other runs
                res = {"engine": engine, "error": f"{type(e).__name__}: {str(e)[:500]}",
                       "after_s": round(time.perf_counter() - t_run, 1)}
                if device == "cuda":
                    torch.cuda.empty_cache()
            res["workload"] = w.name
            out["runs"].append(res)
            print(json.dumps(res), flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(out, f, indent=1)
    print(f"\n{out['device']}, {args.model}; copy {ceilings['copy_bw'] / 1e9:.0f} GB/s, matmul "
          f"{ceilings['matmul_rate'] / 1e12:.1f} TFLOP/s (torch)")
    print(summary_table(out["runs"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
