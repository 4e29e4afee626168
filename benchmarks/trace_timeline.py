"""A jax.profiler trace as a timeline of a few engine steps: where the host blocks, where the GPU idles.

  python benchmarks/trace_timeline.py TRACE_DIR [--steps 3] [--min-ms 0.3] [--out timeline.txt]

Reads the perfetto JSON the profiler wrote (`profile_step.py --trace-dir`). For the last --steps
host events named like the engine's step (`engine.py:... step`), it prints, in time order from
the step's start: the host events of at least --min-ms on every host thread (name, thread,
start, duration), and the GPU's busy time and its idle gaps of at least --min-ms (the union of
all kernels and copies on the GPU's streams). A launch that blocks shows as a long host event
with the GPU busy under it; a gap shows what the host was doing while the GPU waited.

`--kernels N` adds where the GPU's time goes over the same steps: ms per step by op class (GEMM,
attention, KV write, sort/top-k, copies, reductions, other fusions) and the N kernels that take
the most time.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os


def load(trace_dir: str) -> list[dict]:
    files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not files:
        raise SystemExit(f"no *.trace.json.gz under {trace_dir}")
    with gzip.open(max(files, key=os.path.getmtime)) as f:
        trace = json.load(f)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


# Op classes by kernel name (lower case), first match wins: cuBLAS/cuBLASLt (nvjet, cutlass, xmma) and
# XLA's Triton GEMM fusions; this project's attention and KV-write kernels (xla_kernels/); the rest.
OP_CLASSES = (
    ("kv write", ("kvwrite",)),
    ("attention", ("tensorcorekernel", "mergesplitskernel", "simtkernel", "attention", "flash")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "gemv", "cublas", "matmul", "int4gemm", "outerscale")),
    ("sort/top-k", ("sort", "topk", "radix", "cub::")),
    ("copy/memset", ("memcpy", "memset", "copy")),
    ("reduction", ("reduce", "reduction")),
    ("other fusion", ("fusion", "loop_", "input_", "wrapped_", "triton")),
)


def op_class(name: str) -> str:
    low = name.lower()
    for cls, keys in OP_CLASSES:
        if any(k in low for k in keys):
            return cls
    return "other"


def _gpu_pids(events: list[dict]) -> set:
    return {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
            and "gpu" in e.get("args", {}).get("name", "").lower()}


def _engine_steps(host: list[dict], step_name: str) -> list[dict]:
    return sorted((e for e in host if e["name"].startswith("$engine.py") and e["name"].endswith(" " + step_name)),
                  key=lambda e: e["ts"])


def kernels(events: list[dict], steps: int, top: int, step_name: str = "step") -> str:
    """GPU time per step over the last `steps` engine steps, by op class and by kernel."""
    gpu = _gpu_pids(events)
    spans = [e for e in events if e.get("ph") == "X"]
    windows = [(st["ts"], st["ts"] + st["dur"])
               for st in _engine_steps([e for e in spans if e["pid"] not in gpu], step_name)[-steps:]]
    if not windows:
        return "no engine step events in the trace"
    by_class: dict[str, float] = {}
    by_name: dict[str, list] = {}
    for e in spans:
        if e["pid"] not in gpu:
            continue
        mid = e["ts"] + e.get("dur", 0.0) / 2
        if not any(a <= mid < b for a, b in windows):
            continue
        cls = op_class(e["name"])
        by_class[cls] = by_class.get(cls, 0.0) + e.get("dur", 0.0)
        entry = by_name.setdefault(e["name"], [cls, 0.0, 0])
        entry[1] += e.get("dur", 0.0)
        entry[2] += 1
    n = len(windows)
    total = sum(by_class.values())
    lines = [f"== GPU time per step over the last {n} steps: {total / n / 1000:.3f} ms (kernels and copies, summed)"]
    for cls, us in sorted(by_class.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {cls:14s} {us / n / 1000:8.3f} ms  {us / max(total, 1e-9):6.1%}")
    lines.append(f"== the {top} kernels that take the most time (ms per step, launches per step)")
    for name, (cls, us, count) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"  {us / n / 1000:8.3f} ms {count / n:6.1f}x  [{cls}] {name[:110]}")
    return "\n".join(lines)


LAUNCH_EVENTS = ("command_buffer::update", "command_buffer::record", "cuGraphLaunch")


def launch_summary(events: list[dict], steps: int, step_name: str = "step") -> str:
    """One line, means over the last `steps` engine steps: the step's length, the GPU's busy time
    in it, and the host's time in XLA's command-buffer update (re-recording the step's CUDA graph)
    and graph launches: what an experiment on the launch path moves."""
    gpu = _gpu_pids(events)
    spans = [e for e in events if e.get("ph") == "X"]
    host = [e for e in spans if e["pid"] not in gpu]
    chosen = _engine_steps(host, step_name)[-steps:]
    if not chosen:
        return "== launch path: no engine step events in the trace"
    busy = union([(e["ts"], e["ts"] + e.get("dur", 0.0)) for e in spans if e["pid"] in gpu])
    totals = dict.fromkeys(("step", "gpu busy", *LAUNCH_EVENTS), 0.0)
    for st in chosen:
        t0, t1 = st["ts"], st["ts"] + st["dur"]
        totals["step"] += st["dur"]
        totals["gpu busy"] += sum(min(b, t1) - max(a, t0) for a, b in busy if b > t0 and a < t1)
        for e in host:
            if t0 <= e["ts"] < t1:
                for name in LAUNCH_EVENTS:
                    if e["name"].startswith(name):
                        totals[name] += e.get("dur", 0.0)
    n = len(chosen)
    return ("== launch path, ms per step over the last %d steps: " % n
            + ", ".join(f"{k} {v / n / 1000:.3f}" for k, v in totals.items()))


def timeline(events: list[dict], steps: int, min_ms: float, step_name: str = "step") -> str:
    threads = {(e["pid"], e["tid"]): e.get("args", {}).get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    gpu = _gpu_pids(events)
    spans = [e for e in events if e.get("ph") == "X"]
    host = [e for e in spans if e["pid"] not in gpu]
    busy = union([(e["ts"], e["ts"] + e.get("dur", 0.0)) for e in spans if e["pid"] in gpu])
    engine_steps = _engine_steps(host, step_name)
    if not engine_steps:
        return "no engine step events in the trace (was the engine's step traced?)"
    lines = []
    for st in engine_steps[-steps:]:
        t0, t1 = st["ts"], st["ts"] + st["dur"]
        inside = [(max(a, t0), min(b, t1)) for a, b in busy if b > t0 and a < t1]
        on = sum(b - a for a, b in inside)
        lines.append(f"== step at {t0 / 1000:.3f} ms: {st['dur'] / 1000:.3f} ms, GPU busy {on / 1000:.3f} ms "
                     f"({on / st['dur']:.0%})")
        rows = []
        for e in host:
            if e["ts"] + e.get("dur", 0) < t0 or e["ts"] > t1 or e.get("dur", 0) < 1000 * min_ms:
                continue
            th = threads.get((e["pid"], e["tid"]), str(e["tid"]))
            rows.append((e["ts"], f"  host {(e['ts'] - t0) / 1000:8.3f} +{e['dur'] / 1000:7.3f}  [{th[:20]}] {e['name'][:90]}"))
        prev = t0
        for a, b in inside + [(t1, t1)]:
            if a - prev >= 1000 * min_ms:
                rows.append((prev, f"  GPU  {(prev - t0) / 1000:8.3f} +{(a - prev) / 1000:7.3f}  idle"))
            prev = b
        lines += [text for _, text in sorted(rows)]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace_dir")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--min-ms", type=float, default=0.3)
    p.add_argument("--kernels", type=int, default=0, help="also GPU time by op class and the N longest kernels")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    events = load(args.trace_dir)
    text = timeline(events, args.steps, args.min_ms) + "\n" + launch_summary(events, args.steps)
    if args.kernels:
        text += "\n" + kernels(events, args.steps, args.kernels)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
