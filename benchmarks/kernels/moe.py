"""MoE expert MLPs on real shapes: ragged_dot vs the padded capacity layout vs every token through every expert
vs the gathered weights of each assignment's expert.

For the MoE layer of Mixtral-8x7B and of Qwen3-30B-A3B (named configs; bf16 weights and
activations) and T tokens in {1, 16, 256, 2048, 8192} routed by random router logits: the median
ms per call of each implementation in pagedjax/models/moe.py, routing included (softmax, top-k,
sort, dispatch, combine), beside two floors measured in the same run: reading the weights of
every expert the tokens hit at the device's copy bandwidth, and the useful FLOPs (2 * 3 * T * k *
D * F) at its bf16 matmul rate. Implementations:

  ragged     jax.lax.ragged_dot grouped GEMMs over the rows sorted by expert
  capacity   the padded [E, C, D] layout with the model's C (moe.capacity), rounds past C looped
  cap_T      the same with C = T: one round, no loop, E * T rows
  cap_<N>    the same with C = N (any N; rounds past N looped): a sweep of the capacity rule
  dense      every token through every expert (E / k times the useful FLOPs)
  gather     each assignment's expert weights gathered [T * k, D, F] (moe "auto" at few tokens)

--fp8 holds the experts as e4m3 codes with one scale per expert and output channel (quantization
'fp8' of an MoE model: weight-only, converted in the matmuls); the weight floor then counts a byte
a weight.

Every implementation's output is compared with "dense" on the same inputs (relative to its scale);
a failure is recorded in the row, never fatal.

    python benchmarks/kernels/moe.py --out moe.json
    python benchmarks/kernels/moe.py --tiny        # tiny shapes, any backend (the CPU too)
    python benchmarks/kernels/moe.py --skew 1.0    # router logits biased per expert: uneven loads
    python benchmarks/kernels/moe.py --fp8 --models qwen3-30b-a3b --tokens 1,2,4,16,64

Dims: T tokens, D hidden, E experts, k experts per token, F expert MLP width, C capacity.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from timing import median_time  # noqa: E402

from pagedjax.models import get_config, moe  # noqa: E402

DTYPE = jnp.bfloat16
IMPLS = ("ragged", "capacity", "cap_T", "dense", "gather")
TINY = {"tiny-mixtral": dict(D=64, F=128, E=8, k=2), "tiny-qwen3-moe": dict(D=64, F=32, E=16, k=4)}


def shapes(name: str) -> dict:
    """(D, F, E, k) of a named config's MoE layer."""
    if name in TINY:
        return TINY[name]
    c = get_config(name)
    return dict(D=c.hidden_size, F=c.moe_intermediate_size, E=c.num_experts, k=c.num_experts_per_tok)


def device_ceilings(on_gpu: bool) -> tuple[float, float]:
    """(copy bandwidth in bytes/s, read + written; bf16 matmul FLOP/s), measured here."""
    n = (1 << 30) if on_gpu else (16 << 20)
    x = jnp.ones((n // 2,), DTYPE)
    copy_bw = 2 * x.nbytes / median_time(jax.jit(jnp.copy), (x,), reps=1)
    m = 8192 if on_gpu else 512
    a = jnp.ones((m, m), DTYPE)
    flops = 2 * m**3 / median_time(jax.jit(lambda a: a @ a), (a,), reps=1)
    return copy_bw, flops


def make_inputs(T: int, D: int, F: int, E: int, reps: int, skew: float, seed: int, fp8: bool = False):
    """`reps` independent (expert weights, x [T, D], router logits [T, E]) triples; fp8: each
    weight is (e4m3 codes, scales [E, out]).

    Each call gets weights of its own: calls sharing one weight could be merged by XLA into one
    GEMM that reads the weights once for all of them (its dot merger), timing less than a call's
    weight traffic."""
    kw, kx, kl = jax.random.split(jax.random.key(seed), 3)

    def weights(key):
        kg, ku, kd = jax.random.split(key, 3)
        return ((jax.random.normal(kg, (E, D, F), jnp.float32) * D**-0.5).astype(DTYPE),  # gate [E, D, F]
                (jax.random.normal(ku, (E, D, F), jnp.float32) * D**-0.5).astype(DTYPE),  # up [E, D, F]
                (jax.random.normal(kd, (E, F, D), jnp.float32) * F**-0.5).astype(DTYPE))  # down [E, F, D]

    ws = tuple(weights(k) for k in jax.random.split(kw, reps))
    if fp8:
        from pagedjax.quantization.fp8 import quantize_experts_fp8

        ws = tuple(tuple(quantize_experts_fp8(m) for m in w) for w in ws)
    xs = tuple(jax.random.normal(k, (T, D), DTYPE) for k in jax.random.split(kx, reps))
    bias = skew * jnp.linspace(1.0, -1.0, E)  # skew > 0: the first experts favoured
    logits = tuple(jax.random.normal(k, (T, E), jnp.float32) + bias for k in jax.random.split(kl, reps))
    return ws, xs, logits


def layer_fn(impl: str, k: int, T: int):
    """The MoE layer after the router: route, run the experts, combine; `reps` calls at once, each
    on its own weights."""
    name, capacity_rows = impl, None
    if impl.startswith("cap_"):
        name, capacity_rows = "capacity", T if impl == "cap_T" else min(T, int(impl[4:]))

    def one(x, logits, w):
        weights, ids = moe.route(logits, k, True)
        keep = jnp.ones(ids.shape, bool)
        scales = None
        if isinstance(w[0], tuple):  # fp8: (codes, scales) of each projection
            w, scales = tuple(c for c, _ in w), tuple(s for _, s in w)
        return moe.expert_mlp(x, weights, ids, keep, *w, activation=jax.nn.silu, impl=name,
                              capacity_rows=capacity_rows, scales=scales).astype(x.dtype)

    return jax.jit(lambda xs, ls, ws: [one(x, lg, w) for x, lg, w in zip(xs, ls, ws)])


def routing_stats(logits: jax.Array, k: int, E: int) -> dict:
    _, ids = moe.route(logits, k, True)
    counts = np.bincount(np.asarray(ids).reshape(-1), minlength=E)
    return {"experts_hit": int((counts > 0).sum()), "max_load": int(counts.max()),
            "mean_load": round(float(counts.mean()), 2)}


def bench_one(model: str, T: int, impls, copy_bw: float, flops: float, skew: float, seed: int,
              fp8: bool = False) -> dict:
    s = shapes(model)
    D, F, E, k = s["D"], s["F"], s["E"], s["k"]
    reps = 8 if T <= 256 else 2  # several calls per dispatch where a call is short
    w, xs, logits = make_inputs(T, D, F, E, reps, skew, seed, fp8)
    row = {"model": model, "tokens": T, "D": D, "F": F, "E": E, "k": k, "reps_per_call": reps,
           "capacity": moe.capacity(T, k, E), **routing_stats(logits[0], k, E), "ms": {}, "rel_err_vs_dense": {}}
    expert_bytes = 3 * D * F * (1 if fp8 else jnp.dtype(DTYPE).itemsize)
    row["weight_floor_ms"] = round(1e3 * row["experts_hit"] * expert_bytes / copy_bw, 4)
    row["flop_floor_ms"] = round(1e3 * 2 * 3 * T * k * D * F / flops, 4)
    outs = {}
    for impl in impls:
        try:
            fn = layer_fn(impl, k, T)
            row["ms"][impl] = round(1e3 * median_time(fn, (xs, logits, w), reps), 4)
            outs[impl] = np.asarray(fn(xs[:1], logits[:1], w[:1])[0], np.float32)
        except Exception as e:  # noqa: BLE001 - record why (an OOM, a compile failure) and go on
            row.setdefault("errors", {})[impl] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    if "dense" in outs:
        ref = outs["dense"]
        scale = float(np.abs(ref).max()) or 1.0
        for impl, out in outs.items():
            row["rel_err_vs_dense"][impl] = float(np.abs(out - ref).max() / scale)
    if row["ms"]:
        row["fastest"] = min(row["ms"], key=row["ms"].get)
    return row


def table(rows: list[dict], impls) -> str:
    head = (["model", "T", "hit", "max/mean load", "C"] + [f"{i} ms" for i in impls] +
            ["weight floor ms", "flop floor ms", "fastest", "max rel err"])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], r["tokens"], r["experts_hit"], f"{r['max_load']}/{r['mean_load']}", r["capacity"]]
        cells += [r["ms"].get(i, "err" if i in r.get("errors", {}) else "-") for i in impls]
        errs = r["rel_err_vs_dense"]
        cells += [r["weight_floor_ms"], r["flop_floor_ms"], r.get("fastest", "-"),
                  f"{max(errs.values()):.1e}" if errs else "-"]
        out.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--models", default="mixtral-8x7b,qwen3-30b-a3b")
    ap.add_argument("--tokens", default="1,16,256,2048,8192")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--skew", type=float, default=0.0, help="per-expert bias of the router logits (0: even)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, to run the script on any backend")
    ap.add_argument("--fp8", action="store_true", help="e4m3 experts, one scale per expert and output channel")
    args = ap.parse_args()
    if args.tiny:
        args.models, args.tokens = ",".join(TINY), "1,16,256"
    dev = jax.devices()[0]
    on_gpu = dev.platform == "gpu"
    if not on_gpu and not args.tiny:
        raise SystemExit("needs a GPU (use --tiny to run the script on the CPU)")
    impls = args.impls.split(",")
    unknown = {i for i in impls if i not in IMPLS and not (i.startswith("cap_") and i[4:].isdigit())}
    if unknown:
        raise SystemExit(f"--impls: unknown {sorted(unknown)} (have {IMPLS} and cap_<N>)")
    copy_bw, flops = device_ceilings(on_gpu)
    print(f"# {dev.device_kind}, jax {jax.__version__}: copy {copy_bw / 1e9:.0f} GB/s (read + write), "
          f"bf16 matmul {flops / 1e12:.0f} TFLOP/s; moe.CAPACITY_FACTOR={moe.CAPACITY_FACTOR}, "
          f"MIN_CAPACITY={moe.MIN_CAPACITY}, skew {args.skew}, "
          f"experts {'e4m3' if args.fp8 else 'bf16'}", flush=True)
    rows = []
    t0 = time.perf_counter()
    for model in args.models.split(","):
        for T in (int(t) for t in args.tokens.split(",")):
            r = bench_one(model, T, impls, copy_bw, flops, args.skew, args.seed, args.fp8)
            rows.append(r)
            print(f"# {model} T={T}: " + ", ".join(f"{i} {ms} ms" for i, ms in r["ms"].items()) +
                  (f"; errors {r['errors']}" if "errors" in r else ""), flush=True)
    print(table(rows, impls))
    print(f"# total {time.perf_counter() - t0:.0f} s")
    if args.out:
        result = {"benchmark": "moe", "date": datetime.datetime.now().isoformat(timespec="seconds"),
                  "device": dev.device_kind, "jax": jax.__version__, "dtype": jnp.dtype(DTYPE).name,
                  "experts": "e4m3" if args.fp8 else jnp.dtype(DTYPE).name,
                  "copy_gb_per_s": round(copy_bw / 1e9, 1), "matmul_tflop_per_s": round(flops / 1e12, 1),
                  "capacity_factor": moe.CAPACITY_FACTOR, "min_capacity": moe.MIN_CAPACITY, "skew": args.skew,
                  "rows": rows}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"# wrote {args.out}")


if __name__ == "__main__":
    main()
