"""The device page pool: per layer one K and one V array, written functionally.

Layout: `[P, page_size, K, H]`, token-major, so one token's K (or
V) row is contiguous and `slot = page * page_size + offset` addresses it in the
pool viewed as `[P * page_size, K, H]`. Page 0 is the null page: padded
block-table entries point at it and it is never handed to a request. Padding
tokens carry distinct slots `>= P * page_size`, which the write drops (never
-1: negative indices wrap in JAX).

Dims: P pages, T tokens, K kv heads, H head dim, L layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

KVPages = list[tuple[jax.Array, jax.Array]]  # per layer (k_pages, v_pages), each [P, page, K, H]


def init_pages(
    num_layers: int,
    num_pages: int,
    page_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype=jnp.bfloat16,
    sharding: jax.sharding.Sharding | None = None,
) -> KVPages:
    """A zeroed pool: L pairs of `[P, page_size, K, H]` arrays."""
    if min(num_layers, num_pages, page_size, num_kv_heads, head_dim) <= 0:
        raise ValueError("init_pages: every dimension must be positive")
    if num_pages < 2:
        raise ValueError("init_pages: need at least 2 pages (page 0 is the null page)")
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
    return [(zeros(), zeros()) for _ in range(num_layers)]


def pages_bytes(pages: KVPages) -> int:
    """Total bytes of the pool."""
    return sum(k.nbytes + v.nbytes for k, v in pages)


def padding_slots(num_pad: int, num_pages: int, page_size: int) -> np.ndarray:
    """Distinct out-of-range slots for padding tokens (host side)."""
    return np.arange(num_pages * page_size, num_pages * page_size + num_pad, dtype=np.int32)


def write_kv(
    k_pages: jax.Array,
    v_pages: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slot_mapping: jax.Array,
    *,
    impl: str = "xla",
) -> tuple[jax.Array, jax.Array]:
    """Scatters new rows `k, v [T, K, H]` into the pools at `slot_mapping [T]`.

    impl "xla" is a jnp scatter (the oracle); "ffi" is the pagedjax_kv_write
    custom call, in place through input_output_aliases. Both are in place when
    the caller donates the pool to its jit.
    """
    P, B, K, H = k_pages.shape
    if k.shape != v.shape or k.shape[1:] != (K, H) or slot_mapping.shape != k.shape[:1]:
        raise ValueError(
            f"write_kv: rows {k.shape}/{v.shape} and slots {slot_mapping.shape} do not fit "
            f"pools {k_pages.shape}"
        )
    k = k.astype(k_pages.dtype)
    v = v.astype(v_pages.dtype)
    if impl == "xla":
        def scatter(pool, rows):
            flat = pool.reshape(P * B, K, H)  # [P * page, K, H]
            flat = flat.at[slot_mapping].set(rows, mode="drop", unique_indices=True)
            return flat.reshape(P, B, K, H)

        return scatter(k_pages, k), scatter(v_pages, v)
    if impl == "ffi":
        return _write_kv_ffi(k_pages, v_pages, k, v, slot_mapping.astype(jnp.int32))
    raise ValueError(f"write_kv: unknown impl {impl!r} (expected 'xla' or 'ffi')")


def _write_kv_ffi(k_pages, v_pages, k, v, slot_mapping):
    from jax.sharding import PartitionSpec as P

    from pagedjax import _ffi
    from pagedjax.attention import tp_mesh

    _ffi.require("pagedjax_kv_write", jax.default_backend())
    call = jax.ffi.ffi_call(
        "pagedjax_kv_write",
        (jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype),
         jax.ShapeDtypeStruct(v_pages.shape, v_pages.dtype)),
        input_output_aliases={0: 0, 1: 1},
    )
    mesh = tp_mesh()
    if mesh is None:
        return tuple(call(k_pages, v_pages, k, v, slot_mapping))
    # Tensor parallelism: each device writes its own kv heads (a custom call on sharded operands
    # outside shard_map would gather the pool).
    pool, rows = P(None, None, "tp", None), P(None, "tp", None)  # [P, B, K, H], [T, K, H]

    def local(kp, vp, kk, vv, s):
        local_call = jax.ffi.ffi_call(
            "pagedjax_kv_write",
            (jax.ShapeDtypeStruct(kp.shape, kp.dtype), jax.ShapeDtypeStruct(vp.shape, vp.dtype)),
            input_output_aliases={0: 0, 1: 1},
        )
        return tuple(local_call(kp, vp, kk, vv, s))

    return jax.shard_map(local, mesh=mesh, in_specs=(pool, pool, rows, rows, P()),
                         out_specs=(pool, pool), axis_names={"tp"}, check_vma=False)(
        k_pages, v_pages, k, v, slot_mapping)
