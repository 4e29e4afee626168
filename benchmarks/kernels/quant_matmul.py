"""Quantized linears on the GPU: bf16 jnp.dot vs FP8 (cuBLASLt custom call, XLA) vs INT4 (kernel, dequant + dot).

Llama-3-8B's linear shapes (K -> N: qkv 4096 -> 6144, o 4096 -> 4096, gate+up 4096 -> 28672,
gate or up 4096 -> 14336, down 14336 -> 4096) at M = 1, 16, 64, 256, 2048 rows, bf16 activations.
For each: ms per call (median of samples, each many calls inside one jitted function, so
dispatch is not timed; weights are cycled over copies larger than L2 so they come from HBM),
bytes moved (weights with their scales, x and y), the fraction of 4.1 TB/s that is, TFLOP/s,
and the largest error against the matching XLA path. Before timing, the compiled HLO of each
FP8 path is searched for the custom-call targets and f8e4m3fn dots it runs: proof of what
executes. A short table comes last; --out writes everything as JSON.

    python benchmarks/kernels/quant_matmul.py --out results.json
    python benchmarks/kernels/quant_matmul.py --dry-run     # tiny shapes, any backend

--dry-run (and any run without a GPU) times the XLA paths only and lowers the custom calls for
"cuda" without running them, so every code path but the kernels' execution runs on a CPU.

Methods: bf16 (jnp.dot, [K, N] weight), fp8_ffi (quantized_matmul impl="ffi": per-token
activation quantization + cuBLASLt, per-channel weights), fp8_gemm (the custom call alone, x
already quantized), fp8_xla (impl="xla": XLA's f8 dot), fp8_w8a16_xla (weight-only: bf16 activations,
the e4m3 weights converted to bf16 in the dot's operand, the channel scales after: no activation
quantization, the decode step's candidate at small M), fp8_block_ffi (128x128 weight blocks,
1x128 activation groups, cuBLASLt), int4_kernel (W4A16 custom call, group 128), int4_xla
(dequantize + bf16 dot).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from timing import median_time  # noqa: E402

import pagedjax  # noqa: E402,F401  (registers the FFI targets)
from pagedjax.quantization import kernels, quantize_fp8, quantized_matmul  # noqa: E402
from pagedjax.quantization.fp8 import quantize_activation  # noqa: E402
from pagedjax.quantization.weight import QuantizedWeight  # noqa: E402

PEAK_BW = 4.1e12  # H200 HBM3e, bytes/s (measured copy: 4.1-4.2 TB/s)
L2_BYTES = 60 << 20  # H200 L2: weights cycle over copies well past this
SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "gate": (4096, 14336),
          "down": (14336, 4096)}
ROWS = (1, 16, 64, 256, 2048)
DRY_SHAPES = {"qkv": (256, 384), "down": (512, 256)}
DRY_ROWS = (1, 16, 70)
METHODS = ("bf16", "fp8_ffi", "fp8_gemm", "fp8_xla", "fp8_w8a16_xla", "fp8_block_ffi", "int4_kernel", "int4_xla")
FFI_METHODS = {"fp8_ffi", "fp8_gemm", "fp8_block_ffi", "int4_kernel"}
GROUP = 128


def median_ms(fn, args, calls: int) -> float:
    """Median ms per call of fn(*args), which makes `calls` calls; after compile and warm-up."""
    return 1e3 * median_time(fn, args, calls, repeats=7, target_s=0.03, max_iters=200)


def copies_for(nbytes: int, cap: int = 16) -> int:
    """How many copies of an nbytes weight to cycle over so that they do not fit in L2 together."""
    return max(2, min(cap, math.ceil(3 * L2_BYTES / max(nbytes, 1))))


def random_int4(key, K: int, N: int) -> QuantizedWeight:
    """Random codes, zeros and f16 scales in the tiled layout (timing and cross-checks need no real weights)."""
    kq, kz, ks = jax.random.split(key, 3)
    G = K // GROUP
    qvalue = jax.lax.bitcast_convert_type(jax.random.bits(kq, (N // 16, K // 64, 32, 4), jnp.uint32), jnp.int32)
    zero = jax.random.randint(kz, (G, N), 0, 16).astype(jnp.uint8)
    scale = jax.random.uniform(ks, (G, N), jnp.float32, 0.002, 0.02).astype(jnp.float16)
    return QuantizedWeight(qvalue, scale, zero, None, "int4", K, N, group_size=GROUP)


def hlo_evidence(text: str) -> dict:
    """Custom-call targets and f8e4m3fn GEMM lines of a compiled (or lowered) program's text."""
    targets = sorted(set(re.findall(r'custom_call_target="([^"]+)"', text)) |
                     set(re.findall(r"stablehlo\.custom_call @(\w+)", text)))
    f8 = [line.strip() for line in text.splitlines()
          if "f8e4m3fn" in line.lower() and re.search(r"\b(dot|convolution|custom-call|custom_call|dot_general)\b", line)]
    f8 = [s if len(s) <= 320 else s[:200] + " ... " + s[-120:] for s in f8]
    return {"custom_call_targets": targets, "f8e4m3fn_gemm_lines": f8[:6]}


def build_ops(K: int, N: int, key):
    """{method: (fn(x, w) -> y, weight, weight bytes)} for one linear shape."""
    kw, ki = jax.random.split(key)
    w_bf16 = (jax.random.normal(kw, (N, K), jnp.float32) * 0.02).astype(jnp.bfloat16)  # [N, K]
    w_fp8 = quantize_fp8(w_bf16, strategy="channel")
    w_fp8_block = quantize_fp8(w_bf16, strategy="block", block_size=(128, 128))
    w_int4 = random_int4(ki, K, N)
    w_kn = w_bf16.T.copy()  # [K, N]: the layout of our bf16 kernels

    def fp8_gemm(xq_xs, w):
        return kernels.fp8_gemm(*xq_xs, w, jnp.bfloat16)

    return {
        "bf16": (lambda x, w: jnp.dot(x, w), w_kn),
        "fp8_ffi": (lambda x, w: quantized_matmul(x, w, impl="ffi"), w_fp8),
        "fp8_gemm": (fp8_gemm, w_fp8),
        "fp8_xla": (lambda x, w: quantized_matmul(x, w, impl="xla"), w_fp8),
        "fp8_w8a16_xla": (lambda x, w: quantized_matmul(x, w, impl="w8a16"), w_fp8),
        "fp8_block_ffi": (lambda x, w: quantized_matmul(x, w, impl="ffi"), w_fp8_block),
        "int4_kernel": (lambda x, w: quantized_matmul(x, w, impl="ffi"), w_int4),
        "int4_xla": (lambda x, w: quantized_matmul(x, w, impl="xla"), w_int4),
    }


def weight_bytes(w) -> int:
    return w.nbytes if isinstance(w, QuantizedWeight) else int(w.size) * w.dtype.itemsize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes; on a CPU the custom calls are only lowered")
    ap.add_argument("--shapes", help=f"comma-separated subset of {','.join(SHAPES)}")
    ap.add_argument("--rows", help="comma-separated M values (default 1,16,64,256,2048)")
    ap.add_argument("--methods", default=",".join(METHODS))
    args = ap.parse_args()

    on_gpu = jax.default_backend() == "gpu"
    shapes = DRY_SHAPES if args.dry_run else SHAPES
    if args.shapes:
        shapes = {k: shapes[k] for k in args.shapes.split(",")}
    rows = tuple(int(r) for r in args.rows.split(",")) if args.rows else (DRY_ROWS if args.dry_run else ROWS)
    methods = args.methods.split(",")
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"custom calls: fp8 {kernels.has_handler(kernels.FP8_TARGET)}, int4 {kernels.has_handler(kernels.INT4_TARGET)}",
          flush=True)
    if not on_gpu:
        print("no GPU: timing the XLA paths only; the custom calls are lowered for 'cuda', not run", flush=True)
        kernels._ffi.require = lambda *a: None  # lowering only: nothing executes a CUDA handler here
    results, evidence = [], {}
    key = jax.random.key(0)
    for name, (K, N) in shapes.items():
        key, kshape = jax.random.split(key)
        ops = build_ops(K, N, kshape)
        for M in rows:
            key, kx, kx0 = jax.random.split(key, 3)
            base = {"linear": name, "K": K, "N": N, "M": M}
            x0 = jax.random.normal(kx0, (M, K), jnp.bfloat16)  # the same first input for every method
            outs, cell = {}, {}
            for method in methods:
                fn, w = ops[method]
                wb = weight_bytes(w)
                n_copies = copies_for(wb)
                xs = [x0] + [jax.random.normal(k, (M, K), jnp.bfloat16) for k in jax.random.split(kx, n_copies - 1)]
                ws = [w] + [jax.tree.map(jnp.copy, w) for _ in range(n_copies - 1)]
                if method == "fp8_gemm":
                    xs = [quantize_activation(x, w) for x in xs]
                many = jax.jit(lambda xs, ws, fn=fn: [fn(x, w) for x, w in zip(xs, ws)])
                row = cell[method] = dict(base, method=method)
                results.append(row)
                try:
                    if method.startswith("fp8") and (name, M) == (next(iter(shapes)), rows[0]):
                        one = jax.jit(fn)
                        if on_gpu or method not in FFI_METHODS:
                            text = one.lower(xs[0], ws[0]).compile().as_text()
                        else:
                            text = one.trace(xs[0], ws[0]).lower(lowering_platforms=("cuda",)).as_text()
                        evidence[method] = hlo_evidence(text)
                        print(f"  HLO {method}: {evidence[method]}", flush=True)
                    if method in FFI_METHODS and not on_gpu:
                        jax.jit(fn).trace(xs[0], ws[0]).lower(lowering_platforms=("cuda",))  # lowers, or raises
                        row["skipped"] = "lowered for cuda only (no GPU)"
                        continue
                    outs[method] = np.asarray(many(xs, ws)[0].astype(jnp.float32))
                    ms = median_ms(many, (xs, ws), n_copies)
                    io = wb + M * K * 2 + M * N * 2
                    row.update(ms=ms, bytes=io, bw_frac=io / (ms * 1e-3) / PEAK_BW,
                               tflops=2 * M * N * K / (ms * 1e-3) / 1e12, weight_copies=n_copies)
                except Exception as e:  # one failing path must not lose the rest of a single-shot run
                    row["error"] = f"{type(e).__name__}: {e}"[:500]
                    traceback.print_exc()
                finally:
                    del xs, ws, many
            # each custom call against the XLA path on the same weights and input (the XLA path is
            # checked against float64 in tests/); fp8 against bf16 is the quantization error
            pairs = (("fp8_ffi", "fp8_xla"), ("fp8_gemm", "fp8_xla"), ("int4_kernel", "int4_xla"), ("fp8_xla", "bf16"),
                     ("fp8_w8a16_xla", "bf16"))
            if "fp8_block_ffi" in outs:
                outs["fp8_block_xla"] = np.asarray(quantized_matmul(x0, ops["fp8_block_ffi"][1], impl="xla")
                                                   .astype(jnp.float32))
                pairs += (("fp8_block_ffi", "fp8_block_xla"),)
            for a, b in pairs:
                if a in outs and b in outs:
                    cell[a][f"max_rel_err_vs_{b}"] = float(np.abs(outs[a] - outs[b]).max() /
                                                           max(np.abs(outs[b]).max(), 1e-30))
            for method, row in cell.items():
                shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k not in base}
                print(f"{name} K={K} N={N} M={M} {method}: {shown}", flush=True)

    print("\nms per call (% of 4.1 TB/s); bf16 / method speed-up in brackets")
    print(f"{'linear':8} {'K':>6} {'N':>6} {'M':>5} " + " ".join(f"{m:>22}" for m in methods))
    for name, (K, N) in shapes.items():
        for M in rows:
            cells = {r["method"]: r for r in results if (r["linear"], r["M"]) == (name, M)}
            bf16 = cells.get("bf16", {}).get("ms")
            line = f"{name:8} {K:6} {N:6} {M:5} "
            for m in methods:
                r = cells.get(m, {})
                if "ms" in r:
                    sp = f" [{bf16 / r['ms']:.2f}x]" if bf16 else ""
                    line += f"{r['ms']:.4f} ({100 * r['bw_frac']:3.0f}%){sp}".rjust(23)
                else:
                    line += ("error" if "error" in r else "-").rjust(23)
            print(line)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "device": dev.device_kind,
                       "backend": jax.default_backend(), "jax": jax.__version__, "peak_bw": PEAK_BW,
                       "hlo_evidence": evidence, "results": results}, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
