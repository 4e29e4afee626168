"""The pool's element type (vLLM's `kv_cache_dtype`) and the FP8 KV cache's quantization.

Dims: T tokens, K kv heads, H head dim.

An FP8 pool stores float8_e4m3fn, with per-kv-head f32 scales per layer (`k_scale`, `v_scale`,
each [K]; a per-tensor scale is the case of equal entries):

  stored = RoundNearestEven(clamp(f32(x) * (1 / scale), -448, 448))   (f32; 1 / scale IEEE)
  read   = f32(stored) * scale

A product by the reciprocal rather than a quotient because XLA rewrites x / broadcast(scale) into
x * broadcast(1 / scale) itself: this form is the one every path computes bit for bit. NaN stays
NaN, +-inf saturate to +-448, and a tie picks the even neighbour (464 -> 448): this is ml_dtypes'
f32 -> float8_e4m3fn conversion of the clamped product, bit for bit, and what the custom calls do
(xla_kernels/float_convert.h, kv_write.cu). Scales must be finite and > 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

FP8_DTYPE = jnp.dtype(jnp.float8_e4m3fn)
FP8_MAX = 448.0  # largest finite float8_e4m3fn

# vLLM's names for the pool's element type; "auto" is the model's dtype.
KV_CACHE_DTYPES = {
    "auto": None,
    "fp8": FP8_DTYPE,
    "fp8_e4m3": FP8_DTYPE,
    "bfloat16": jnp.dtype(jnp.bfloat16),
    "float16": jnp.dtype(jnp.float16),
    "float32": jnp.dtype(jnp.float32),
}


def resolve_kv_cache_dtype(kv_cache_dtype: str, model_dtype) -> jnp.dtype:
    """The pool dtype for vLLM's `kv_cache_dtype` name ("auto": the model's dtype)."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r} is not one of {sorted(KV_CACHE_DTYPES)}")
    dtype = KV_CACHE_DTYPES[kv_cache_dtype]
    return jnp.dtype(model_dtype) if dtype is None else dtype


def is_fp8(dtype) -> bool:
    """Whether a pool of this dtype is an FP8 KV cache (read and written with scales)."""
    return jnp.dtype(dtype) == FP8_DTYPE


def quantize(x: jax.Array, scale: jax.Array) -> jax.Array:
    """x [..., K, H] -> float8_e4m3fn by the contract above; scale [K] f32."""
    inv = 1.0 / scale.astype(jnp.float32)  # [K]
    q = x.astype(jnp.float32) * inv[:, None]  # [..., K, H]
    return jnp.clip(q, -FP8_MAX, FP8_MAX).astype(FP8_DTYPE)  # clip keeps NaN


def dequantize(x: jax.Array, scale: jax.Array) -> jax.Array:
    """float8_e4m3fn x [..., K, H] -> f32 values f32(x) * scale[K]."""
    return x.astype(jnp.float32) * scale[:, None]


def check_scales(k_scale, v_scale, pool_dtype, num_kv_heads: int, where: str):
    """(k_scale, v_scale) as f32 [K] for an fp8 pool, (None, None) otherwise.

    Raises ValueError when an fp8 pool lacks them, another pool gets them, or they do not fit:
    a scalar (per-tensor) or [K]; finite and > 0 where their values are known at trace time.
    """
    fp8 = is_fp8(pool_dtype)
    given = (k_scale is not None, v_scale is not None)
    if not fp8:
        if any(given):
            raise ValueError(f"{where}: k_scale/v_scale apply to fp8 pages only, the pages are "
                             f"{jnp.dtype(pool_dtype).name}")
        return None, None
    if not all(given):
        raise ValueError(f"{where}: fp8 pages need k_scale and v_scale (f32 [{num_kv_heads}], one per kv head)")
    out = []
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        s = jnp.asarray(s, jnp.float32)
        if s.ndim == 0:
            s = jnp.broadcast_to(s, (num_kv_heads,))  # per-tensor: one scale for every kv head
        if s.shape != (num_kv_heads,):
            raise ValueError(f"{where}: {name} must be a scalar or [{num_kv_heads}] (one per kv head), "
                             f"got shape {s.shape}")
        if not isinstance(s, jax.core.Tracer):
            host = np.asarray(s)
            if not (np.isfinite(host).all() and (host > 0).all()):
                raise ValueError(f"{where}: {name} must be finite and > 0, got {host.tolist()}")
        out.append(s)
    return tuple(out)
