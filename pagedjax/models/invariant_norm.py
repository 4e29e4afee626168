"""A norm's row statistics in one launch whose sums do not depend on the row count: a Pallas
(Triton) kernel with one program per row.

Dims: R rows (tokens, or tokens x heads for a per-head norm), D the normalized features.

XLA's own reduction over D is compiled by the shape, the row count included: on an H100 a
2048-row RMSNorm runs as a Triton normalization fusion (its tiling configured per shape), one row
as a separate reduce, and rows of the same input come out with other bits at 128 rows (hidden
4096) and 96 rows (128 per head) than in the 2048-row call (benchmarks/RESULTS.md, twenty-fifth
session; `benchmarks/kernels/invariant_norm.py` measures it as `plain`). The row tiles
(`layers.row_tiled`) avoid that with a loop, on the GPU a host-driven `while` between the step's
CUDA graphs, one per norm.

Here each program loads one row (D padded to a power of two, masked) and sums it with Triton's
`tl.sum` over a layout fixed by D alone (the padded length and the warp count), so every row's
sums run in the same order whatever R is. Only the statistics come from the kernel; the rest of
the norm (rsqrt, scale, bias) is elementwise in XLA, which computes each element by itself.

Off the GPU the same kernel runs in Pallas's interpret mode (slow; for the tests).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


def _padded(d: int) -> int:
    return 1 << max(0, d - 1).bit_length()


def _warps(dp: int) -> int:
    """The warp count for a padded row of `dp` elements: fixed by D alone (16 elements a thread
    at least, 1 to 8 warps)."""
    return max(1, min(8, dp // 512))


def _moments_kernel(x_ref, mean_ref, m2_ref, *, d: int, dp: int, centered: bool):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    r = pl.program_id(0)
    mask = jax.lax.broadcasted_iota(jnp.int32, (dp,), 0) < d
    x = plgpu.load(x_ref.at[pl.ds(r * d, dp)], mask=mask, other=0.0).astype(jnp.float32)
    if centered:
        mean = jnp.sum(x) / d
        dev = jnp.where(mask, x - mean, 0.0)
        m2 = jnp.sum(dev * dev) / d
    else:
        mean = jnp.zeros((), jnp.float32)
        m2 = jnp.sum(x * x) / d
    mean_ref[...] = jnp.full((1,), mean, jnp.float32)
    m2_ref[...] = jnp.full((1,), m2, jnp.float32)


@functools.partial(jax.jit, static_argnames=("centered",))
def row_moments(x: jax.Array, centered: bool) -> tuple[jax.Array, jax.Array]:
    """x [..., D] -> (mean, m2), each [..., 1] float32: with `centered` the row's mean and its mean
    squared deviation (LayerNorm's mean and variance), else zeros and the mean square (RMSNorm's),
    each row summed in the same order whatever the row count."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    *lead, d = x.shape
    rows = math.prod(lead)
    dp = _padded(d)
    flat = x.reshape(rows * d)
    interpret = jax.default_backend() != "gpu"
    if interpret:  # the interpreter slices rather than masks: the last row's padded slice must fit
        flat = jnp.pad(flat, (0, dp - d))
    kernel = functools.partial(_moments_kernel, d=d, dp=dp, centered=centered)
    out = jax.ShapeDtypeStruct((rows,), jnp.float32)
    stat = pl.BlockSpec((1,), lambda i: (i,))
    mean, m2 = pl.pallas_call(
        kernel, grid=(rows,), out_shape=(out, out), out_specs=(stat, stat),
        compiler_params=plgpu.CompilerParams(num_warps=_warps(dp), num_stages=1),
        interpret=interpret, name="pagedjax_row_moments")(flat)
    return mean.reshape(*lead, 1), m2.reshape(*lead, 1)
