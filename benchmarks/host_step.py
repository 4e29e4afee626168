"""The engine step's host side at a large decode batch, where the device's time is small: the
batch preparation (`ModelRunner.prepare`, and the sampling metadata inside it) and whole engine
steps, with the garbage collector's full collections counted.

  python benchmarks/host_step.py --batch-size 256 --out host.json

A tiny random model (named:tiny-llama by default) keeps the device's share small, so the figures
are the host's: the same Python runs beside an H200. `prepare_ms` and `sampling_metadata_ms` are
medians over --calls calls on one decode batch; `step_ms` is the median, p90 and max of --steps
engine steps (greedy, async scheduling), and `gen2_collections` the full collections during them.
To time another tree's code, run this file with PYTHONPATH pointing at that tree.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time


def _median_ms(fn, calls: int) -> float:
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return round(1000 * statistics.median(samples), 3)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="named:tiny-llama")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import jax.numpy as jnp
    import numpy as np

    import pagedjax as pj
    from pagedjax.dummy_weights import random_params
    from pagedjax.models.config import get_config
    from pagedjax.sampling_metadata import make_sampling_metadata
    from pagedjax.scheduler import ScheduledRequest

    if not args.model.startswith("named:"):
        raise SystemExit("--model: a named config (named:NAME)")
    params = random_params(get_config(args.model[6:]), dtype=jnp.float32)
    B, S = args.batch_size, args.prompt_len
    max_len = min(params.config.max_position_embeddings, S + args.steps + 24)
    llm = pj.LLM(params, max_num_seqs=B, enable_prefix_caching=False, max_num_batched_tokens=B * S,
                 max_model_len=max_len)
    engine = llm.engine
    rng = np.random.default_rng(0)
    sp = pj.SamplingParams(max_tokens=max_len - S, temperature=0.0, ignore_eos=True)
    for i in range(B):
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

    full0 = gc.get_stats()[2]["collections"]
    steps = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - t0)
    steps_ms = sorted(1000 * s for s in steps)
    res = {"date": time.strftime("%Y-%m-%d"), "model": args.model, "batch_size": len(batch),
           "prepare_ms": prepare_ms, "sampling_metadata_ms": metadata_ms,
           "step_ms": {"median": round(statistics.median(steps_ms), 3),
                       "p90": round(steps_ms[int(0.9 * (len(steps_ms) - 1))], 3), "max": round(steps_ms[-1], 3)},
           "gen2_collections": gc.get_stats()[2]["collections"] - full0, "gc_frozen_objects": gc.get_freeze_count()}
    print(json.dumps(res))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
