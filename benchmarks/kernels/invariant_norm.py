"""Batch-invariant norms: XLA's own RMSNorm vs the row tiles vs the row-statistics kernel.

RMSNorm behind a residual add (as in the model) on Llama-3-8B's hidden rows (4096), a hidden
size that is not a power of two (2560, Qwen3-4B's), and per-head rows (32 heads x 128, the q/k
norm), bf16, at M = 1, 16, 256, 2048 rows. Methods:
- `plain`: the norm as the default mode runs it (XLA's reduction, compiled by shape);
- `tiles`: layers.row_tiled, fixed-size row tiles in a loop (PAGEDJAX_BATCH_INVARIANT_NORM=tiles);
- `kernel`: models/invariant_norm.row_moments, one Pallas program per row, the rest elementwise
  (PAGEDJAX_BATCH_INVARIANT_NORM=kernel; interpreted off the GPU).

For each: ms per call (median; `--loop N` calls in one jitted scan, so launch overhead is shared),
the largest error against a float64 oracle, and whether it is batch-invariant: each M's rows,
drawn at random from a 2048-row input, must equal those rows of the 2048-row result bit for bit.

    python benchmarks/kernels/invariant_norm.py --out results.json
    python benchmarks/kernels/invariant_norm.py --dry-run     # tiny shapes, any backend
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from timing import median_time

from pagedjax.models import layers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import emit  # noqa: E402

SHAPES = {"hidden": (4096,), "hidden-2560": (2560,), "qk-heads": (32, 128)}
ROWS = (1, 16, 256, 2048)
DRY_SHAPES = {"hidden": (72,), "heads": (3, 16)}
DRY_ROWS = (1, 8, 40)
METHODS = ("plain", "tiles", "kernel")


def norm_fn(method: str, w: jax.Array):
    """f(x, r) -> RMSNorm(x + r) with scale w, as `method` runs it."""
    mod = layers.RMSNorm(eps=1e-5, batch_invariant=method != "plain",
                         invariant_norm=None if method == "plain" else method)
    variables = {"params": {"scale": w}}
    return lambda x, r: mod.apply(variables, x + r)


def run_shape(name: str, shape: tuple[int, ...], rows: tuple[int, ...], loop: int, rng) -> list[dict]:
    big = max(rows)
    x_all = rng.standard_normal((big, *shape)) * rng.uniform(0.01, 30, (big,) + (1,) * len(shape))
    r_all = rng.standard_normal((big, *shape))
    w = jnp.asarray(rng.uniform(0.5, 1.5, shape[-1:]), jnp.bfloat16)
    x_all, r_all = jnp.asarray(x_all, jnp.bfloat16), jnp.asarray(r_all, jnp.bfloat16)
    h = np.asarray((x_all + r_all).astype(jnp.float32), np.float64)
    want = h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + 1e-5) * np.asarray(w.astype(jnp.float32), np.float64)
    results = []
    for method in METHODS:
        f = jax.jit(norm_fn(method, w))
        y_big = np.asarray(f(x_all, r_all).astype(jnp.float32))
        # `loop` calls in one program, each on the previous output (so none is hoisted or merged)
        many = jax.jit(lambda x, r, f=f: jax.lax.fori_loop(0, loop, lambda i, c: f(c, r), x))
        for m in rows:
            idx = np.sort(rng.choice(big, m, replace=False))
            x, r = x_all[idx], r_all[idx]
            y = np.asarray(f(x, r).astype(jnp.float32))
            ms = 1e3 * median_time(many, (x, r), loop, repeats=5)
            results.append(dict(shape=name, dims=list(shape), method=method, M=m, ms=round(ms, 4),
                                max_abs_err=float(np.abs(y - want[idx]).max()),
                                invariant=bool(np.array_equal(y, y_big[idx]))))
            print(results[-1], flush=True)
    return results


def table(results: list[dict]) -> str:
    ms = sorted({r["M"] for r in results})
    lines = ["| shape | method | " + " | ".join(f"M={m}" for m in ms) + " | invariant |",
             "|" + "---|" * (len(ms) + 3)]
    for shape, method in dict.fromkeys((r["shape"], r["method"]) for r in results):
        rs = [r for r in results if r["shape"] == shape and r["method"] == method]
        cells = " | ".join(f"{r['ms']:.4f}" for r in rs)
        lines.append(f"| {shape} | {method} | {cells} | {all(r['invariant'] for r in rs)} |")
    return "ms per call\n" + "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes (any backend)")
    p.add_argument("--rows", default=None, help="comma-separated row counts (default 1,16,256,2048)")
    p.add_argument("--loop", type=int, default=None, help="calls per timed program (default 50; dry run 2)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    shapes = DRY_SHAPES if args.dry_run else SHAPES
    rows = tuple(int(r) for r in args.rows.split(",")) if args.rows else (DRY_ROWS if args.dry_run else ROWS)
    loop = args.loop or (2 if args.dry_run else 50)
    rng = np.random.default_rng(0)
    results = []
    for name, shape in shapes.items():
        results += run_shape(name, shape, rows, loop, rng)
    print(table(results))
    return emit(dict(benchmark="invariant_norm", date=datetime.date.today().isoformat(),
                     device=jax.devices()[0].device_kind, jax=jax.__version__, results=results), args.out)


if __name__ == "__main__":
    sys.exit(main())
