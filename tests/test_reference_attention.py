"""The jnp reference paged attention against dense float64 attention, and against HF transformers'
own mask and soft-cap code for sliding windows and Gemma 2's logit soft-cap.

Dims: Q query tokens of a request, S its context, N query heads, K kv heads, H head dim.
Every case is drawn from a seeded generator; failure messages name the seed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
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


def hf_attention(q, k, v, start, scale, *, sliding_window=None, softcap=None):
    """HF transformers' Gemma 2 eager attention (float64 inputs) under HF's own causal or
    sliding-window mask function: q [Q, N, H] at positions start.., k/v [S, K, H]; -> [Q, N, H]."""
    torch = pytest.importorskip("torch")
    from transformers import masking_utils
    from transformers.models.gemma2 import modeling_gemma2

    Q, N, H = q.shape
    S, K, _ = k.shape
    mask_fn = (masking_utils.causal_mask_function if sliding_window is None
               else masking_utils.sliding_window_causal_mask_function(sliding_window))
    q_idx = torch.arange(start, start + Q)[:, None]
    kv_idx = torch.arange(S)[None, :]
    allowed = mask_fn(0, 0, q_idx, kv_idx)  # [Q, S] bool
    additive = torch.where(allowed, 0.0, float("-inf")).to(torch.float64)[None, None]  # [1, 1, Q, S]

    class Module(torch.nn.Module):
        num_key_value_groups = N // K
        head_dim = H

    t = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(1, 0, 2)))[None]  # [1, heads, len, H]
    out, _ = modeling_gemma2.eager_attention_forward(Module().eval(), t(q), t(k), t(v), additive,
                                                     scaling=scale, softcap=softcap)
    return out[0].numpy()  # [Q, N, H]


def run_case(seed, *, seq_lens, query_lens, N, K, H, page_size, num_pages, pad_tokens=0, pad_reqs=0,
             extra_pages=0, sliding_window=None, softcap=None, fp8=False):
    """Fills a pool through random permuted page tables, runs the reference, checks each token.

    fp8: the pool holds float8_e4m3fn (written with ml_dtypes) and per-kv-head scales; the oracle
    reads it back in float64 as stored * scale.
    """
    rng = np.random.default_rng(seed)
    pool_k = rng.normal(size=(num_pages, page_size, K, H)) * 100.0  # garbage where unused: must be masked
    pool_v = rng.normal(size=(num_pages, page_size, K, H)) * 100.0
    scales = rng.uniform(0.05, 0.5, (2, K)) if fp8 else np.ones((2, K))
    if fp8:  # garbage within fp8's range
        pool_k, pool_v = np.clip(pool_k, -400, 400), np.clip(pool_v, -400, 400)
    perm = list(rng.permutation(np.arange(1, num_pages)))  # page 0 is the null page
    tables, ks, vs = [], [], []
    for s_len in seq_lens:
        n = -(-s_len // page_size) + extra_pages  # extra pages past seq_len hold garbage too
        table = [int(perm.pop()) for _ in range(n)]
        k = rng.normal(size=(s_len, K, H))
        v = rng.normal(size=(s_len, K, H))
        if fp8:  # what the pool can hold, and the values it reads back
            k = (k / scales[0][:, None]).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
            v = (v / scales[1][:, None]).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
        for p in range(s_len):
            pool_k[table[p // page_size], p % page_size] = k[p]
            pool_v[table[p // page_size], p % page_size] = v[p]
        tables.append(table)
        ks.append(k * scales[0][:, None])
        vs.append(v * scales[1][:, None])
    T = sum(query_lens) + pad_tokens
    meta = build_metadata(query_lens, seq_lens, tables, page_size=page_size, num_pages=num_pages,
                          num_tokens=T, num_reqs=len(seq_lens) + pad_reqs,
                          max_pages=max(len(t) for t in tables) + 1)
    q = rng.normal(size=(T, N, H))
    scale = H**-0.5 * (4.0 if softcap else 1.0)  # larger scores exercise the cap
    pool_dtype = jnp.float8_e4m3fn if fp8 else jnp.float32
    opts = dict(scale=scale, impl="reference", sliding_window=sliding_window, logit_softcap=softcap)
    if fp8:
        opts.update(k_scale=jnp.asarray(scales[0], jnp.float32), v_scale=jnp.asarray(scales[1], jnp.float32))
    out = jax.jit(lambda *a: paged_attention(*a, **opts))(
        jnp.asarray(q, jnp.float32), jnp.asarray(pool_k, pool_dtype), jnp.asarray(pool_v, pool_dtype), meta)
    out = np.asarray(out, np.float64)
    assert out.shape == (T, N, H)
    start = 0
    for r, (s_len, q_len) in enumerate(zip(seq_lens, query_lens)):
        qr = q[start:start + q_len]
        if sliding_window is None and softcap is None:
            want = dense_attention(qr, ks[r], vs[r], s_len - q_len, scale)
        else:
            want = hf_attention(qr, ks[r], vs[r], s_len - q_len, scale, sliding_window=sliding_window,
                                softcap=softcap)
        np.testing.assert_allclose(out[start:start + q_len], want, atol=2e-5, rtol=2e-5,
                                   err_msg=f"seed={seed} request {r}")
        start += q_len
    np.testing.assert_array_equal(out[start:], 0.0, err_msg=f"seed={seed}: padding tokens output zeros")


@pytest.mark.parametrize("N,K", [(4, 4), (8, 2), (6, 1)])
def test_ragged_prefill_and_decode_mixed(N, K):
    # whole prompts, chunked prefill (cached tokens before the chunk), decode (length 1),
    # lengths ending mid-page and exactly on a page boundary
    run_case(N * 10 + K, seq_lens=[7, 21, 1, 16, 33], query_lens=[7, 5, 1, 1, 9],
             N=N, K=K, H=16, page_size=4, num_pages=40, pad_tokens=3, pad_reqs=2, extra_pages=1)


def test_single_token_single_request():
    run_case(1, seq_lens=[1], query_lens=[1], N=2, K=1, H=8, page_size=16, num_pages=3)


def test_long_batch_uses_token_blocks():
    # more tokens than reference.TOKEN_BLOCK, so the blocked lax.map path runs, with padding
    run_case(2, seq_lens=[50, 90, 3], query_lens=[50, 40, 3], N=4, K=2, H=8,
             page_size=8, num_pages=30, pad_tokens=11)


@pytest.mark.parametrize("window", [1, 3, 8, 30])
def test_sliding_window_matches_hf_mask(window):
    """HF's sliding_window_causal_mask_function decides which keys each query sees."""
    run_case(100 + window, seq_lens=[7, 21, 1, 16, 33, 40], query_lens=[7, 5, 1, 1, 9, 3],
             N=4, K=2, H=16, page_size=4, num_pages=60, pad_tokens=2, pad_reqs=1, extra_pages=1,
             sliding_window=window)


@pytest.mark.parametrize("window,softcap", [(None, 2.0), (None, 50.0), (5, 3.0)])
def test_logit_softcap_matches_hf_gemma2(window, softcap):
    """HF's Gemma 2 eager attention: scores scaled, soft-capped, then masked and softmaxed."""
    run_case(200 + int(softcap), seq_lens=[9, 30, 17], query_lens=[9, 4, 1], N=6, K=2, H=16, page_size=8,
             num_pages=30, pad_tokens=3, sliding_window=window, softcap=softcap)


def test_long_batch_with_window_and_cap():
    run_case(3, seq_lens=[70, 90], query_lens=[70, 20], N=4, K=1, H=8, page_size=8, num_pages=30,
             pad_tokens=5, sliding_window=16, softcap=4.0)


@pytest.mark.parametrize("window,softcap", [(None, None), (6, None), (None, 3.0)])
def test_fp8_pages_read_back_with_their_scales(window, softcap):
    run_case(300 + (window or 0), seq_lens=[7, 21, 1, 16, 33], query_lens=[7, 5, 1, 1, 9], N=4, K=2, H=16,
             page_size=4, num_pages=40, pad_tokens=3, pad_reqs=2, extra_pages=1, fp8=True,
             sliding_window=window, softcap=softcap)


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
