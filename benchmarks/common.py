"""What the benchmark scripts share: loading a model (a checkpoint, or a named config's random
weights, quantized at load if asked), the variants of one run, the request sets, and the figures
and tables they report."""

from __future__ import annotations

import argparse
import dataclasses
import json
import timeit

import numpy as np

WEIGHTS = ("bf16", "fp8", "awq", "gptq")  # a variant's weights: "bf16" is the --dtype baseline, else a quantization


@dataclasses.dataclass(frozen=True)
class Variant:
    """One engine of a comparison: its weights' quantization and its pool's dtype."""

    name: str  # e.g. "bf16", "fp8", "fp8+fp8kv", "awq", "bf16+bi"
    quantization: str | None  # None: the weights in --dtype
    kv_cache_dtype: str  # "auto" or "fp8"
    batch_invariant: bool = False  # EngineConfig.batch_invariant ("+bi")
    token_buckets: str = "fine"  # EngineConfig.token_buckets ("+coarse": "coarse")


def add_variant_args(p: argparse.ArgumentParser) -> None:
    """--quantization, --kv-cache-dtype, --variants, --no-baseline."""
    p.add_argument("--quantization", choices=WEIGHTS[1:], default=None,
                   help="quantize the weights at load (named: configs: random weights quantized on the device)")
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto", help="the KV pool's dtype")
    p.add_argument("--variants", default=None,
                   help="comma list of engines to run in turn in this process, each WEIGHTS[+fp8kv][+bi][+coarse] "
                        f"with WEIGHTS in {WEIGHTS} (+bi: batch_invariant; +coarse: token_buckets='coarse'), e.g. "
                        "bf16,fp8,fp8+fp8kv,awq,bf16+bi,bf16+coarse "
                        "(overrides --quantization/--kv-cache-dtype)")
    p.add_argument("--no-baseline", action="store_true",
                   help="with --quantization / --kv-cache-dtype: skip the bf16 baseline run before it")


def parse_variants(args) -> list[Variant]:
    """The engines to run: --variants, else the baseline (unless --no-baseline) and the one asked for."""
    if args.variants:
        out = []
        for name in args.variants.split(","):
            weights, *suffixes = name.split("+")
            if (weights not in WEIGHTS or not set(suffixes) <= {"fp8kv", "bi", "coarse"}
                    or len(set(suffixes)) < len(suffixes)):
                raise SystemExit(f"--variants {name!r}: expected WEIGHTS[+fp8kv][+bi][+coarse], WEIGHTS in {WEIGHTS}")
            out.append(Variant(name, None if weights == "bf16" else weights,
                               "fp8" if "fp8kv" in suffixes else "auto", "bi" in suffixes,
                               "coarse" if "coarse" in suffixes else "fine"))
        return out
    asked = Variant((args.quantization or "bf16") + ("+fp8kv" if args.kv_cache_dtype == "fp8" else ""),
                    args.quantization, args.kv_cache_dtype)
    if asked.name == "bf16" or args.no_baseline:
        return [asked]
    return [Variant("bf16", None, "auto"), asked]


def sharegpt_lengths(rng: np.random.Generator, n: int, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """n (input, output) lengths, ShareGPT-like: log-normal with sigma 1 (mean = exp(mu + 1/2):
    about 230 in, 200 out), a tail to ~2k as ShareGPT's, each clipped to [4, max_len // 2]."""
    ins = np.exp(rng.normal(np.log(230) - 0.5, 1.0, n))
    outs = np.exp(rng.normal(np.log(200) - 0.5, 1.0, n))
    return (np.clip(ins, 4, max_len // 2).astype(int), np.clip(outs, 4, max_len // 2).astype(int))


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
        ins, outs = sharegpt_lengths(rng, n, args.max_len)
    else:
        ins = np.full(n, args.input_len)
        outs = np.full(n, args.output_len)
    return [(rng.integers(num_special, vocab_size, size=int(i)).tolist(), int(o))
            for i, o in zip(ins, outs)]


def load(args, quantization: str | None = None):
    """The model of --model in --dtype, its linears quantized at load with `quantization`."""
    import jax.numpy as jnp

    import pagedjax as pj
    from pagedjax.models.config import get_config

    dtype = jnp.dtype(args.dtype)
    if args.model and args.model.startswith("named:"):
        from pagedjax.dummy_weights import random_params

        return random_params(get_config(args.model[6:]), dtype=dtype, seed=args.seed, quantization=quantization)
    return pj.load_params(args.model, dtype=dtype, quantization=quantization)


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
    return "\n".join(r for r in rows if r is not None)


def variant_table(runs: list[dict], latency: dict[str, dict]) -> str:
    """Each variant beside the first (the baseline): throughput and latencies, and their ratios."""
    names = list(dict.fromkeys([r["variant"] for r in runs if "variant" in r] + list(latency)))
    if len(names) < 2:
        return ""
    base = names[0]

    def ratio(x, y):
        return f"{x / y:.2f}x" if isinstance(x, (int, float)) and isinstance(y, (int, float)) and y else "-"

    rows = [f"| workload | variant | out tok/s | vs {base} | TPOT mean ms | vs {base} | TTFT mean ms |",
            "|" + "---|" * 7] if runs else []
    by = {(r.get("workload"), r.get("variant")): r for r in runs if "req_per_s" in r}
    for w in dict.fromkeys(r.get("workload") for r in runs):
        b = by.get((w, base), {})
        for n in names:
            r = by.get((w, n))
            if r is None:
                continue
            out, tpot = r["output_tok_per_s"], r.get("tpot_mean_ms", "-")
            rows.append(f"| {w} | {n} | {out} | {ratio(out, b.get('output_tok_per_s'))} | {tpot} "
                        f"| {ratio(tpot, b.get('tpot_mean_ms'))} | {r.get('ttft_mean_ms', '-')} |")
    if latency:
        lb = latency.get(base, {})
        rows += ["" if rows else None,
                 f"| W3 latency | variant | e2e mean ms | vs {base} | TPOT ms | batch-1 step ms | vs {base} |",
                 "|" + "---|" * 7]
        for n, m in latency.items():
            e2e, step = m["e2e_mean_ms"], m["batch1_decode_step_ms"]
            rows.append(f"| {m['batch_size']}:{m['input_len']}:{m['output_len']} | {n} | {e2e} | "
                        f"{ratio(e2e, lb.get('e2e_mean_ms'))} | {m['tpot_mean_ms']} | {step} | "
                        f"{ratio(step, lb.get('batch1_decode_step_ms'))} |")
    return "\n".join(r for r in rows if r is not None)


def per_stream_args(doc: str, argv=None) -> argparse.Namespace:
    """The arguments of the per-step host micro-benchmarks: --streams, --calls, --out."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=256)
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def best_ms(fn, calls: int) -> float:
    """ms per call of `fn`: the best of 5 repeats of `calls` calls."""
    return round(min(timeit.repeat(fn, number=calls, repeat=5)) / calls * 1000, 3)


def emit(res: dict, out: str | None) -> int:
    """Prints a result as one JSON line and writes it to `out` when given; returns 0 (the exit code)."""
    print(json.dumps(res))
    if out:
        with open(out, "w") as f:
            json.dump(res, f, indent=1)
    return 0
