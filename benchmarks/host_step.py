"""The engine step's host side at a large decode batch, where the device's time is small: the
batch preparation (`ModelRunner.prepare`, and the sampling metadata inside it) and whole engine
steps, with the garbage collector's full collections counted.

  python benchmarks/host_step.py --batch-size 256 --out host.json

A tiny random model (named:tiny-llama by default) keeps the device's share small, so the figures
are the host's: the same Python runs beside an H200. `prepare_ms` and `sampling_metadata_ms` are
medians over --calls calls on one decode batch; `step_ms` is the median, p90 and max of --steps
engine steps (async scheduling; greedy unless --temperature), and `gen2_collections` the full
collections during them. `host_only_ms` is the engine's host work per step with no device in the
loop (random tokens stand in for the model's), per phase, before those engine steps.
To time another tree's code, run this file with PYTHONPATH pointing at that tree.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import sys
import time
import types

import numpy as np
from common import emit


def _median_ms(fn, calls: int) -> float:
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return round(1000 * statistics.median(samples), 3)


def _host_only_steps(engine, steps: int, rng) -> dict[str, float]:
    """The engine's host work per step with no device in the loop: async scheduling's order
    (schedule, prepare reading the previous step's pending tokens, commit in flight, then the
    previous step's results processed), with random tokens standing in for the model's. Medians
    in ms per phase and for the whole step. The requests advance as in real steps; their pages
    hold nothing, which the host never reads."""
    from pagedjax.model_runner import StepOutput

    def fake_output(sched):
        n = len(sched.scheduled)
        return StepOutput(token_ids=rng.integers(0, vocab, n).astype(np.int32), logprobs=np.zeros(n, np.float32))

    phases = {"schedule": [], "prepare": [], "process": [], "step": []}
    vocab = engine.runner.config.vocab_size
    if engine._in_flight is not None:  # the real step in flight: its tokens first
        sched, launched = engine._in_flight
        engine._in_flight = None
        engine._process(sched, engine.runner.fetch(launched))
    prev = None
    for _ in range(steps):
        t0 = time.perf_counter()
        sched = engine._schedule()
        t1 = time.perf_counter()
        engine.runner.prepare(sched.scheduled, prev and prev[1])
        rows = types.SimpleNamespace(rows={s.request_id: r for r, s in enumerate(sched.scheduled)})
        engine.scheduler.commit_in_flight(sched)
        t2 = time.perf_counter()
        if prev is not None:
            engine._process(prev[0], fake_output(prev[0]))
        t3 = time.perf_counter()
        prev = (sched, rows)
        for name, dt in (("schedule", t1 - t0), ("prepare", t2 - t1), ("process", t3 - t2), ("step", t3 - t0)):
            phases[name].append(dt)
    engine._process(prev[0], fake_output(prev[0]))  # the engine's next step starts with nothing in flight
    return {name: round(1000 * statistics.median(v), 3) for name, v in phases.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="named:tiny-llama")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--temperature", type=float, default=0.0, help="1.0 with a seed per request: W1's sampling")
    p.add_argument("--output-kind", default="cumulative", choices=("cumulative", "delta", "final_only"),
                   help="final_only is what LLM.generate and W1 use, delta what the server streams")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import jax.numpy as jnp

    import pagedjax as pj
    from pagedjax.dummy_weights import random_params
    from pagedjax.models.config import get_config
    from pagedjax.sampling_metadata import make_sampling_metadata
    from pagedjax.sampling_params import RequestOutputKind
    from pagedjax.scheduler import ScheduledRequest

    if not args.model.startswith("named:"):
        raise SystemExit("--model: a named config (named:NAME)")
    B, S = args.batch_size, args.prompt_len
    max_len = S + 2 * args.steps + 24  # the host-only steps, then the engine's: every request runs throughout
    config = get_config(args.model[6:])
    config = dataclasses.replace(config, max_position_embeddings=max(config.max_position_embeddings, max_len))
    params = random_params(config, dtype=jnp.float32)
    llm = pj.LLM(params, max_num_seqs=B, enable_prefix_caching=False, max_num_batched_tokens=B * S,
                 max_model_len=max_len)
    engine = llm.engine
    rng = np.random.default_rng(0)
    kind = RequestOutputKind[args.output_kind.upper()]
    for i in range(B):
        sp = pj.SamplingParams(max_tokens=max_len - S, temperature=args.temperature, ignore_eos=True,
                               seed=i if args.temperature else None, output_kind=kind)
        engine.add_request(str(i), rng.integers(16, params.config.vocab_size, size=S).tolist(), sp)
    for _ in range(4):
        engine.step()  # the prefill, then decodes: every request running

    batch = [ScheduledRequest(r.request_id, [1], r.num_computed_tokens - 1, r.block_table, True, r)
             for r in engine.scheduler.running]
    prepare_ms = _median_ms(lambda: engine.runner.prepare(batch), args.calls)
    eos = (params.config.eos_token_ids or (None,))[0]
    metadata_ms = _median_ms(lambda: make_sampling_metadata(
        [s.sampling_params for s in batch], [s.output_token_ids for s in batch], num_rows=len(batch),
        num_pending=[0] * len(batch), prompt_token_ids=[s.prompt_token_ids for s in batch], eos_token_id=eos),
        args.calls)

    host_only = _host_only_steps(engine, args.steps, rng)
    full0 = gc.get_stats()[2]["collections"]
    steps = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - t0)
    steps_ms = sorted(1000 * s for s in steps)
    res = {"date": time.strftime("%Y-%m-%d"), "model": args.model, "batch_size": len(batch),
           "temperature": args.temperature, "output_kind": args.output_kind,
           "prepare_ms": prepare_ms, "sampling_metadata_ms": metadata_ms,
           "step_ms": {"median": round(statistics.median(steps_ms), 3),
                       "p90": round(steps_ms[int(0.9 * (len(steps_ms) - 1))], 3), "max": round(steps_ms[-1], 3)},
           "host_only_ms": host_only,
           "gen2_collections": gc.get_stats()[2]["collections"] - full0, "gc_frozen_objects": gc.get_freeze_count()}
    return emit(res, args.out)


if __name__ == "__main__":
    sys.exit(main())
