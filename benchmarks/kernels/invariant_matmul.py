"""Batch-invariant GEMMs on the GPU: XLA's dot vs the row tiles vs one cuBLASLt or Mosaic GPU launch.

Llama-3-8B's projections (K -> N) at M = 1, 8, 64, 256, 2048 rows, bf16. Methods:
- `dot`: jnp.dot, what the default mode runs (cuBLAS picks its algorithm by M: not invariant);
- `tiles128`: layers.row_tiled, one cuBLAS GEMM per tile of 128 rows (the batch-invariant mode's
  default on the GPU);
- `cublaslt`: models/invariant_matmul.py's custom call, one cuBLASLt algorithm per (K, N), the
  heuristic's for REFERENCE_ROWS (256) rows (CUDA GPUs with the extension's handler);
  `cublaslt@R` the same with the algorithm chosen for R rows (`--reference-rows`), `cublaslt@M` with
  the one chosen for each call's own M (`--reference-rows M`);
- `mosaic_nN`: models/invariant_matmul.py, JAX's Hopper matmul in one launch, tile_n = N of 64
  and 128 (tiles_for's choice is marked).

For each: ms per call (median of samples; each sample many calls inside one jitted scan over
weight copies larger than L2, so weights come from HBM), the weight bytes per second, TFLOP/s, the
largest error against a float32 dot, and whether it is batch-invariant: each M's rows, drawn
at random from a 2048-row input, must equal those rows of the 2048-row result bit for bit. Where the
cublaslt method runs, each other method's rows are also compared bit for bit with its 2048-row
result (`same_bits_as_cublaslt`): two algorithms that agree could serve different row counts.

    python benchmarks/kernels/invariant_matmul.py --out results.json
    python benchmarks/kernels/invariant_matmul.py --dry-run     # tiny shapes, the XLA methods, any backend
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")

import argparse  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from timing import median_time  # noqa: E402

from pagedjax.models import invariant_matmul as im  # noqa: E402
from pagedjax.models.layers import row_tiled  # noqa: E402
from pagedjax.quantization import kernels  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import emit  # noqa: E402

L2_BYTES = 60 << 20
SHAPES = {"q": (4096, 4096), "kv": (4096, 1024), "gate": (4096, 14336), "down": (14336, 4096),
          "lm_head": (4096, 128256)}
ROWS = (1, 8, 64, 256, 2048)
DRY_SHAPES = {"q": (128, 192), "down": (192, 128)}
DRY_ROWS = (1, 8, 40)


def methods(k: int, n: int, on_hopper: bool, mosaic: bool = True, reference_rows: tuple[int, ...] = (),
            per_m: bool = False) -> dict:
    """name -> f(x [M, K], w [K, N]) -> [M, N]."""
    out = {"dot": lambda x, w: x @ w,
           "tiles128": lambda x, w: row_tiled(lambda t: t @ w, x, 128)}
    if jax.default_backend() == "gpu" and kernels.has_handler(im.GEMM_TARGET):
        out["cublaslt"] = im.cublaslt_matmul
        for r in reference_rows:
            if r != im.REFERENCE_ROWS:
                out[f"cublaslt@{r}"] = functools.partial(im.cublaslt_matmul, reference_rows=r)
        if per_m:  # the algorithm chosen for each call's own row count
            out["cublaslt@M"] = lambda x, w: im.cublaslt_matmul(x, w, reference_rows=x.shape[0])
    if on_hopper and mosaic:
        chosen = im.tiles_for(k, n)
        for tile_n in (64, 128):  # narrower tiles do not lower (Mosaic's 128-byte swizzle)
            if n % tile_n == 0:
                tiles = im.Tiles(tile_n=tile_n)
                if tiles.smem_bytes(2) <= im.SMEM_BYTES:
                    name = f"mosaic_n{tile_n}" + ("*" if tiles == chosen else "")
                    out[name] = functools.partial(lambda x, w, t: im.matmul(x, w, t), t=tiles)
    return out


def run_shape(name: str, k: int, n: int, rows: tuple[int, ...], on_hopper: bool, rng, mosaic: bool = True,
              reference_rows: tuple[int, ...] = (), per_m: bool = False) -> list[dict]:
    big = max(rows)
    x_all = jnp.asarray(rng.standard_normal((big, k)), jnp.bfloat16)  # [big, K]
    w = jnp.asarray(rng.standard_normal((k, n)) / math.sqrt(k), jnp.bfloat16)  # [K, N]
    copies = max(2, min(8, math.ceil(3 * L2_BYTES / (k * n * 2))))
    ws = jnp.stack([w] * copies)  # [C, K, N]
    ref = np.asarray(jnp.dot(x_all.astype(jnp.float32), w.astype(jnp.float32),
                             precision=jax.lax.Precision.HIGHEST))  # [big, N]
    results = []
    default_lt = None  # the cublaslt method's 2048-row result: the other algorithms' bits compared with it
    for mname, f in methods(k, n, on_hopper, mosaic, reference_rows, per_m).items():
        try:
            y_big = np.asarray(jax.jit(f)(x_all, w).astype(jnp.float32))
            if mname == "cublaslt":
                default_lt = y_big
        except Exception as e:  # noqa: BLE001  (a kernel that does not build for a shape is a result too)
            results.append(dict(shape=name, K=k, N=n, method=mname, error=f"{type(e).__name__}: {e}"[:400]))
            traceback.print_exc()
            continue
        loop = jax.jit(lambda x, ws, f=f: jax.lax.scan(lambda c, w: (c, f(x, w)), 0, ws)[1])
        for m in rows:
            idx = np.sort(rng.choice(big, m, replace=False))
            x = x_all[idx]
            y = np.asarray(jax.jit(f)(x, w).astype(jnp.float32))
            ms = 1e3 * median_time(loop, (x, ws), copies, repeats=7)
            results.append(dict(
                shape=name, K=k, N=n, method=mname, M=m, ms=round(ms, 4),
                weight_GBps=round(k * n * 2 / ms / 1e6, 1), tflops=round(2 * m * k * n / ms / 1e9, 2),
                max_rel_err=float(np.abs(y - ref[idx]).max() / np.abs(ref[idx]).max()),
                invariant=bool(np.array_equal(y, y_big[idx]))))
            if mname != "cublaslt" and default_lt is not None:
                results[-1]["same_bits_as_cublaslt"] = bool(np.array_equal(y, default_lt[idx]))
            print(results[-1], flush=True)
    return results


def table(results: list[dict]) -> str:
    rows = ["| shape | method | " + " | ".join(f"M={m}" for m in sorted({r['M'] for r in results if 'M' in r}))
            + " | invariant | cublaslt's bits |", None]
    rows[1] = "|" + "---|" * (rows[0].count("|") - 1)
    keys = dict.fromkeys((r["shape"], r["method"]) for r in results)
    for shape, method in keys:
        rs = [r for r in results if r["shape"] == shape and r["method"] == method]
        if "error" in rs[0]:
            rows.append(f"| {shape} | {method} | {rs[0]['error'][:80]} |")
            continue
        cells = " | ".join(f"{r['ms']:.3f}" for r in rs)
        same = [r["same_bits_as_cublaslt"] for r in rs if "same_bits_as_cublaslt" in r]
        rows.append(f"| {shape} | {method} | {cells} | {all(r['invariant'] for r in rs)} | "
                    f"{all(same) if same else ''} |")
    return "ms per call\n" + "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes; no kernel (any backend)")
    p.add_argument("--shapes", default=None, help="comma-separated names from SHAPES")
    p.add_argument("--rows", default=None, help="comma-separated row counts (default 1,8,64,256,2048)")
    p.add_argument("--no-mosaic", action="store_true", help="leave out the Mosaic kernel")
    p.add_argument("--reference-rows", default="",
                   help="comma-separated row counts R: cuBLASLt with the algorithm chosen for R rows too; "
                        "M: the algorithm chosen for each call's own row count")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = jax.devices()[0]
    on_hopper = device.platform == "gpu" and getattr(device, "compute_capability", None) == "9.0"
    shapes = DRY_SHAPES if args.dry_run else SHAPES
    if args.shapes:
        shapes = {k: shapes[k] for k in args.shapes.split(",")}
    rows = DRY_ROWS if args.dry_run else ROWS
    if args.rows:
        rows = tuple(int(r) for r in args.rows.split(","))
    rng = np.random.default_rng(0)
    results = []
    for name, (k, n) in shapes.items():
        refs = [r for r in args.reference_rows.split(",") if r]
        results += run_shape(name, k, n, rows, on_hopper and not args.dry_run, rng, mosaic=not args.no_mosaic,
                             reference_rows=tuple(int(r) for r in refs if r != "M"), per_m="M" in refs)
    print(table(results))
    return emit(dict(benchmark="invariant_matmul", date=datetime.date.today().isoformat(),
                     device=device.device_kind, jax=jax.__version__, results=results), args.out)


if __name__ == "__main__":
    sys.exit(main())
