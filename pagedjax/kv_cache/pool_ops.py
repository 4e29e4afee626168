"""Device operations on whole pages of the pool: copy-on-write copies, and swap-out / swap-in.

Each is a jitted call of its own, run only on steps that need it (fused into the step, XLA
copied the whole pool every step to read and write it in one fusion). Writes are row scatters
into the pool viewed as [P * B, K, H], like the KV write, with the pool donated: in place.

Dims: P pages, B page size, K kv heads, H head dim, L layers, C pages copied (padded).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

SWAP_CHUNK = 64  # pages per swap call: bounds its device temporaries


def padded(values: list[int], fill: int) -> np.ndarray:
    """int32 `values` padded with `fill` to a power of two: page copies and swaps compile a few sizes."""
    out = np.full(1 << max(len(values) - 1, 0).bit_length(), fill, np.int32)
    out[:len(values)] = values
    return out


def _rows(pages: jax.Array, page_size: int) -> jax.Array:
    """The pool rows [C * B] of pages [C] (a page >= P gives rows >= P * B: dropped by the writes)."""
    return (pages[:, None] * page_size + jnp.arange(page_size, dtype=jnp.int32)).reshape(-1)


def _scatter(pool: jax.Array, dst: jax.Array, rows: jax.Array) -> jax.Array:
    """pool [P, B, K, H] with pages dst [C] set to rows [C * B, K, H] (dst >= P: dropped)."""
    P, B, K, H = pool.shape
    return pool.reshape(P * B, K, H).at[_rows(dst, B)].set(rows, mode="drop", unique_indices=True).reshape(P, B, K, H)


@functools.partial(jax.jit, donate_argnums=(0,))
def copy_pages(pages, src: jax.Array, dst: jax.Array):
    """Copy-on-write before a step: pages src -> dst [C] in every layer (dst >= P: dropped)."""
    with jax.named_scope("copy_pages"):
        out = []
        for k, v in pages:
            P, B, K, H = k.shape
            rows = [pool.reshape(P * B, K, H)[_rows(src, B)] for pool in (k, v)]  # [C * B, K, H] each
            # The barrier finishes the reads before the writes, so the scatters can run in place.
            rows, (k, v) = jax.lax.optimization_barrier((rows, (k, v)))
            out.append((_scatter(k, dst, rows[0]), _scatter(v, dst, rows[1])))
        return out


@jax.jit
def gather_pages(pages, src: jax.Array) -> jax.Array:
    """Swap-out: pages src [C] of every layer, K and V -> [C, L, 2, B, K, H] (read only)."""
    with jax.named_scope("swap_out"):
        return jnp.stack([jnp.stack([k[src], v[src]], axis=1) for k, v in pages], axis=1)


@functools.partial(jax.jit, donate_argnums=(0,))
def scatter_pages(pages, rows: jax.Array, dst: jax.Array):
    """Swap-in: rows [C, L, 2, B, K, H] into pages dst [C] of every layer (dst >= P: dropped)."""
    with jax.named_scope("swap_in"):
        out = []
        for layer, (k, v) in enumerate(pages):
            B, K, H = k.shape[1:]
            out.append(tuple(_scatter(pool, dst, rows[:, layer, j].reshape(-1, K, H))
                             for j, pool in enumerate((k, v))))
        return out
