"""The device page pool: per layer one K and one V array, written functionally.

Layout: `[P, page_size, K, H]`, token-major, so one token's K (or
V) row is contiguous and `slot = page * page_size + offset` addresses it in the
pool viewed as `[P * page_size, K, H]`. Page 0 is the null page: padded
block-table entries point at it and it is never handed to a request. Padding
tokens carry distinct slots `>= P * page_size`, which the write drops (never
-1: negative indices wrap in JAX).

The pool's dtype is the model's, or float8_e4m3fn for an FP8 KV cache (vLLM's
kv_cache_dtype="fp8"): then each layer also has per-kv-head scales k_scale,
v_scale [K] f32, and the write quantizes (kv_dtype.py has the contract).

Dims: P pages, T tokens, K kv heads, H head dim, L layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from pagedjax.kv_cache import kv_dtype
from pagedjax.mesh import TP, match_spec, tp_mesh

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
    """A zeroed pool: L pairs of `[P, page_size, K, H]` arrays (dtype float8_e4m3fn: FP8 cache)."""
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
    k_scale: jax.Array | None = None,
    v_scale: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Scatters new rows `k, v [T, K, H]` into the pools at `slot_mapping [T]`.

    impl "xla" is a jnp scatter (the oracle); "ffi" is the pagedjax_kv_write
    custom call, in place through input_output_aliases. Both are in place when
    the caller donates the pool to its jit. fp8 pools need k_scale, v_scale
    ([K] f32 or a scalar) and get the rows quantized (kv_dtype.quantize).
    """
    P, B, K, H = k_pages.shape
    if k.shape != v.shape or k.shape[1:] != (K, H) or slot_mapping.shape != k.shape[:1]:
        raise ValueError(
            f"write_kv: rows {k.shape}/{v.shape} and slots {slot_mapping.shape} do not fit "
            f"pools {k_pages.shape}"
        )
    if impl not in ("xla", "ffi"):
        raise ValueError(f"write_kv: unknown impl {impl!r} (expected 'xla' or 'ffi')")
    if v_pages.shape != k_pages.shape or v_pages.dtype != k_pages.dtype:
        raise ValueError(f"write_kv: k_pages {k_pages.dtype}{k_pages.shape} and v_pages "
                         f"{v_pages.dtype}{v_pages.shape} differ")
    k_scale, v_scale = kv_dtype.check_scales(k_scale, v_scale, k_pages.dtype, K, "write_kv")
    fp8 = k_scale is not None
    if impl == "xla":
        if fp8:
            k, v = kv_dtype.quantize(k, k_scale), kv_dtype.quantize(v, v_scale)  # [T, K, H] fp8

        def scatter(pool, rows):
            flat = pool.reshape(P * B, K, H)  # [P * page, K, H]
            flat = flat.at[slot_mapping].set(rows.astype(pool.dtype), mode="drop", unique_indices=True)
            return flat.reshape(P, B, K, H)

        return scatter(k_pages, k), scatter(v_pages, v)
    if fp8:  # the handler quantizes rows of f32, f16 or bf16
        if k.dtype not in (jnp.float32, jnp.float16, jnp.bfloat16):
            k, v = k.astype(jnp.float32), v.astype(jnp.float32)
    else:
        k, v = k.astype(k_pages.dtype), v.astype(v_pages.dtype)
        k_scale = v_scale = jnp.ones((K,), jnp.float32)  # read by fp8 pools only
    return _write_kv_ffi(k_pages, v_pages, k, v, slot_mapping.astype(jnp.int32), k_scale, v_scale)


def _write_kv_ffi(k_pages, v_pages, k, v, slot_mapping, k_scale, v_scale):
    from pagedjax import _ffi

    _ffi.require("pagedjax_kv_write", jax.default_backend())

    def call(kp, vp, kk, vv, s, ks, vs):
        return tuple(jax.ffi.ffi_call(
            "pagedjax_kv_write",
            (jax.ShapeDtypeStruct(kp.shape, kp.dtype), jax.ShapeDtypeStruct(vp.shape, vp.dtype)),
            input_output_aliases={0: 0, 1: 1},
        )(kp, vp, kk, vv, s, ks, vs))

    mesh = tp_mesh()
    if mesh is None:
        return call(k_pages, v_pages, k, v, slot_mapping, k_scale, v_scale)
    # Tensor parallelism: each device writes its own kv heads (a custom call on sharded operands
    # outside shard_map would gather the pool).
    P = PartitionSpec
    pool, rows, heads = P(None, None, TP, None), P(None, TP, None), P(TP)  # [P, B, K, H], [T, K, H], [K]
    k_scale, v_scale = match_spec(k_scale, mesh, heads), match_spec(v_scale, mesh, heads)
    return jax.shard_map(call, mesh=mesh, in_specs=(pool, pool, rows, rows, P(), heads, heads),
                         out_specs=(pool, pool), axis_names={TP}, check_vma=False)(
        k_pages, v_pages, k, v, slot_mapping, k_scale, v_scale)
