"""What the benchmark scripts share: loading a model (a checkpoint, or a named config's random
weights), the request sets, and the figures and tables they report."""

from __future__ import annotations

import argparse

import numpy as np


def make_requests(args, vocab_size: int, num_special: int = 16):
    """[(prompt ids, output len)] from the seed.

    Fixed-length workloads draw from a stream of their own (seeded by the lengths too): sharing
    one stream, 1024-token prompts would begin with the 512-token prompts of another workload and
    hit the prefix cache.
    """
    rng = np.random.default_rng(args.seed if args.dataset == "sharegpt"
                                else [args.seed, args.input_len, args.output_len])
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
        from pagedjax.dummy_weights import random_params

        return random_params(get_config(args.model[6:]), dtype=dtype, seed=args.seed)
    return pj.load_params(args.model, dtype=dtype)


def latencies(outs) -> dict:
    """TTFT (arrival to first token) and TPOT (first to last token, per later token), in ms."""
    ttft, tpot = [], []
    for o in outs:
        m = o.metrics
        if m is None or m.first_token_time is None:
            continue
        ttft.append(m.first_token_time - m.arrival_time)
        n = len(o.outputs[0].token_ids)
        if n > 1:
            tpot.append((m.last_token_time - m.first_token_time) / (n - 1))
    return {**stats_ms("ttft", ttft), **stats_ms("tpot", tpot)}


def stats_ms(name: str, xs) -> dict:
    """Mean, median and p99 of seconds, as ms."""
    if not len(xs):
        return {}
    xs = 1000 * np.asarray(xs)
    return {f"{name}_mean_ms": round(float(xs.mean()), 2), f"{name}_median_ms": round(float(np.median(xs)), 2),
            f"{name}_p99_ms": round(float(np.percentile(xs, 99)), 2)}


def figures(name, requests, elapsed, **extra) -> dict:
    n_in = sum(len(p) for p, _ in requests)
    n_out = sum(o for _, o in requests)
    return {"engine": name, "requests": len(requests), "elapsed_s": round(elapsed, 3),
            "req_per_s": round(len(requests) / elapsed, 3),
            "input_tok_per_s": round(n_in / elapsed, 1), "output_tok_per_s": round(n_out / elapsed, 1),
            "total_tok_per_s": round((n_in + n_out) / elapsed, 1), **extra}


def parse_workload(spec: str, args) -> argparse.Namespace:
    """"sharegpt:N" or "random:N:IN:OUT" -> the fields make_requests reads."""
    parts = spec.split(":")
    if parts[0] == "sharegpt" and len(parts) == 2:
        n, i, o = int(parts[1]), 0, 0
    elif parts[0] == "random" and len(parts) == 4:
        n, i, o = map(int, parts[1:])
    else:
        raise SystemExit(f"--workload {spec!r}: expected sharegpt:N or random:N:IN:OUT")
    return argparse.Namespace(name=spec, dataset=parts[0], num_prompts=n, input_len=i, output_len=o,
                              max_len=args.max_len, seed=args.seed)


def summary_table(runs: list[dict]) -> str:
    """One markdown row per run: throughput, latencies, roofline fractions."""
    rows = ["| workload | engine | done | req/s | in tok/s | out tok/s | TTFT mean/med ms | "
            "TPOT mean/med ms | decode frac | prefill frac (mfu) | run frac |", "|" + "---|" * 11]
    for r in runs:
        if "req_per_s" not in r:  # skipped or failed
            rows.append(f"| {r.get('workload', '')} | {r.get('engine', '')} | "
                        f"{r.get('skipped') or r.get('error', '')[:80]} |" + " |" * 8)
            continue
        rf = r.get("roofline") or {}
        d, p, w = rf.get("decode", {}), rf.get("prefill", {}), rf.get("run", {})
        engine = r["engine"].replace("|", "/")  # a markdown cell
        rows.append(f"| {r.get('workload', '')} | {engine} | {r.get('completed', r['requests'])} | "
                    f"{r['req_per_s']} | {r['input_tok_per_s']} | {r['output_tok_per_s']} | "
                    f"{r.get('ttft_mean_ms', '-')}/{r.get('ttft_median_ms', '-')} | "
                    f"{r.get('tpot_mean_ms', '-')}/{r.get('tpot_median_ms', '-')} | {d.get('frac', '-')} | "
                    f"{p.get('frac', '-')} ({p.get('mfu', '-')}) | {w.get('frac', '-')} |")
    return "\n".join(rows)
