"""Decode attention bandwidth: the pagedjax custom call vs the jnp reference and JAX's Pallas kernel.

Llama-3-8B heads (32 query / 8 kv heads, head dim 128), bf16, page size 16, one query token per
request, every request at the full context. For each (batch, context) the KV bytes read (plus q,
out and the block table) over the median time gives an achieved bandwidth, set against a device
copy (bytes read + written) measured in the same run.

    python benchmarks/kernels/paged_attention.py --out results.json
    python benchmarks/kernels/paged_attention.py --smoke      # tiny shapes, any backend
    python benchmarks/kernels/paged_attention.py --sweep-splits --out sweep.json

--sweep-splits times the custom call alone at each split-KV count of --splits (and the one
ffi.choose_num_splits picks), with the tensor-core kernel, then the SIMT kernel at the picked and
the best count; per shape it prints % of copy bandwidth for each, and at the end the
MEASURED_DECODE_SPLITS table to paste into pagedjax/attention/ffi.py.

Dims: B requests (= tokens), C context, N query heads, K kv heads, H head dim, P pages.
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

from pagedjax.attention import ffi, reference  # noqa: E402
from pagedjax.attention.metadata import AttentionMetadata  # noqa: E402

N, K, H, PAGE = 32, 8, 128, 16
DTYPE = jnp.bfloat16
REPS = 10  # calls per jitted function (independent inputs), so dispatch is not what is timed


def copy_bandwidth(nbytes: int) -> float:
    """Device copy bandwidth in bytes/s (read + written) of a jnp copy of an nbytes array."""
    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    t = median_time(jax.jit(jnp.copy), (x,), reps=1)
    return 2 * x.nbytes / t


def make_inputs(batch: int, context: int, seed: int):
    """Pools with one full-context request per batch row, pages randomly permuted."""
    pages_per_req = context // PAGE
    P = batch * pages_per_req + 1  # page 0: the null page
    rng = np.random.default_rng(seed)
    tables = rng.permutation(np.arange(1, P, dtype=np.int32)).reshape(batch, pages_per_req)
    key = jax.random.key(seed)
    kk, kv, kq = jax.random.split(key, 3)
    k_pages = jax.random.normal(kk, (P, PAGE, K, H), DTYPE)  # [P, B, K, H]
    v_pages = jax.random.normal(kv, (P, PAGE, K, H), DTYPE)  # [P, B, K, H]
    qs = tuple(jax.random.normal(k, (batch, N, H), DTYPE) for k in jax.random.split(kq, REPS))  # [B, N, H]
    meta = AttentionMetadata(
        positions=jnp.full((batch,), context - 1, jnp.int32),
        slot_mapping=jnp.arange(P * PAGE, P * PAGE + batch, dtype=jnp.int32),
        block_tables=jnp.asarray(tables),  # [B, C / PAGE]
        seq_lens=jnp.full((batch,), context, jnp.int32),
        query_start_loc=jnp.arange(batch + 1, dtype=jnp.int32),
        logits_indices=jnp.arange(batch, dtype=jnp.int32),
    )
    return qs, k_pages, v_pages, meta


def run_pagedjax(qs, k_pages, v_pages, meta, scale, num_splits=None, kernel="auto"):
    fn = jax.jit(lambda qs, k, v, m: [ffi.paged_attention_ffi(q, k, v, m, scale=scale, num_splits=num_splits,
                                                              kernel=kernel) for q in qs])
    return median_time(fn, (qs, k_pages, v_pages, meta), REPS)


def run_reference(qs, k_pages, v_pages, meta, scale):
    fn = jax.jit(lambda q, k, v, m: reference.paged_attention(q, k, v, m, scale=scale))
    return median_time(fn, (qs[0], k_pages, v_pages, meta), 1)


def run_pallas(qs, k_pages, v_pages, meta, scale):
    from jax.experimental.pallas.ops.gpu import paged_attention as pallas

    pages = meta.block_tables.shape[1]
    k_splits = next(s for s in (16, 8, 4, 2, 1) if pages % s == 0)
    per_split = pages // k_splits
    ppcb = next(s for s in (8, 4, 2, 1) if per_split % s == 0)
    k_t = jnp.transpose(k_pages, (2, 0, 1, 3))  # [K, P, B, H]: the layout it reads
    v_t = jnp.transpose(v_pages, (2, 0, 1, 3))
    qs = tuple(q * scale for q in qs)  # it has no scale argument

    def many(qs, k, v, bt, lens):
        return [pallas.paged_attention(q, k, v, bt, lens, block_h=16, pages_per_compute_block=ppcb,
                                       k_splits=k_splits) for q in qs]

    return median_time(jax.jit(many), (qs, k_t, v_t, meta.block_tables, meta.seq_lens), REPS)


def io_bytes_of(batch: int, context: int) -> tuple[int, int]:
    """(K/V bytes, all bytes the call must move: K/V, q, out and the block table)."""
    kv_bytes = batch * context * K * H * 2 * jnp.dtype(DTYPE).itemsize
    return kv_bytes, kv_bytes + 2 * batch * N * H * jnp.dtype(DTYPE).itemsize + batch * (context // PAGE) * 4


def sweep_splits(args, batches, contexts, mem, copy_bw, scale) -> list[dict]:
    """Per (batch, context): % of copy bandwidth at each split count, for each kernel variant."""
    splits = [int(x) for x in args.splits.split(",")]
    kernels = args.kernels.split(",")
    sms = ffi._num_sms()
    print(f"# split-KV sweep: {sms} SMs; cells are % of copy bandwidth; 'pick' = ffi.choose_num_splits, "
          f"'model' = its model alone, 'best' = fewest splits within 2% of the fastest")
    head = " | ".join(f"S={x}" for x in splits)
    other = kernels[1] if len(kernels) > 1 else "-"  # the variant compared at the pick and the best
    print(f"# model: DECODE_CTAS_PER_SM[{H}]={ffi.DECODE_CTAS_PER_SM.get(H)}, SATURATING_CTAS_PER_SM="
          f"{ffi.SATURATING_CTAS_PER_SM}; table: {len(ffi.MEASURED_DECODE_SPLITS)} entries")
    print(f"| batch | context | CTAs | pick | model | best | %@pick | %@best | {head} | {other}@pick | {other}@best |")
    print("|" + "---|" * (10 + len(splits)))
    rows = []
    for batch in batches:
        for context in contexts:
            kv_bytes, io_bytes = io_bytes_of(batch, context)
            ctas = ffi.split_ctas(batch, batch, N, K)
            pick = ffi.choose_num_splits(batch, batch, N, K, H, context, sms)
            model = ffi.choose_num_splits(batch, batch, N, K, H, context, sms, measured=False)
            row = {"batch": batch, "context": context, "ctas": ctas, "pick": pick, "model": model,
                   "pct_copy": {k: {} for k in kernels}}
            if 1.15 * kv_bytes > 0.8 * mem:
                row["skipped"] = "pool does not fit in memory"
                rows.append(row)
                print(f"| {batch} | {context} | {ctas} | {pick} | {model} | skip |", flush=True)
                continue
            qs, k_pages, v_pages, meta = make_inputs(batch, context, seed=batch * 100003 + context)

            def measure(kernel, s):
                try:
                    t = run_pagedjax(qs, k_pages, v_pages, meta, scale, num_splits=s, kernel=kernel)
                    row["pct_copy"][kernel][s] = 100 * io_bytes / t / copy_bw
                except Exception as e:  # noqa: BLE001 - record why and go on
                    row.setdefault("errors", []).append(f"{kernel} S={s}: {type(e).__name__}: "
                                                        f"{str(e).splitlines()[0][:200]}")

            tc = kernels[0]  # the variant whose best split is sought (tensor_core by default)
            for s in sorted(set(splits) | {pick, model}):
                measure(tc, s)
            got = row["pct_copy"][tc]
            if got:
                top = max(got.values())
                row["best"] = min(s for s, v in got.items() if v >= 0.98 * top)
            for kernel in kernels[1:]:
                for s in sorted({pick, row.get("best", pick)}):
                    measure(kernel, s)
            del qs, k_pages, v_pages, meta
            rows.append(row)

            def cell(kernel, s):
                v = row["pct_copy"].get(kernel, {}).get(s)
                return "-" if v is None else f"{v:.0f}"

            best = row.get("best", pick)
            print(f"| {batch} | {context} | {ctas} | {pick} | {model} | {row.get('best', '-')} | "
                  f"{cell(tc, pick)} | {cell(tc, best)} | " + " | ".join(cell(tc, s) for s in splits) +
                  f" | {cell(other, pick)} | {cell(other, best)} |", flush=True)
    for row in rows:
        for e in row.get("errors", []):
            print(f"# batch {row['batch']}, context {row['context']}: {e}")
    low = [f"{r['batch']}x{r['context']}" for r in rows
           if r["pct_copy"].get(kernels[0], {}).get(r["pick"], 100) < 80 and r["batch"] >= 32]
    print(f"# picks under 80% of copy at batch >= 32: {', '.join(low) or 'none'}")
    table = {(r["ctas"], r["context"]): r["best"] for r in rows if "best" in r}
    print("# measured best splits, for pagedjax/attention/ffi.py:")
    print("MEASURED_DECODE_SPLITS = {" + ", ".join(f"({c}, {x}): {b}" for (c, x), b in sorted(table.items())) + "}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--batches", help="default 1,8,32,64,256 (8,16,32,64,128 with --sweep-splits)")
    ap.add_argument("--contexts", help="default 128,512,2048,8192,32768 (2048,8192,32768 with --sweep-splits)")
    ap.add_argument("--impls", default="pagedjax,reference,pallas")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, to check the script on any backend")
    ap.add_argument("--sweep-splits", action="store_true", help="time the custom call at each split-KV count")
    ap.add_argument("--splits", default="1,2,3,4,6,8,12,16", help="split counts for --sweep-splits")
    ap.add_argument("--kernels", default="tensor_core,simt",
                    help="--sweep-splits: the first is swept over --splits, the rest timed at its pick and best")
    args = ap.parse_args()
    sweep = args.sweep_splits
    args.batches = args.batches or ("8,16,32,64,128" if sweep else "1,8,32,64,256")
    args.contexts = args.contexts or ("2048,8192,32768" if sweep else "128,512,2048,8192,32768")
    if args.smoke:
        args.batches, args.contexts = "1,4", "32,64"
        if sweep:
            args.splits = "1,2,3"
    batches = [int(x) for x in args.batches.split(",")]
    contexts = [int(x) for x in args.contexts.split(",")]
    impls = args.impls.split(",")
    dev = jax.devices()[0]
    on_gpu = dev.platform == "gpu"
    if not on_gpu and not args.smoke:
        raise SystemExit("needs a GPU (use --smoke to try the script on the CPU)")
    mem = (dev.memory_stats() or {}).get("bytes_limit", 8 << 30) if on_gpu else 8 << 30
    copy_bw = copy_bandwidth(min(2 << 30, mem // 8) if on_gpu else 64 << 20)
    scale = H**-0.5
    print(f"# {dev.device_kind}, jax {jax.__version__}, copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + write)")
    if sweep:
        print(f"# decode, {N} q / {K} kv heads, d={H}, {jnp.dtype(DTYPE).name}, page {PAGE}")
        t_start = time.perf_counter()
        rows = sweep_splits(args, batches, contexts, mem, copy_bw, scale)
        print(f"# total {time.perf_counter() - t_start:.0f} s")
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                           "device": dev.device_kind, "jax": jax.__version__, "copy_bandwidth_GBps": copy_bw / 1e9,
                           "num_sms": ffi._num_sms(), "splits": args.splits, "kernels": args.kernels,
                           "shape": {"q_heads": N, "kv_heads": K, "head_dim": H, "page_size": PAGE,
                                     "dtype": jnp.dtype(DTYPE).name, "mode": "decode"},
                           "results": rows}, f, indent=1)
        return
    print(f"# decode, {N} q / {K} kv heads, d={H}, {jnp.dtype(DTYPE).name}, page {PAGE}; us per call, GB/s, % of copy")
    cols = " | ".join(f"{i} us | GB/s | %copy" for i in impls)
    print(f"| batch | context | KV MB | {cols} |")
    print("|" + "---|" * (3 + 3 * len(impls)))

    results = []
    runners = {"pagedjax": run_pagedjax, "reference": run_reference, "pallas": run_pallas}
    t_start = time.perf_counter()
    for batch in batches:
        for context in contexts:
            kv_bytes, io_bytes = io_bytes_of(batch, context)
            row = {"batch": batch, "context": context, "bytes": io_bytes, "impls": {}}
            if 1.15 * kv_bytes > 0.8 * mem:
                for i in impls:
                    row["impls"][i] = {"skipped": "pool does not fit in memory"}
            else:
                qs, k_pages, v_pages, meta = make_inputs(batch, context, seed=batch * 100003 + context)
                for i in impls:
                    if i == "pallas" and not on_gpu:
                        row["impls"][i] = {"skipped": "GPU only"}
                        continue
                    if i == "pallas" and 2.2 * kv_bytes > 0.8 * mem:
                        row["impls"][i] = {"skipped": "a second (transposed) pool does not fit"}
                        continue
                    ref_bytes = min(batch, reference.TOKEN_BLOCK) * context * K * H * 2 * (2 + 4)
                    if i == "reference" and kv_bytes + ref_bytes > 0.6 * mem:
                        row["impls"][i] = {"skipped": "its gathered f32 K/V do not fit in memory"}
                        continue
                    try:
                        t = runners[i](qs, k_pages, v_pages, meta, scale)
                        bw = io_bytes / t
                        row["impls"][i] = {"time_us": t * 1e6, "GBps": bw / 1e9, "pct_copy": 100 * bw / copy_bw}
                    except Exception as e:  # noqa: BLE001 - record why (e.g. Pallas not compiling here)
                        row["impls"][i] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
                del qs, k_pages, v_pages, meta
            results.append(row)
            cells = []
            for i in impls:
                r = row["impls"][i]
                if "time_us" in r:
                    cells.append(f"{r['time_us']:.1f} | {r['GBps']:.0f} | {r['pct_copy']:.0f}%")
                else:
                    cells.append(f"{'skip' if 'skipped' in r else 'error'} | | ")
            print(f"| {batch} | {context} | {kv_bytes / 2**20:.0f} | " + " | ".join(cells) + " |", flush=True)
    for row in results:
        for i, r in row["impls"].items():
            if "time_us" not in r:
                print(f"# {i} at batch {row['batch']}, context {row['context']}: {r}")
    print(f"# total {time.perf_counter() - t_start:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "device": dev.device_kind, "jax": jax.__version__,
                "copy_bandwidth_GBps": copy_bw / 1e9,
                "shape": {"q_heads": N, "kv_heads": K, "head_dim": H, "page_size": PAGE,
                          "dtype": jnp.dtype(DTYPE).name, "mode": "decode"},
                "results": results,
            }, f, indent=1)


if __name__ == "__main__":
    main()
