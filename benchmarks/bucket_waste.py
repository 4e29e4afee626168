"""How many padded tokens W1's steps carry under a token-bucket grid: the scheduler alone, no model.

W1 (1000 ShareGPT-like requests, all waiting at t=0) runs through the engine's Scheduler with
fake tokens (every request runs to its max_tokens). Each step's token count is padded up to the
step's bucket. The step is compiled per bucket, and its device time grows with the padded
count: the prefill-heavy steps are compute-bound, and the weights are read once a step in any
case. Reported per grid: the compiled buckets, the padded tokens over the real ones (over all
steps, and over the steps above 256 tokens, where compute dominates), and the steps per bucket.

    python benchmarks/bucket_waste.py --out waste.json
    python benchmarks/bucket_waste.py --max-num-batched-tokens 8192

Grids: `x4` is the engine's "coarse" (`model_runner.token_buckets`: 1, 4, 16, ... below the budget,
and the budget), `x2` doubles, `x4+512` adds every multiple of 512 above 512, and `fine`, the
engine's default, is x4 up to 256 and then 2^k and 1.5 * 2^k (`model_runner.fine_token_buckets`).
"""

from __future__ import annotations

import argparse
import bisect
import collections
import time

import numpy as np
from common import emit, sharegpt_lengths


def grids(budget: int) -> dict[str, list[int]]:
    from pagedjax.model_runner import fine_token_buckets, token_buckets

    x2, b = [], 1
    while b < budget:
        x2.append(b)
        b *= 2
    x4 = token_buckets(budget)
    return {"x4": x4, "x2": x2 + [budget],
            "x4+512": sorted(set(x4) | set(range(512, budget + 1, 512))), "fine": fine_token_buckets(budget)}


def step_tokens(args) -> list[int]:
    """Tokens of each step of W1 under the scheduler (sync scheduling, fake tokens)."""
    from pagedjax.kv_cache.block_allocator import CacheConfig
    from pagedjax.request import Request
    from pagedjax.sampling_params import SamplingParams
    from pagedjax.scheduler import Scheduler, SchedulerConfig

    rng = np.random.default_rng(args.seed)
    ins, outs = sharegpt_lengths(rng, args.num_prompts, args.max_len)
    limits = SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                             max_model_len=args.max_len)
    sched = Scheduler(limits, CacheConfig(page_size=16, num_pages=args.num_pages, enable_prefix_caching=False))
    for i, (n_in, n_out) in enumerate(zip(ins, outs)):
        prompt = rng.integers(16, 32000, int(n_in)).tolist()
        sched.add_request(Request(str(i), prompt, SamplingParams(max_tokens=int(n_out), ignore_eos=True)))
    tokens = []
    while sched.has_unfinished_requests():
        out = sched.schedule()
        tokens.append(sum(len(s.token_ids) for s in out.scheduled))
        sched.update_from_output(out, {s.request_id: 1 for s in out.scheduled if s.sample})
    return tokens


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--max-len", type=int, default=4096)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--num-pages", type=int, default=51_000, help="Llama-3-8B's pool on an H200: no preemption")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    tokens = step_tokens(args)
    real = sum(tokens)
    big = [t for t in tokens if t > 256]
    res = {"date": time.strftime("%Y-%m-%d"), "workload": f"sharegpt:{args.num_prompts}",
           "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
           "steps": len(tokens), "tokens": real, "steps_over_256": len(big), "grids": {}}
    for name, grid in grids(args.max_num_batched_tokens).items():
        padded = [grid[bisect.bisect_left(grid, t)] for t in tokens]
        padded_big = [grid[bisect.bisect_left(grid, t)] for t in big]
        res["grids"][name] = {
            "buckets": grid, "padded_over_real": round(sum(padded) / real, 4),
            "padded_over_real_over_256": round(sum(padded_big) / max(sum(big), 1), 4),
            "steps_per_bucket": dict(sorted(collections.Counter(padded).items()))}
        print(f"{name:7s} {len(grid):2d} buckets: padded/real {res['grids'][name]['padded_over_real']:.3f}, "
              f"steps > 256 tokens {res['grids'][name]['padded_over_real_over_256']:.3f}", flush=True)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return emit(res, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
