"""What one jitted call costs the host, by the number of array arguments (no device work to speak of).

The engine step passes every weight and every pool array (Llama-3-8B: 291 + 64); this measures
the host time of a call (until it returns, not until the device is done) for 4 to 512 arguments,
donated or not, passed as a pytree or through an AOT-compiled executable, so the per-argument
cost of dispatch is known on this device.

  python benchmarks/dispatch_probe.py [--out probe.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp


def _time(call, n: int = 200) -> float:
    """Median host seconds of one call (the device is drained between batches of calls)."""
    out = call()
    jax.block_until_ready(out)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - t0)
        if len(times) % 20 == 0:
            jax.block_until_ready(out)
    jax.block_until_ready(out)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows = []
    for n in (4, 32, 128, 355, 512):
        xs = [jnp.full((256,), i, jnp.float32) for i in range(n)]
        touch = jax.jit(lambda xs: xs[0] + xs[-1])  # reads two, takes all
        donate = jax.jit(lambda xs: [x + 1 for x in xs], donate_argnums=0)
        aot = touch.lower(xs).compile()
        state = {"xs": xs}

        def donated():
            state["xs"] = donate(state["xs"])
            return state["xs"][0]

        rows.append({"args": n, "jit_us": round(1e6 * _time(lambda: touch(xs)), 1),
                     "aot_us": round(1e6 * _time(lambda: aot(xs)), 1),
                     "donated_jit_us": round(1e6 * _time(donated), 1)})
        print(rows[-1], flush=True)
    res = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "rows": rows}
    print("| args | jit call (us) | AOT call (us) | jit, all donated and rewritten (us) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['args']} | {r['jit_us']} | {r['aot_us']} | {r['donated_jit_us']} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
