"""The paged-attention custom call against a float64 oracle and the jnp reference.

Dims: T tokens in the flat batch, R requests, M max pages per request, N query heads, K kv heads,
H head dim, P pages, B page size.

Every case draws fresh random inputs: ragged batches mixing decode tokens, prefill from scratch and
chunked prefill after cached tokens, lengths ending mid-page, randomly permuted page tables, padded
tokens and requests. Page rows no request owns hold NaN (a kernel that reads or multiplies them
shows it), and the output buffer starts as a poisoned copy of q (NaN in padding rows) through
input_output_aliases, so every element must be written. Tests marked `gpu` run the same checks on
the CUDA handler, over its kernel families and split-KV counts.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagedjax.attention import ffi
from pagedjax.attention import reference
from pagedjax.attention.metadata import build_metadata

TOL = {jnp.float32: 2e-5, jnp.float16: 4e-3, jnp.bfloat16: 2.5e-2}  # abs, on outputs of size ~1


@dataclasses.dataclass
class Case:
    q: jax.Array  # [T, N, H]
    k_pages: jax.Array  # [P, B, K, H]
    v_pages: jax.Array  # [P, B, K, H]
    meta: object  # AttentionMetadata (numpy fields)
    query_lens: list[int]
    seq_lens: list[int]
    tables: list[list[int]]
    scale: float


def make_case(rng: np.random.Generator, query_lens, seq_lens, *, num_heads=4, num_kv_heads=2, head_dim=64,
              page_size=16, dtype=jnp.float32, pad_tokens=None, pad_reqs=2, spare_pages=5, tail=np.nan) -> Case:
    """A random ragged batch; page rows outside every request's context are `tail`."""
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

    def pool():
        x = rng.standard_normal((P, B, K, H)).astype(np.float32)
        x[~live] = tail
        return jnp.asarray(x, dtype)

    q = jnp.asarray(rng.standard_normal((T, N, H)), dtype)
    return Case(q, pool(), pool(), meta, list(query_lens), list(seq_lens), tables, float(H) ** -0.5)


def oracle(c: Case) -> np.ndarray:
    """Dense causal attention in float64, request by request."""
    q = np.asarray(c.q.astype(jnp.float32), np.float64)
    kp = np.asarray(c.k_pages.astype(jnp.float32), np.float64)
    vp = np.asarray(c.v_pages.astype(jnp.float32), np.float64)
    T, N, H = q.shape
    B, K = kp.shape[1], kp.shape[2]
    out = np.zeros((T, N, H))
    start = 0
    for q_len, s, table in zip(c.query_lens, c.seq_lens, c.tables):
        pos = np.arange(s)
        k = kp[np.asarray(table)[pos // B], pos % B]  # [L, K, H]
        v = vp[np.asarray(table)[pos // B], pos % B]  # [L, K, H]
        k, v = np.repeat(k, N // K, axis=1), np.repeat(v, N // K, axis=1)  # [L, N, H]
        qr = q[start : start + q_len]  # [t, N, H]
        logits = np.einsum("tnh,lnh->tnl", qr, k) * c.scale
        qpos = s - q_len + np.arange(q_len)
        logits = np.where(pos[None, None, :] <= qpos[:, None, None], logits, -np.inf)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        out[start : start + q_len] = np.einsum("tnl,lnh->tnh", p / p.sum(-1, keepdims=True), v)
        start += q_len
    return out


def run_poisoned(c: Case, *, num_splits=None, kernel="auto") -> np.ndarray:
    """The custom call with its output buffer pre-filled with q, NaN in the padding rows."""
    T, N, H = c.q.shape
    n_real = sum(c.query_lens)
    poison = c.q.at[n_real:].set(jnp.nan)
    if num_splits is None:
        num_splits = 1 if jax.default_backend() != "gpu" else ffi.choose_num_splits(
            T, c.meta.seq_lens.shape[0], N, c.k_pages.shape[2], H,
            c.meta.block_tables.shape[1] * c.k_pages.shape[1], 132)
    call = jax.ffi.ffi_call(
        ffi.TARGET,
        (jax.ShapeDtypeStruct(c.q.shape, c.q.dtype),
         jax.ShapeDtypeStruct((ffi.workspace_elements(num_splits, T, N, H),), jnp.float32)),
        input_output_aliases={0: 0},  # out starts as the poisoned q (rows are read before written)
    )
    out, _ = jax.jit(lambda *a: call(*a, scale=np.float32(c.scale), num_splits=np.int32(num_splits),
                                     kernel=np.int32(ffi.KERNELS[kernel])))(
        poison, c.k_pages, c.v_pages, jnp.asarray(c.meta.block_tables), jnp.asarray(c.meta.seq_lens),
        jnp.asarray(c.meta.query_start_loc))
    return np.asarray(out.astype(jnp.float32))


def check(c: Case, got: np.ndarray) -> None:
    """Every element written, padding exactly zero, no NaN, within the dtype's tolerance."""
    n_real = sum(c.query_lens)
    assert not np.isnan(got).any(), "NaN in the output (unwritten poison or a masked NaN row read)"
    assert (got[n_real:] == 0).all(), "padding tokens must be exactly zero"
    want = oracle(c)
    err = np.abs(got - want).max()
    assert err <= TOL[c.q.dtype.type], f"max abs error {err:.3g} vs float64 oracle"


def mixed_batch(rng: np.random.Generator, page_size: int, *, long: bool = False):
    """Random q_len / seq_len pairs: decode, prefill from scratch and chunked prefill, mid-page ends."""
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


CONFIGS = [  # dtype, N, K, H, B
    (jnp.float32, 4, 2, 64, 16),
    (jnp.bfloat16, 8, 2, 128, 16),
    (jnp.float16, 4, 4, 80, 16),
    (jnp.bfloat16, 6, 1, 96, 8),
    (jnp.float32, 2, 2, 16, 32),
    (jnp.bfloat16, 4, 2, 256, 16),
]


@pytest.mark.parametrize("dtype,N,K,H,B", CONFIGS)
def test_matches_float64_oracle(dtype, N, K, H, B):
    rng = np.random.default_rng()
    q_lens, seq_lens = mixed_batch(rng, B)
    c = make_case(rng, q_lens, seq_lens, num_heads=N, num_kv_heads=K, head_dim=H, page_size=B, dtype=dtype)
    got = run_poisoned(c)
    check(c, got)
    np.testing.assert_array_equal(run_poisoned(c), got, err_msg="results differ between runs")


def test_decode_only_and_single_token():
    rng = np.random.default_rng()
    seq_lens = [1, 16, 17, 33, 100, 2]
    c = make_case(rng, [1] * len(seq_lens), seq_lens, dtype=jnp.bfloat16, pad_tokens=0, pad_reqs=0)
    check(c, run_poisoned(c))
    c = make_case(rng, [1], [1], num_heads=1, num_kv_heads=1, pad_tokens=0, pad_reqs=0)
    check(c, run_poisoned(c))


def test_long_chunk_and_public_entry_point():
    rng = np.random.default_rng()
    q_lens, seq_lens = mixed_batch(rng, 16, long=True)
    c = make_case(rng, q_lens, seq_lens, dtype=jnp.bfloat16)
    got = ffi.paged_attention_ffi(c.q, c.k_pages, c.v_pages, c.meta, scale=c.scale)
    assert got.shape == c.q.shape and got.dtype == c.q.dtype
    check(c, np.asarray(got.astype(jnp.float32)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matches_jnp_reference(dtype):
    rng = np.random.default_rng()
    q_lens, seq_lens = mixed_batch(rng, 16)
    c = make_case(rng, q_lens, seq_lens, dtype=dtype, tail=7.0)  # finite garbage: the reference reads it
    want = reference.paged_attention(c.q, c.k_pages, c.v_pages, c.meta, scale=c.scale)
    got = jax.jit(lambda q, k, v: ffi.paged_attention_ffi(q, k, v, c.meta, scale=c.scale))(
        c.q, c.k_pages, c.v_pages)
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)),
                               atol=TOL[dtype], rtol=0)


def test_sharded_over_heads_matches_unsharded():
    if len(jax.devices()) < 2:
        pytest.skip("needs 2 devices (the conftest gives 8 fake CPU devices)")
    rng = np.random.default_rng()
    q_lens, seq_lens = mixed_batch(rng, 16)
    c = make_case(rng, q_lens, seq_lens, num_heads=8, num_kv_heads=2, dtype=jnp.float32)
    mesh = jax.make_mesh((2,), ("tp",), devices=jax.devices()[:2])
    q = jax.device_put(c.q, jax.NamedSharding(mesh, jax.P(None, "tp", None)))
    pages = jax.NamedSharding(mesh, jax.P(None, None, "tp", None))
    k, v = jax.device_put(c.k_pages, pages), jax.device_put(c.v_pages, pages)
    fn = jax.jit(lambda q, k, v: ffi.paged_attention_ffi(q, k, v, c.meta, scale=c.scale, mesh=mesh))
    got = fn(q, k, v)
    hlo = fn.lower(q, k, v).compile().as_text()
    assert "all-gather" not in hlo, "the custom call's inputs were gathered instead of sharded"
    check(c, np.asarray(got))


def test_num_splits_from_static_shapes():
    sms = 132
    assert ffi.choose_num_splits(4096, 4096, 32, 8, 128, 8192, sms) == 1  # tens of waves of CTAs
    assert ffi.choose_num_splits(4096, 8, 32, 8, 128, 8192, sms) == 1  # prefill: many query tiles
    one = ffi.choose_num_splits(1, 1, 32, 8, 128, 32768, sms)
    assert 8 <= one <= ffi.MAX_SPLITS  # one long sequence: split its context
    assert ffi.choose_num_splits(1, 1, 32, 8, 128, 512, sms) == 1  # too short to split
    for T in (8, 500, 2000):  # the partials stay within budget (with 2000 tokens, one split is all that fits)
        s = ffi.choose_num_splits(T, 1, 128, 1, 256, 1 << 20, sms)
        assert s == 1 or ffi.workspace_elements(s, T, 128, 256) * 4 <= ffi.WORKSPACE_BUDGET_BYTES
    assert ffi.choose_num_splits(2000, 1, 128, 1, 256, 1 << 20, sms) == 1
    assert ffi.workspace_elements(1, 8192, 64, 256) == 1
    for R in (1, 8, 32, 64, 256):  # decode, the model: within its caps
        for C in (2048, 32768):
            s = ffi.choose_num_splits(R, R, 32, 8, 128, C, sms, measured=False)
            assert 1 <= s <= min(ffi.MAX_SPLITS, C // ffi.MIN_SPLIT_POSITIONS)
    # Fewer CTAs than SMs over a long context: the model splits them past one per SM.
    assert ffi.choose_num_splits(8, 8, 32, 8, 128, 32768, sms, measured=False) * 8 * 8 >= sms


def test_num_splits_from_a_measured_table(monkeypatch):
    """The sweep's table decides decode splits near measured shapes (CTAs = requests x kv heads)."""
    table = {(256, 2048): 3, (256, 32768): 2, (1024, 2048): 5, (64, 8192): 40}
    monkeypatch.setattr(ffi, "MEASURED_DECODE_SPLITS", table)
    sms = 132
    assert ffi.choose_num_splits(32, 32, 32, 8, 128, 4096, sms) == 3  # nearest: (256, 2048)
    assert ffi.choose_num_splits(32, 32, 32, 8, 128, 16384, sms) == 2  # nearest: (256, 32768)
    assert ffi.choose_num_splits(64, 64, 64, 16, 128, 2048, sms) == 5  # 1024 CTAs from 16 kv heads
    assert ffi.choose_num_splits(8, 8, 32, 8, 128, 8192, sms) == ffi.MAX_SPLITS  # clamped to the cap
    for shape in [(1, 1, 32, 8, 128, 32768),  # 8 CTAs: far below the measured range
                  (32, 32, 32, 8, 64, 2048),  # another head dim
                  (64, 32, 32, 8, 128, 2048)]:  # prefill tokens (T > R)
        want = ffi.choose_num_splits(*shape, sms, measured=False)
        assert ffi.choose_num_splits(*shape, sms) == want, shape
    assert ffi.choose_num_splits(1, 1, 32, 8, 128, 32768, sms) != 2  # i.e. not the table's nearest


def _call(c: Case, **overrides):
    args = dict(q=c.q, k=c.k_pages, v=c.v_pages, bt=jnp.asarray(c.meta.block_tables),
                sl=jnp.asarray(c.meta.seq_lens), qsl=jnp.asarray(c.meta.query_start_loc))
    args.update(overrides)
    out = ffi.paged_attention_call(args["q"], args["k"], args["v"], args["bt"], args["sl"], args["qsl"],
                                   scale=c.scale)
    return np.asarray(out.astype(jnp.float32))


def test_bad_shapes_and_dtypes_raise_with_a_message():
    check_bad_shapes_raise()


def check_bad_shapes_raise():
    rng = np.random.default_rng()
    c = make_case(rng, [2, 1], [5, 20])
    with pytest.raises(Exception, match="head dim 48 is not supported"):
        c48 = make_case(rng, [2, 1], [5, 20], head_dim=48)
        _call(c48)
    with pytest.raises(Exception, match="must share a dtype"):
        _call(c, k=c.k_pages.astype(jnp.bfloat16), v=c.v_pages.astype(jnp.bfloat16))
    with pytest.raises(Exception, match="must be int32"):
        _call(c, bt=jnp.asarray(c.meta.block_tables, jnp.int16))
    with pytest.raises(Exception, match="multiple of kv heads"):
        _call(c, q=jnp.zeros((c.q.shape[0], 3, c.q.shape[2]), c.q.dtype))
    with pytest.raises(Exception, match="query_start_loc must be"):
        _call(c, qsl=jnp.asarray(c.meta.query_start_loc)[:-1])
    for dtype, H in ((jnp.bfloat16, 32), (jnp.float32, 128)):  # refused in Python, on every backend
        bad = make_case(rng, [2, 1], [5, 20], head_dim=H, dtype=dtype)
        with pytest.raises(ValueError, match="no tensor-core kernel"):
            ffi.paged_attention_ffi(bad.q, bad.k_pages, bad.v_pages, bad.meta, scale=bad.scale, kernel="tensor_core")


@pytest.mark.parametrize("dtype,H", [(jnp.bfloat16, 128), (jnp.float16, 64)])
def test_forced_tensor_core_runs_where_it_exists(dtype, H):
    rng = np.random.default_rng()
    q_lens, seq_lens = mixed_batch(rng, 16)
    c = make_case(rng, q_lens, seq_lens, head_dim=H, dtype=dtype)
    got = ffi.paged_attention_ffi(c.q, c.k_pages, c.v_pages, c.meta, scale=c.scale, kernel="tensor_core")
    check(c, np.asarray(got.astype(jnp.float32)))


def test_bad_metadata_raises_on_cpu():
    if jax.default_backend() != "cpu":
        pytest.skip("the CUDA handler cannot read device metadata; see test_gpu_bad_metadata_is_nan")
    rng = np.random.default_rng()
    c = make_case(rng, [2, 1], [5, 20])
    bt = np.array(c.meta.block_tables)
    bt[1, 1] = c.k_pages.shape[0]  # one past the last page
    with pytest.raises(Exception, match=r"block_tables\[1, 1\] = .* is not a page id"):
        _call(c, bt=jnp.asarray(bt))
    sl = np.array(c.meta.seq_lens)
    sl[0] = bt.shape[1] * c.k_pages.shape[1] + 1
    with pytest.raises(Exception, match=r"seq_lens\[0\] = .* is outside"):
        _call(c, sl=jnp.asarray(sl))
    sl[0] = 1  # 2 query tokens, 1 position
    with pytest.raises(Exception, match="query tokens but seq_len"):
        _call(c, sl=jnp.asarray(sl))


# ---- the CUDA handler (run with PAGEDJAX_TEST_GPU=1 on a GPU machine) ----

GPU_CONFIGS = CONFIGS + [(jnp.float16, 8, 2, 128, 16), (jnp.bfloat16, 32, 8, 128, 16),
                         (jnp.bfloat16, 64, 2, 64, 16), (jnp.bfloat16, 8, 8, 32, 16)]


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["simt", "tensor_core"])  # "auto" picks one of these
@pytest.mark.parametrize("num_splits", [1, 3, 8])
@pytest.mark.parametrize("dtype,N,K,H,B", GPU_CONFIGS)
def test_gpu_matches_float64_oracle(dtype, N, K, H, B, num_splits, kernel):
    if kernel == "tensor_core" and (dtype == jnp.float32 or H not in (64, 80, 96, 128, 256)):
        pytest.skip("no tensor-core kernel for f32 or this head dim (auto runs simt there)")
    rng = np.random.default_rng()
    q_lens, seq_lens = mixed_batch(rng, B, long=num_splits == 3)
    c = make_case(rng, q_lens, seq_lens, num_heads=N, num_kv_heads=K, head_dim=H, page_size=B, dtype=dtype)
    got = run_poisoned(c, num_splits=num_splits, kernel=kernel)
    check(c, got)
    np.testing.assert_array_equal(run_poisoned(c, num_splits=num_splits, kernel=kernel), got)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["auto", "simt"])
@pytest.mark.parametrize("num_splits", [1, 5])
def test_gpu_decode_bucket(num_splits, kernel):
    """T == R (the decode buckets): one kernel serves every request, whatever its q_len."""
    rng = np.random.default_rng()
    seq_lens = [int(x) for x in rng.integers(1, 700, 13)]
    q_lens = [1] * 11 + [2, 3]  # the kernel must still be right for a few multi-token requests
    c = make_case(rng, q_lens, [max(s, 3) for s in seq_lens], num_heads=32, num_kv_heads=8, head_dim=128,
                  dtype=jnp.bfloat16, pad_tokens=0, pad_reqs=3)
    check(c, run_poisoned(c, num_splits=num_splits, kernel=kernel))


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [1, 4])
def test_gpu_long_prefill_chunk(num_splits):
    rng = np.random.default_rng()
    c = make_case(rng, [1000, 1, 37], [1800, 2000, 37], num_heads=16, num_kv_heads=4, head_dim=128,
                  dtype=jnp.bfloat16)
    check(c, run_poisoned(c, num_splits=num_splits))


@pytest.mark.gpu
def test_gpu_public_entry_point_and_default_splits():
    rng = np.random.default_rng()
    c = make_case(rng, [1, 1], [3000, 40], num_heads=32, num_kv_heads=8, head_dim=128, dtype=jnp.bfloat16)
    got = jax.jit(lambda q, k, v: ffi.paged_attention_ffi(q, k, v, c.meta, scale=c.scale))(
        c.q, c.k_pages, c.v_pages)
    check(c, np.asarray(got.astype(jnp.float32)))


@pytest.mark.gpu
def test_gpu_bad_shapes_raise_with_a_message():
    check_bad_shapes_raise()
    rng = np.random.default_rng()
    for dtype, H in ((jnp.bfloat16, 32), (jnp.float32, 128)):
        c = make_case(rng, [2, 1], [5, 20], head_dim=H, dtype=dtype)
        # The handler's own check, past the Python one: the raw custom call, its result read back
        # (a GPU execution error surfaces there, not at dispatch).
        with pytest.raises(Exception, match="no tensor-core kernel"):
            run_poisoned(c, num_splits=1, kernel="tensor_core")


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["simt", "tensor_core"])
def test_gpu_bad_metadata_is_nan(kernel):
    """Out-of-range page ids or lengths never read out of bounds: that request's rows are NaN."""
    rng = np.random.default_rng()
    c = make_case(rng, [2, 1, 3], [5, 20, 40], head_dim=128, dtype=jnp.bfloat16, pad_tokens=0)
    bt = np.array(c.meta.block_tables)
    bt[1, 1] = 1 << 30
    sl = np.array(c.meta.seq_lens)
    sl[2] = bt.shape[1] * c.k_pages.shape[1] + 5
    out = ffi.paged_attention_call(c.q, c.k_pages, c.v_pages, jnp.asarray(bt), jnp.asarray(sl),
                                   jnp.asarray(c.meta.query_start_loc), scale=c.scale, kernel=kernel)
    out = np.asarray(out.astype(jnp.float32))
    assert np.isnan(out[2]).all() and np.isnan(out[3:6]).all()
    want = oracle(c)
    assert np.abs(out[:2] - want[:2]).max() <= TOL[jnp.bfloat16]
