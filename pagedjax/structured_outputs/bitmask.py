"""Applying a grammar bitmask to logits on the device (jittable).

Dims: R rows, V vocab, W = ceil(V / 32) int32 words per row (more are allowed and ignored);
bit j of word w is token 32*w + j, set = allowed (llguidance's and xgrammar's layout).

The sampler calls this before penalties, temperature, top-k and top-p, only in steps where some
row is constrained (a static flag); unconstrained rows get all-ones rows and are left unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def apply_token_bitmask(logits: jax.Array, bitmask: jax.Array) -> jax.Array:
    """`logits` [R, V] with the tokens whose bit is clear in `bitmask` [R, W] int32 set to -inf."""
    R, V = logits.shape
    if bitmask.ndim != 2 or bitmask.shape[0] != R or bitmask.shape[1] * 32 < V:
        raise ValueError(f"bitmask must be [R={R}, W>={-(-V // 32)}] for logits [{R}, {V}], "
                         f"got {list(bitmask.shape)}")
    W = -(-V // 32)
    words = bitmask[:, :W].astype(jnp.int32)  # [R, W]
    shifts = jnp.arange(32, dtype=jnp.int32)  # [32]
    bits = (words[:, :, None] >> shifts) & 1  # [R, W, 32]; arithmetic shift, & 1 keeps one bit
    allowed = bits.reshape(R, W * 32)[:, :V].astype(bool)  # [R, V]
    return jnp.where(allowed, logits, jnp.asarray(-jnp.inf, logits.dtype))
