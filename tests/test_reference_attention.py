"""The jnp reference paged attention against a dense float64 numpy causal attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagedjax.attention import build_metadata, paged_attention


def dense_attention(q, k, v, start, scale):
    """float64 causal attention: q [Q, N, H] at positions start.., k/v [S, K, H] at 0..S-1."""
    Q, N, H = q.shape
    K = k.shape[1]
    kk = np.repeat(k, N // K, axis=1)  # [S, N, H]
    vv = np.repeat(v, N // K, axis=1)
    s = np.einsum("qnh,snh->nqs", q, kk) * scale  # [N, Q, S]
    mask = np.arange(k.shape[0])[None, :] <= (start + np.arange(Q))[:, None]  # [Q, S]
    s = np.where(mask[None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("nqs,snh->qnh", p, vv)


def run_case(rng, *, seq_lens, query_lens, N, K, H, page_size, num_pages, pad_tokens=0,
             pad_reqs=0, extra_pages=0):
    """Fills a pool through random permuted page tables, runs the reference, checks each token."""
    pool_k = rng.normal(size=(num_pages, page_size, K, H)) * 100.0  # garbage where unused: must be masked
    pool_v = rng.normal(size=(num_pages, page_size, K, H)) * 100.0
    perm = list(rng.permutation(np.arange(1, num_pages)))  # page 0 is the null page
    tables, ks, vs = [], [], []
    for s_len in seq_lens:
        n = -(-s_len // page_size) + extra_pages  # extra pages past seq_len hold garbage too
        table = [int(perm.pop()) for _ in range(n)]
        k = rng.normal(size=(s_len, K, H))
        v = rng.normal(size=(s_len, K, H))
        for p in range(s_len):
            pool_k[table[p // page_size], p % page_size] = k[p]
            pool_v[table[p // page_size], p % page_size] = v[p]
        tables.append(table)
        ks.append(k)
        vs.append(v)
    T = sum(query_lens) + pad_tokens
    meta = build_metadata(query_lens, seq_lens, tables, page_size=page_size, num_pages=num_pages,
                          num_tokens=T, num_reqs=len(seq_lens) + pad_reqs,
                          max_pages=max(len(t) for t in tables) + 1)
    q = rng.normal(size=(T, N, H))
    scale = H**-0.5
    out = jax.jit(lambda *a: paged_attention(*a, scale=scale, impl="reference"))(
        jnp.asarray(q, jnp.float32), jnp.asarray(pool_k, jnp.float32),
        jnp.asarray(pool_v, jnp.float32), meta)
    out = np.asarray(out, np.float64)
    assert out.shape == (T, N, H)
    start = 0
    for r, (s_len, q_len) in enumerate(zip(seq_lens, query_lens)):
        want = dense_attention(q[start:start + q_len], ks[r], vs[r], s_len - q_len, scale)
        np.testing.assert_allclose(out[start:start + q_len], want, atol=2e-5, rtol=2e-5,
                                   err_msg=f"request {r}")
        start += q_len
    np.testing.assert_array_equal(out[start:], 0.0)  # padding tokens output zeros


@pytest.mark.parametrize("N,K", [(4, 4), (8, 2), (6, 1)])
def test_ragged_prefill_and_decode_mixed(N, K):
    rng = np.random.default_rng(N * 10 + K)
    # whole prompts, chunked prefill (cached tokens before the chunk), decode (length 1),
    # lengths ending mid-page and exactly on a page boundary
    run_case(rng, seq_lens=[7, 21, 1, 16, 33], query_lens=[7, 5, 1, 1, 9],
             N=N, K=K, H=16, page_size=4, num_pages=40, pad_tokens=3, pad_reqs=2, extra_pages=1)


def test_single_token_single_request():
    run_case(np.random.default_rng(1), seq_lens=[1], query_lens=[1], N=2, K=1, H=8,
             page_size=16, num_pages=3)


def test_long_batch_uses_token_blocks():
    # more tokens than reference.TOKEN_BLOCK, so the blocked lax.map path runs, with padding
    rng = np.random.default_rng(2)
    run_case(rng, seq_lens=[50, 90, 3], query_lens=[50, 40, 3], N=4, K=2, H=8,
             page_size=8, num_pages=30, pad_tokens=11)


def test_all_padding_is_zero():
    rng = np.random.default_rng(3)
    meta = build_metadata([], [], [], page_size=4, num_pages=5, num_tokens=6, num_reqs=2, max_pages=2)
    q = jnp.asarray(rng.normal(size=(6, 4, 8)), jnp.float32)
    pool = jnp.asarray(rng.normal(size=(5, 4, 2, 8)), jnp.float32)
    out = paged_attention(q, pool, pool, meta, scale=0.3, impl="reference")
    np.testing.assert_array_equal(np.asarray(out), 0.0)


def test_bad_impl_and_heads():
    meta = build_metadata([1], [1], [[1]], page_size=4, num_pages=3)
    q = jnp.zeros((1, 3, 8))
    pool = jnp.zeros((3, 4, 2, 8))
    with pytest.raises(ValueError, match="impl"):
        paged_attention(q, pool, pool, meta, scale=1.0, impl="nope")
    with pytest.raises(ValueError, match="multiple"):
        paged_attention(q, pool, pool, meta, scale=1.0, impl="reference")
