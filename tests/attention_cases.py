"""Random paged-attention cases, a float64 oracle and the poisoned custom call, for the kernel tests.

Dims: T tokens in the flat batch, R requests, M max pages per request, N query heads, K kv heads,
H head dim, P pages, B page size.

A case is a ragged batch (decode tokens, prefill from scratch, chunked prefill after cached tokens,
lengths ending mid-page, randomly permuted page tables, padded tokens and requests) drawn from a
seeded generator whose seed every failure message names. Page rows no request owns hold `tail`
(NaN for the custom call: a kernel that reads or multiplies them shows it). An fp8 pool is
quantized on the host with ml_dtypes (independent of pagedjax) and its scales drawn per kv head;
the oracle reads it back in float64 as stored * scale.
"""

from __future__ import annotations

import dataclasses
import os
import zlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from pagedjax.attention import ffi
from pagedjax.attention.metadata import build_metadata

# abs, on outputs of size ~1. float32: the CUDA build's fast-math tanh (soft-caps) and exp give up to
# ~4e-5 on the H200 (2026-12-04); a wrong mask or scale is off by ~1e-1.
TOL = {jnp.float32: 1e-4, jnp.float16: 4e-3, jnp.bfloat16: 2.5e-2}
FP8 = ml_dtypes.float8_e4m3fn


def seed_for(nodeid: str) -> int:
    """The test's seed: PAGEDJAX_TEST_SEED if set, else a stable hash of its pytest node id."""
    env = os.environ.get("PAGEDJAX_TEST_SEED")
    return int(env) if env else zlib.crc32(nodeid.encode())


@dataclasses.dataclass
class Case:
    seed: int
    q: jax.Array  # [T, N, H]
    k_pages: jax.Array  # [P, B, K, H], q's dtype or float8_e4m3fn
    v_pages: jax.Array  # [P, B, K, H]
    meta: object  # AttentionMetadata (numpy fields)
    query_lens: list[int]
    seq_lens: list[int]
    tables: list[list[int]]
    scale: float
    sliding_window: int | None = None
    logit_softcap: float | None = None
    k_scale: jax.Array | None = None  # [K] f32, fp8 pools only
    v_scale: jax.Array | None = None

    @property
    def options(self) -> dict:
        """The keyword arguments every implementation takes for this case."""
        return dict(scale=self.scale, sliding_window=self.sliding_window, logit_softcap=self.logit_softcap,
                    k_scale=self.k_scale, v_scale=self.v_scale)


def make_case(seed: int, query_lens, seq_lens, *, num_heads=4, num_kv_heads=2, head_dim=64, page_size=16,
              dtype=jnp.float32, fp8=False, pad_tokens=None, pad_reqs=2, spare_pages=5, tail=np.nan,
              sliding_window=None, logit_softcap=None, score_scale=1.0) -> Case:
    """A random ragged batch from `seed`; page rows outside every request's context are `tail`.

    score_scale multiplies the usual H ** -0.5 (larger scores exercise a soft-cap).
    """
    rng = np.random.default_rng(seed)
    N, K, H, B = num_heads, num_kv_heads, head_dim, page_size
    if pad_tokens is None:
        pad_tokens = int(rng.integers(1, 9))
    need = [-(-s // B) for s in seq_lens]
    P = 1 + sum(need) + spare_pages  # page 0 is the null page
    ids = rng.permutation(np.arange(1, P)).tolist()  # random, non-contiguous page tables
    tables, i = [], 0
    for n in need:
        tables.append(ids[i : i + n])
        i += n
    T = sum(query_lens) + pad_tokens
    M = max(need) + 2
    meta = build_metadata(query_lens, seq_lens, tables, page_size=B, num_pages=P, num_tokens=T,
                          num_reqs=len(query_lens) + pad_reqs, max_pages=M)
    live = np.zeros((P, B), bool)  # page rows holding some request's context
    for table, s in zip(tables, seq_lens):
        for pos in range(s):
            live[table[pos // B], pos % B] = True

    def pool(scales):
        x = rng.standard_normal((P, B, K, H)).astype(np.float32)
        if scales is not None:  # stored = fp8(x / scale): values ~ x once read back
            x = np.clip(x / scales[None, None, :, None], -448, 448)
        x[~live] = tail
        return jnp.asarray(x.astype(FP8)) if scales is not None else jnp.asarray(x, dtype)

    k_scale = v_scale = None
    if fp8:
        k_scale = rng.uniform(0.05, 0.5, K).astype(np.float32)
        v_scale = rng.uniform(0.05, 0.5, K).astype(np.float32)
    q = jnp.asarray(rng.standard_normal((T, N, H)), dtype)
    return Case(seed, q, pool(k_scale), pool(v_scale), meta, list(query_lens), list(seq_lens), tables,
                score_scale * float(H) ** -0.5, sliding_window, logit_softcap,
                None if k_scale is None else jnp.asarray(k_scale), None if v_scale is None else jnp.asarray(v_scale))


def read_pool(pages: jax.Array, scales) -> np.ndarray:
    """The pool as float64 values: stored * scale per kv head for fp8 (via ml_dtypes)."""
    x = np.asarray(pages)
    if x.dtype == FP8:
        return x.astype(np.float64) * np.asarray(scales, np.float64)[None, None, :, None]
    return np.asarray(pages.astype(jnp.float32), np.float64)


def oracle(c: Case) -> np.ndarray:
    """Dense attention in float64, request by request: causal, windowed, soft-capped as asked."""
    q = np.asarray(c.q.astype(jnp.float32), np.float64)
    kp, vp = read_pool(c.k_pages, c.k_scale), read_pool(c.v_pages, c.v_scale)
    T, N, H = q.shape
    B, K = kp.shape[1], kp.shape[2]
    out = np.zeros((T, N, H))
    start = 0
    for q_len, s, table in zip(c.query_lens, c.seq_lens, c.tables):
        pos = np.arange(s)
        k = kp[np.asarray(table)[pos // B], pos % B]  # [L, K, H]
        v = vp[np.asarray(table)[pos // B], pos % B]  # [L, K, H]
        qpos = s - q_len + np.arange(q_len)
        seen = pos[None, :] <= qpos[:, None]  # [t, L]
        if c.sliding_window is not None:
            seen &= pos[None, :] > qpos[:, None] - c.sliding_window
        unseen = ~seen.any(0)  # [L] positions no token sees may hold NaN poison: never multiply them
        k[unseen], v[unseen] = 0.0, 0.0
        k, v = np.repeat(k, N // K, axis=1), np.repeat(v, N // K, axis=1)  # [L, N, H]
        qr = q[start : start + q_len]  # [t, N, H]
        logits = np.einsum("tnh,lnh->tnl", qr, k) * c.scale
        if c.logit_softcap is not None:
            logits = c.logit_softcap * np.tanh(logits / c.logit_softcap)
        logits = np.where(seen[:, None, :], logits, -np.inf)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        out[start : start + q_len] = np.einsum("tnl,lnh->tnh", p / p.sum(-1, keepdims=True), v)
        start += q_len
    return out


def run_poisoned(c: Case, *, num_splits=None, kernel="auto", split_size=0) -> np.ndarray:
    """The custom call with its output buffer pre-filled with q, NaN in the padding rows."""
    T, N, H = c.q.shape
    K = c.k_pages.shape[2]
    n_real = sum(c.query_lens)
    poison = c.q.at[n_real:].set(jnp.nan)
    if num_splits is None:
        num_splits = 1 if jax.default_backend() != "gpu" else ffi.choose_num_splits(
            T, c.meta.seq_lens.shape[0], N, K, H, c.meta.block_tables.shape[1] * c.k_pages.shape[1], 132)
    ones = jnp.ones((K,), jnp.float32)
    k_scale = ones if c.k_scale is None else c.k_scale
    v_scale = ones if c.v_scale is None else c.v_scale
    ffi._ffi.require(ffi.TARGET, jax.default_backend())  # registers the handlers (first use)
    call = jax.ffi.ffi_call(
        ffi.TARGET,
        (jax.ShapeDtypeStruct(c.q.shape, c.q.dtype),
         jax.ShapeDtypeStruct((ffi.workspace_elements(num_splits, T, N, H),), jnp.float32)),
        input_output_aliases={0: 0},  # out starts as the poisoned q (rows are read before written)
    )
    attrs = ffi.call_attributes(c.scale, num_splits, kernel, c.sliding_window, c.logit_softcap, split_size)
    out, _ = jax.jit(lambda *a: call(*a, **attrs))(
        poison, c.k_pages, c.v_pages, jnp.asarray(c.meta.block_tables), jnp.asarray(c.meta.seq_lens),
        jnp.asarray(c.meta.query_start_loc), k_scale, v_scale)
    return np.asarray(out.astype(jnp.float32))


def check(c: Case, got: np.ndarray, what: str = "") -> None:
    """Every element written, padding exactly zero, no NaN, within the dtype's tolerance."""
    tag = f"seed={c.seed} {what}".strip()
    n_real = sum(c.query_lens)
    assert not np.isnan(got).any(), f"{tag}: NaN in the output (unwritten poison or a masked NaN row read)"
    assert (got[n_real:] == 0).all(), f"{tag}: padding tokens must be exactly zero"
    want = oracle(c)
    err = np.abs(got - want).max()
    assert err <= TOL[c.q.dtype.type], f"{tag}: max abs error {err:.3g} vs the float64 oracle"


def mixed_batch(seed: int, page_size: int, *, long: bool = False):
    """Random q_len / seq_len pairs: decode, prefill from scratch and chunked prefill, mid-page ends."""
    rng = np.random.default_rng(seed + 1)  # apart from make_case's stream
    B = page_size

    def r(lo, hi):
        return int(rng.integers(lo, hi))

    pairs = [
        (1, 1),  # a sequence's first token
        (1, r(2, 4 * B)),  # decode
        (1, B * r(1, 4)),  # decode ending exactly on a page boundary
        (q := r(2, 2 * B), q),  # prefill from scratch
        (q := r(2, 3 * B), q + r(1, 3 * B)),  # chunked prefill after cached tokens
        (q := r(B, 3 * B), q + B * r(1, 3)),  # a chunk starting on a page boundary
        (r(2, 5), r(5 * B, 8 * B)),  # a few tokens late in a long context
    ]
    if long:
        pairs.append((q := r(150, 300), q + r(0, 400)))
    order = rng.permutation(len(pairs))
    return [pairs[i][0] for i in order], [pairs[i][1] for i in order]


@pytest.fixture
def seed(request) -> int:
    """This test's seed (printed, so a failure's captured output names it)."""
    value = seed_for(request.node.nodeid)
    print(f"seed={value} (set PAGEDJAX_TEST_SEED to rerun with another)")
    return value
