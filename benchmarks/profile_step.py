"""Where one engine step spends its time: host versus device, at a fixed batch of decodes.

  python benchmarks/profile_step.py --model named:llama3-8b --batch-size 1 --out prof.json --trace-dir DIR

Four views of the same decode step (one token per running request, context --context):
- `engine_step_ms`: wall time of `LLMEngine.step()` in a loop, what a user sees per token;
- `host_ms`: the engine's host phases inside that step (schedule, the ragged batch, dispatch,
  waiting for the device, updates and outputs), timed by wrapping them;
- `device_ms`: the jitted step called back to back on the same inputs, so the device never
  waits for the host: its time per step is the device's (`dispatch_ms` is the launch's share
  there, which includes waiting on PJRT's queue of in-flight executions once it is full);
- `launch_idle_ms`: one step's launch (prepare, transfer, the model's and the sampler's
  dispatch) onto an idle device: the host's own cost per launch;
- a jax.profiler trace of a few engine steps (`--trace-dir`), with the GPU kernel time per step
  and the kernels that take it, read from the trace's perfetto JSON.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import time

import numpy as np


from common import load


class Timers:
    """Wraps methods in place and sums their wall time per name."""

    def __init__(self):
        self.total = collections.defaultdict(float)
        self.calls = collections.Counter()

    def wrap(self, obj, name: str, label: str | None = None) -> None:
        fn = getattr(obj, name)
        label = label or name

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.total[label] += time.perf_counter() - t0
                self.calls[label] += 1

        setattr(obj, name, timed)

    def per_call_ms(self, steps: int) -> dict[str, float]:
        return {k: round(1000 * v / steps, 3) for k, v in sorted(self.total.items())}


def _decode_steps(engine, n: int, feed=None) -> float:
    """Seconds per engine step over n steps (the batch stays in decode throughout; `feed()`, when
    given, adds a prompt before each step: the mixed steps of --prefill-chunk)."""
    t0 = time.perf_counter()
    for _ in range(n):
        if feed is not None:
            feed()
        engine.step()
    return (time.perf_counter() - t0) / n


def _device_time(runner, batch, n: int) -> tuple[float, float, float]:
    """(seconds per step with the device never waiting, seconds to launch one step back to back,
    seconds to launch one step onto an idle device).

    Back to back, a launch blocks once PJRT's queue of in-flight executions is full, so that
    figure approaches the device time and is not the host's cost; the idle launch is.
    """
    import jax

    launched = runner.launch(batch)
    jax.block_until_ready(launched.next_tokens)
    t0 = time.perf_counter()
    dispatch = 0.0
    for _ in range(n):
        d0 = time.perf_counter()
        launched = runner.launch(batch)
        dispatch += time.perf_counter() - d0
    jax.block_until_ready((launched.next_tokens, runner.pages))
    device = (time.perf_counter() - t0) / n
    idle = []
    for _ in range(min(n, 10)):
        d0 = time.perf_counter()
        launched = runner.launch(batch)
        idle.append(time.perf_counter() - d0)
        jax.block_until_ready((launched.next_tokens, runner.pages))
    return device, dispatch / n, float(np.median(idle))


def _kernel_summary(trace_dir: str, steps: int) -> dict:
    """GPU time per step and the top kernels, from the perfetto trace the profiler wrote."""
    files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not files:
        return {"error": "no perfetto trace found"}
    with gzip.open(max(files, key=os.path.getmtime)) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = {pid for pid, name in names.items() if "GPU" in name or "gpu" in name}
    by_kernel = collections.defaultdict(float)
    count = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in gpu:
            by_kernel[e["name"]] += e.get("dur", 0.0)
            count[e["name"]] += 1
    host = collections.defaultdict(float)
    for e in events:
        if e.get("ph") == "X" and e.get("pid") not in gpu:
            host[e["name"]] += e.get("dur", 0.0)
    total_us = sum(by_kernel.values())
    top = sorted(by_kernel.items(), key=lambda kv: -kv[1])[:25]
    top_host = sorted(host.items(), key=lambda kv: -kv[1])[:25]
    return {"trace_file": os.path.relpath(max(files, key=os.path.getmtime), trace_dir),
            "gpu_processes": sorted(names[p] for p in gpu),
            "gpu_ms_per_step": round(total_us / 1000 / steps, 3),
            "top_kernels_ms_per_step": [(k[:120], round(v / 1000 / steps, 4), count[k] // steps)
                                        for k, v in top],
            "top_host_events_ms_per_step": [(k[:120], round(v / 1000 / steps, 4)) for k, v in top_host]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--context", type=int, default=512, help="prompt length of each request")
    p.add_argument("--prefill-chunk", type=int, default=0,
                   help="N > 0: mixed steps, each the decode batch plus a new N-token prompt (W1's steps while "
                        "requests arrive; one output token each, so each leaves after its prefill)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attn-impl", default="auto")
    p.add_argument("--sync", action="store_true", help="async_scheduling=False")
    p.add_argument("--quantization", default=None, help="weights quantized at load (fp8, awq, gptq)")
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--batch-invariant", action="store_true")
    p.add_argument("--output-kind", default="cumulative", choices=("cumulative", "delta", "final_only"),
                   help="the requests' output_kind: final_only is LLM.generate's and W1's, delta the server's")
    p.add_argument("--trace-dir", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import jax

    import pagedjax as pj
    from pagedjax.scheduler import ScheduledRequest

    if args.dtype is None:
        args.dtype = "bfloat16" if jax.default_backend() == "gpu" else "float32"
    params = load(args, quantization=args.quantization)
    B, S, C = args.batch_size, args.context, args.prefill_chunk
    total = 3 * args.steps + 8 + (10 if args.trace_dir else 0)
    llm = pj.LLM(params, max_num_seqs=max(B, 1) + (2 if C else 0), enable_prefix_caching=False,
                 max_num_batched_tokens=args.max_num_batched_tokens or max(B * 16, S, 16) + C,
                 max_model_len=max(S + total, C) + 16,
                 attn_impl=args.attn_impl, async_scheduling=not args.sync, kv_cache_dtype=args.kv_cache_dtype,
                 batch_invariant=args.batch_invariant)
    engine = llm.engine
    rng = np.random.default_rng(args.seed)
    from pagedjax.sampling_params import RequestOutputKind

    sp = pj.SamplingParams(max_tokens=total, temperature=0.0, ignore_eos=True,
                           output_kind=RequestOutputKind[args.output_kind.upper()])
    for i in range(B):
        engine.add_request(str(i), rng.integers(16, params.config.vocab_size, size=S).tolist(), sp)
    while any(r.num_computed_tokens < S for r in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()  # prefill
    feed = None
    if C:
        chunk_sp = pj.SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True,
                                     output_kind=RequestOutputKind.FINAL_ONLY)
        fed = iter(range(10**9))

        def feed():  # a new C-token prompt for the next step, which then carries it whole
            engine.add_request(f"prefill-{next(fed)}", rng.integers(16, params.config.vocab_size, size=C).tolist(),
                               chunk_sp)
    _decode_steps(engine, 3, feed)  # warm

    plain = _decode_steps(engine, args.steps, feed)

    timers = Timers()
    timers.wrap(engine.scheduler, "schedule")
    timers.wrap(engine.scheduler, "update_from_output")
    timers.wrap(engine.runner, "prepare")
    timers.wrap(engine.runner, "launch")
    timers.wrap(engine.runner, "fetch")
    timers.wrap(engine.outputs, "process", "outputs")
    compiled_for = engine.runner._compiled  # the runner calls its remembered executables

    def timed_executable(key, get):  # the model's and the sampler's executable calls, timed
        fn = compiled_for(key, get)

        def call(*a):
            t0 = time.perf_counter()
            try:
                return fn(*a)
            finally:
                timers.total[f"call ({key[0]})"] += time.perf_counter() - t0
        return call

    engine.runner._compiled = timed_executable
    timers.wrap(jax, "device_get", "device_get (waits for the device)")
    timers.wrap(jax, "device_put")
    wrapped = _decode_steps(engine, args.steps, feed)
    host = timers.per_call_ms(args.steps)

    trace = {}
    if args.trace_dir:
        with jax.profiler.trace(args.trace_dir, create_perfetto_trace=True):
            _decode_steps(engine, 10, feed)
        try:
            trace = _kernel_summary(args.trace_dir, 10)
        except Exception as e:  # the summary is a convenience; the trace itself is the record
            trace = {"error": repr(e)}

    # The device alone: the same decode batch, back to back.
    # (re)computes each request's newest position: with a step in flight its pages end there
    while any(r.request_id.startswith("prefill-") for r in engine.scheduler.running):
        engine.step()  # the last fed prompts leave; the device time below is the decode batch's alone
    batch = [ScheduledRequest(r.request_id, [1], r.num_computed_tokens - 1, r.block_table, True, r)
             for r in engine.scheduler.running]
    device, dispatch, dispatch_idle = _device_time(engine.runner, batch, args.steps)

    res = {"date": time.strftime("%Y-%m-%d"), "device": str(jax.devices()[0].device_kind),
           "model": args.model, "dtype": args.dtype, "quantization": args.quantization,
           "kv_cache_dtype": args.kv_cache_dtype, "batch_invariant": args.batch_invariant,
           "batch_size": B, "context": S, "prefill_chunk": C, "output_kind": args.output_kind,
           "async_scheduling": not args.sync,
           "engine_step_ms": round(1000 * plain, 3), "engine_step_ms_timed": round(1000 * wrapped, 3),
           "device_ms": round(1000 * device, 3), "dispatch_ms": round(1000 * dispatch, 3),
           "launch_idle_ms": round(1000 * dispatch_idle, 3),
           "host_phases_ms_per_step": host, "trace": trace}
    print(json.dumps(res, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
