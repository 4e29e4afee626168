"""Timing a jitted call on the device, shared by the kernel benchmarks."""

from __future__ import annotations

import statistics
import time

import jax


def median_time(fn, args, reps: int = 1, repeats: int = 5, target_s: float = 0.05, max_iters: int = 100) -> float:
    """Median seconds per call of fn(*args), which makes `reps` calls; after compile and warm-up.

    Each sample runs fn enough times back to back to fill about target_s (so dispatch overlaps
    the device's work) and waits once at its end.
    """
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    iters = int(min(max(target_s / max(time.perf_counter() - t, 1e-6), 1), max_iters))
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t) / iters / reps)
    return statistics.median(samples)
