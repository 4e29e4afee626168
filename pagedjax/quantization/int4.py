"""INT4 weight-only (W4A16): building the tiled weight, dequantizing it, and the portable XLA matmul.

Dims: M rows of x (tokens), K in_features, N out_features, G = K / group_size groups.
w[n, k] = (q[n, k] - zero[g, n]) * scale[g, n], q and zero in [0, 16], with g = k // group_size;
act-order (GPTQ desc_act) weights hold their rows sorted by group, the input channel of each in
`perm` (weight.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pagedjax.quantization.weight import (QuantizedWeight, check_int4_shape, pack_int4_tiles, pack_int4_tiles_jax,
                                          unpack_int4_tiles)

HIGHEST = jax.lax.Precision.HIGHEST
SCALE_DTYPES = (np.float16, jnp.bfloat16, np.float32)


def group_order(g_idx: np.ndarray, K: int, group_size: int) -> np.ndarray:
    """Act order: g_idx [K] (each input channel's group, group_size channels in every group, as
    GPTQ assigns them) -> perm [K] int32, the channels sorted by group (stable): row j of the
    stored weight is input channel perm[j]."""
    G = K // group_size
    g_idx = np.asarray(g_idx)
    if g_idx.shape != (K,) or g_idx.dtype.kind not in "iu":
        raise ValueError(f"int4 g_idx must be integers [{K}], got {g_idx.dtype}{list(g_idx.shape)}")
    if K and (g_idx.min() < 0 or g_idx.max() >= G):
        raise ValueError(f"int4 g_idx must lie in [0, {G}), got [{g_idx.min()}, {g_idx.max()}]")
    counts = np.bincount(g_idx, minlength=G)
    if (counts != group_size).any():
        raise ValueError(f"int4 g_idx must give each of its {G} groups {group_size} input channels (GPTQ's "
                         f"act order does), got {counts.min()} to {counts.max()}")
    return np.argsort(g_idx, kind="stable").astype(np.int32)


def int4_weight(q: np.ndarray, zero: np.ndarray, scale: np.ndarray, group_size: int,
                g_idx: np.ndarray | None = None) -> QuantizedWeight:
    """Codes q [K, N], zero [G, N], scale [G, N] -> a QuantizedWeight of host (numpy) arrays.

    The tiles are packed here, on the host; put the arrays on devices (or straight into their
    shards) with jax.device_put. group_size -1 means one group over the whole K. g_idx [K] (act
    order): the group of each input channel, each in [0, G), group_size channels in every group
    (as GPTQ assigns them); the rows are then stored sorted by group, their channels in `perm`.
    """
    q, zero, scale = np.asarray(q), np.asarray(zero), np.asarray(scale)
    if q.ndim != 2:
        raise ValueError(f"int4 codes must be [in, out], got shape {q.shape}")
    K, N = q.shape
    group_size = K if group_size == -1 else group_size
    check_int4_shape(K, N, group_size)
    G = K // group_size
    perm = None
    if g_idx is not None:
        perm = group_order(g_idx, K, group_size)
        q = q[perm]
    if zero.shape != (G, N) or scale.shape != (G, N):
        raise ValueError(f"int4 [in={K}, out={N}], group {group_size}: zeros {zero.shape} and scales {scale.shape} "
                         f"must both be {(G, N)}")
    if zero.size and (zero.min() < 0 or zero.max() > 16):
        raise ValueError(f"int4 zero points must lie in [0, 16], got [{zero.min()}, {zero.max()}]")
    if scale.dtype not in [np.dtype(d) for d in SCALE_DTYPES]:
        raise ValueError(f"int4 scales must be f16, bf16 or f32, got {scale.dtype}")
    return QuantizedWeight(pack_int4_tiles(q.T), scale, zero.astype(np.uint8), None, "int4", K, N,
                           group_size=group_size, perm=perm).check()


def quantize_int4(w: np.ndarray, group_size: int = 128, scale_dtype=np.float16) -> QuantizedWeight:
    """Round-to-nearest asymmetric int4 of a float weight w [N, K] (HF's [out, in]; host arrays).

    Per (group, output channel): scale = (max - min) / 15, zero = round(-min / scale) in [0, 15],
    q = clip(round(w / scale) + zero, 0, 15): AutoAWQ's pseudo-quantizer without the search.
    For tests and benchmarks; checkpoints arrive already quantized (formats.py).
    """
    w = np.asarray(w, np.float32)
    N, K = w.shape
    group_size = K if group_size == -1 else group_size
    check_int4_shape(K, N, group_size)
    G = K // group_size
    wg = w.reshape(N, G, group_size)  # [N, G, gs]
    hi, lo = wg.max(axis=2), wg.min(axis=2)  # [N, G]
    scale = np.maximum((hi - lo) / 15.0, 1e-8).astype(scale_dtype)
    s = scale.astype(np.float32)
    zero = np.clip(np.round(-lo / s), 0, 15)
    q = np.clip(np.round(wg / s[:, :, None]) + zero[:, :, None], 0, 15).reshape(N, K)
    return int4_weight(q.T.astype(np.uint8), zero.T.astype(np.uint8), scale.T, group_size)


@functools.partial(jax.jit, static_argnames=("group_size", "scale_dtype"))
def quantize_int4_jax(w: jax.Array, group_size: int = 128, scale_dtype=jnp.float16) -> QuantizedWeight:
    """quantize_int4 in jnp, on the device (random weights of large models for benchmarks): the
    same round-to-nearest codes, zeros and scales from a float weight w [N, K] (HF's [out, in])."""
    N, K = w.shape
    group_size = K if group_size == -1 else group_size
    check_int4_shape(K, N, group_size)
    G = K // group_size
    wg = w.astype(jnp.float32).reshape(N, G, group_size)  # [N, G, gs]
    hi, lo = wg.max(axis=2), wg.min(axis=2)  # [N, G]
    scale = jnp.maximum((hi - lo) / 15.0, 1e-8).astype(scale_dtype)
    s = scale.astype(jnp.float32)
    zero = jnp.clip(jnp.round(-lo / s), 0, 15)
    q = jnp.clip(jnp.round(wg / s[:, :, None]) + zero[:, :, None], 0, 15).reshape(N, K)
    return QuantizedWeight(pack_int4_tiles_jax(q.astype(jnp.uint8)), scale.T, zero.T.astype(jnp.uint8), None,
                           "int4", K, N, group_size=group_size)


def dequantize_int4(w: QuantizedWeight, dtype=jnp.float32) -> jax.Array:
    """The weight [N, K] that w stands for, computed in f32 and returned in `dtype`."""
    N, K, gs = w.out_features, w.in_features, w.group_size
    q = unpack_int4_tiles(w.qvalue).reshape(N, K // gs, gs).astype(jnp.float32)  # [N, G, gs]
    z = w.zero.T.astype(jnp.float32)[:, :, None]  # [N, G, 1]
    s = w.scale.T.astype(jnp.float32)[:, :, None]  # [N, G, 1]
    out = ((q - z) * s).reshape(N, K)  # act order: column j is input channel perm[j]
    if w.act_order:
        out = jnp.zeros_like(out).at[:, w.perm].set(out)
    return out.astype(dtype)


def int4_matmul_xla(x: jax.Array, w: QuantizedWeight) -> jax.Array:
    """f32 y [M, N] = x [M, K] @ dequantized w.T: dequantize to x's dtype, then one dot (any backend)."""
    wd = dequantize_int4(w, x.dtype if x.dtype in (jnp.bfloat16, jnp.float16) else jnp.float32)  # [N, K]
    return jax.lax.dot_general(x.astype(wd.dtype), wd, (((1,), (1,)), ((), ())), precision=HIGHEST,
                               preferred_element_type=jnp.float32)  # [M, N]
