"""Paged attention in pure jnp: the oracle every kernel is tested against.

Dims: T tokens in the flat batch, R requests, M max pages per request, N query heads,
K kv heads, G = N // K query heads per kv head, H head dim, B page size, L = M * B.

Each token gathers its request's pages through the block table (so the pool is read in the
layout it is stored in), masks keys past its own position (causal; this covers chunked
prefill, where queries start after already cached tokens) and, with a sliding window W, keys at
or before its position - W, and does a float32 softmax over scores scale * q.k (soft-capped
first when asked, as HF does). An fp8 pool is read as f32(stored) * scale per kv head.
Tokens past query_start_loc[R] are padding and get zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pagedjax.attention.metadata import AttentionMetadata
from pagedjax.attention.options import check_options
from pagedjax.kv_cache import kv_dtype

# Tokens per block of the query loop: bounds the [tokens, L, K, H] gather on long contexts.
TOKEN_BLOCK = 64


def paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    meta: AttentionMetadata,
    *,
    scale: float,
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
    k_scale: jax.Array | None = None,
    v_scale: jax.Array | None = None,
    batch_invariant: bool = False,
) -> jax.Array:
    """Causal attention of q [T, N, H] over each request's paged K/V; returns [T, N, H].

    k_scale / v_scale [K] f32: the dequantization scales, needed when the pages are fp8.
    batch_invariant (static): every token attends inside a block of TOKEN_BLOCK rows, whatever T, so
    its sums are compiled the same way in any batch (XLA picks a dot's loop order and vectorization
    by its shapes: a batch of 8 and one of 64 need not add a row's terms in the same order).
    """
    T, N, H = q.shape
    P, B, K, _ = k_pages.shape
    R = meta.seq_lens.shape[0]
    if N % K:
        raise ValueError(f"paged_attention: {N} query heads are not a multiple of {K} kv heads")
    check_options(sliding_window, logit_softcap, "paged_attention")
    k_scale, v_scale = kv_dtype.check_scales(k_scale, v_scale, k_pages.dtype, K, "paged_attention")
    meta = jax.tree.map(jnp.asarray, meta)  # host (numpy) metadata works too
    qsl = meta.query_start_loc
    token = jnp.arange(T, dtype=jnp.int32)
    req = jnp.clip(jnp.searchsorted(qsl, token, side="right") - 1, 0, R - 1)  # [T]
    valid = token < qsl[R]  # [T] False for padding tokens

    def read(pages, table, scales):  # pages [P, B, K, H], table [t, M] -> f32 [t, L, K, H]
        x = pages[table].reshape(table.shape[0], -1, K, H)
        return x.astype(jnp.float32) if scales is None else kv_dtype.dequantize(x, scales)

    def attend(q_blk, req_blk, pos_blk, valid_blk):
        # q_blk [t, N, H]; the others [t]
        t = q_blk.shape[0]
        table = meta.block_tables[req_blk]  # [t, M]
        k = read(k_pages, table, k_scale)  # [t, L, K, H]
        v = read(v_pages, table, v_scale)  # [t, L, K, H]
        key_pos = jnp.arange(k.shape[1], dtype=jnp.int32)  # [L]
        mask = (key_pos[None, :] <= pos_blk[:, None]) & (key_pos[None, :] < meta.seq_lens[req_blk][:, None])
        if sliding_window is not None:
            mask &= key_pos[None, :] > pos_blk[:, None] - sliding_window  # HF: kv_idx > q_idx - W
        mask &= valid_blk[:, None]  # [t, L]
        qg = q_blk.reshape(t, K, N // K, H).astype(jnp.float32)  # [t, K, G, H]
        s = jnp.einsum("tkgh,tlkh->tkgl", qg, k) * scale  # [t, K, G, L]
        if logit_softcap is not None:
            s = logit_softcap * jnp.tanh(s / logit_softcap)  # before the mask, as HF's Gemma 2
        s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
        m = jnp.max(s, axis=-1, keepdims=True)
        p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))  # fully masked rows: all zeros
        denom = jnp.sum(p, axis=-1, keepdims=True)
        p = p / jnp.where(denom > 0, denom, 1.0)
        o = jnp.einsum("tkgl,tlkh->tkgh", p, v)  # [t, K, G, H]
        return o.reshape(t, N, H).astype(q.dtype)

    if T <= TOKEN_BLOCK and not batch_invariant:
        return attend(q, req, meta.positions, valid)
    pad = -T % TOKEN_BLOCK
    blocks = lambda x: jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape(
        -1, TOKEN_BLOCK, *x.shape[1:])
    out = jax.lax.map(lambda a: attend(*a), (blocks(q), blocks(req), blocks(meta.positions), blocks(valid)))
    return out.reshape(-1, N, H)[:T]  # [T, N, H]
