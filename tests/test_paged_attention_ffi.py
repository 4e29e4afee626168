"""The paged-attention custom call against a float64 oracle and the jnp reference.

Dims: T tokens in the flat batch, R requests, M max pages per request, N query heads, K kv heads,
H head dim, P pages, B page size.

Every case draws random inputs from a seeded generator (tests/attention_cases.py; the seed is
printed and named in failure messages): ragged batches mixing decode tokens, prefill from scratch
and chunked prefill after cached tokens, lengths ending mid-page, randomly permuted page tables,
padded tokens and requests. Page rows no request owns hold NaN (a kernel that reads or multiplies
them shows it), and the output buffer starts as a poisoned copy of q (NaN in padding rows) through
input_output_aliases, so every element must be written. Tests marked `gpu` run the same checks on
the CUDA handler, over its kernel families and split-KV counts. Sliding windows, soft-caps and fp8
pages: test_paged_attention_variants.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagedjax import _ffi
from pagedjax.attention import FFI_HEAD_DIMS, ffi, reference
from tests.attention_cases import TOL, Case, check, make_case, mixed_batch, oracle, run_poisoned, seed  # noqa: F401

CONFIGS = [  # dtype, N, K, H, B
    (jnp.float32, 4, 2, 64, 16),
    (jnp.bfloat16, 8, 2, 128, 16),
    (jnp.float16, 4, 4, 80, 16),
    (jnp.bfloat16, 6, 1, 96, 8),
    (jnp.float32, 2, 2, 16, 32),
    (jnp.bfloat16, 4, 2, 256, 16),
]


@pytest.mark.parametrize("dtype,N,K,H,B", CONFIGS)
def test_matches_float64_oracle(seed, dtype, N, K, H, B):
    q_lens, seq_lens = mixed_batch(seed, B)
    c = make_case(seed, q_lens, seq_lens, num_heads=N, num_kv_heads=K, head_dim=H, page_size=B, dtype=dtype)
    got = run_poisoned(c)
    check(c, got)
    np.testing.assert_array_equal(run_poisoned(c), got, err_msg=f"seed={seed}: results differ between runs")


def test_decode_only_and_single_token(seed):
    seq_lens = [1, 16, 17, 33, 100, 2]
    c = make_case(seed, [1] * len(seq_lens), seq_lens, dtype=jnp.bfloat16, pad_tokens=0, pad_reqs=0)
    check(c, run_poisoned(c))
    c = make_case(seed + 1, [1], [1], num_heads=1, num_kv_heads=1, pad_tokens=0, pad_reqs=0)
    check(c, run_poisoned(c))


def test_long_chunk_and_public_entry_point(seed):
    q_lens, seq_lens = mixed_batch(seed, 16, long=True)
    c = make_case(seed, q_lens, seq_lens, dtype=jnp.bfloat16)
    got = ffi.paged_attention_ffi(c.q, c.k_pages, c.v_pages, c.meta, scale=c.scale)
    assert got.shape == c.q.shape and got.dtype == c.q.dtype
    check(c, np.asarray(got.astype(jnp.float32)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matches_jnp_reference(seed, dtype):
    q_lens, seq_lens = mixed_batch(seed, 16)
    c = make_case(seed, q_lens, seq_lens, dtype=dtype, tail=7.0)  # finite garbage: the reference reads it
    want = reference.paged_attention(c.q, c.k_pages, c.v_pages, c.meta, scale=c.scale)
    got = jax.jit(lambda q, k, v: ffi.paged_attention_ffi(q, k, v, c.meta, scale=c.scale))(
        c.q, c.k_pages, c.v_pages)
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)),
                               atol=TOL[dtype], rtol=0, err_msg=f"seed={seed}")


def test_sharded_over_heads_matches_unsharded(seed):
    if len(jax.devices()) < 2:
        pytest.skip("needs 2 devices (the conftest gives 8 fake CPU devices)")
    q_lens, seq_lens = mixed_batch(seed, 16)
    c = make_case(seed, q_lens, seq_lens, num_heads=8, num_kv_heads=2, dtype=jnp.float32)
    mesh = jax.make_mesh((2,), ("tp",), devices=jax.devices()[:2])
    q = jax.device_put(c.q, jax.NamedSharding(mesh, jax.P(None, "tp", None)))
    pages = jax.NamedSharding(mesh, jax.P(None, None, "tp", None))
    k, v = jax.device_put(c.k_pages, pages), jax.device_put(c.v_pages, pages)
    fn = jax.jit(lambda q, k, v: ffi.paged_attention_ffi(q, k, v, c.meta, scale=c.scale, mesh=mesh))
    got = fn(q, k, v)
    hlo = fn.lower(q, k, v).compile().as_text()
    assert "all-gather" not in hlo, "the custom call's inputs were gathered instead of sharded"
    check(c, np.asarray(got))


def test_head_dim_tables_come_from_the_extension():
    """One table in the C++ header; Python reads it (a CPU-only build gives the CUDA one too)."""
    from pagedjax import _kernels

    assert FFI_HEAD_DIMS == tuple(_kernels.head_dims()) == (16, 32, 64, 80, 96, 128, 256)
    assert ffi.TENSOR_CORE_HEAD_DIMS == tuple(_kernels.tensor_core_head_dims()) == (64, 80, 96, 128, 256)
    assert set(ffi.TENSOR_CORE_HEAD_DIMS) <= set(FFI_HEAD_DIMS)
    assert _ffi.head_dims() == FFI_HEAD_DIMS and _ffi.tensor_core_head_dims() == ffi.TENSOR_CORE_HEAD_DIMS


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


def test_bad_shapes_and_dtypes_raise_with_a_message(seed):
    check_bad_shapes_raise(seed)


def check_bad_shapes_raise(seed):
    c = make_case(seed, [2, 1], [5, 20])
    with pytest.raises(Exception, match="head dim 48 is not supported"):
        c48 = make_case(seed, [2, 1], [5, 20], head_dim=48)
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
        bad = make_case(seed, [2, 1], [5, 20], head_dim=H, dtype=dtype)
        with pytest.raises(ValueError, match="no tensor-core kernel"):
            ffi.paged_attention_ffi(bad.q, bad.k_pages, bad.v_pages, bad.meta, scale=bad.scale, kernel="tensor_core")


def test_cpu_handler_has_one_kernel_whatever_the_choice(seed):
    """The `kernel` attribute picks CUDA kernels; the CPU handler has one and gives it the same
    answer for every choice, bit for bit (test_gpu_forced_tensor_core checks the CUDA choice)."""
    if jax.default_backend() != "cpu":
        pytest.skip("CPU handler behaviour")
    q_lens, seq_lens = mixed_batch(seed, 16)
    c = make_case(seed, q_lens, seq_lens, head_dim=128, dtype=jnp.bfloat16)
    auto = run_poisoned(c, kernel="auto")
    check(c, auto)
    for kernel in ("simt", "tensor_core"):
        np.testing.assert_array_equal(run_poisoned(c, kernel=kernel), auto, err_msg=f"seed={seed} {kernel}")


def test_bad_metadata_raises_on_cpu(seed):
    if jax.default_backend() != "cpu":
        pytest.skip("the CUDA handler cannot read device metadata; see test_gpu_bad_metadata_is_nan")
    c = make_case(seed, [2, 1], [5, 20])
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
def test_gpu_matches_float64_oracle(seed, dtype, N, K, H, B, num_splits, kernel):
    if kernel == "tensor_core" and not ffi.has_tensor_core_kernel(dtype, H):
        pytest.skip("no tensor-core kernel for f32 or this head dim (auto runs simt there)")
    q_lens, seq_lens = mixed_batch(seed, B, long=num_splits == 3)
    c = make_case(seed, q_lens, seq_lens, num_heads=N, num_kv_heads=K, head_dim=H, page_size=B, dtype=dtype)
    got = run_poisoned(c, num_splits=num_splits, kernel=kernel)
    check(c, got)
    np.testing.assert_array_equal(run_poisoned(c, num_splits=num_splits, kernel=kernel), got,
                                  err_msg=f"seed={seed}: results differ between runs")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,H", [(jnp.bfloat16, 128), (jnp.float16, 64)])
def test_gpu_forced_tensor_core_runs_where_it_exists(seed, dtype, H):
    """kernel="tensor_core" runs the tensor-core kernels: right answers, and not the SIMT kernel's
    bits (the MMA takes the probabilities rounded to q's dtype, SIMT keeps them in f32)."""
    q_lens, seq_lens = mixed_batch(seed, 16)
    c = make_case(seed, q_lens, seq_lens, head_dim=H, dtype=dtype)
    tc = run_poisoned(c, num_splits=1, kernel="tensor_core")
    check(c, tc, "tensor_core")
    simt = run_poisoned(c, num_splits=1, kernel="simt")
    check(c, simt, "simt")
    assert not np.array_equal(tc, simt), f"seed={seed}: tensor_core gave SIMT's exact bits (was it run?)"
    got = ffi.paged_attention_ffi(c.q, c.k_pages, c.v_pages, c.meta, scale=c.scale, kernel="tensor_core")
    check(c, np.asarray(got.astype(jnp.float32)), "public entry point")


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["auto", "simt"])
@pytest.mark.parametrize("num_splits", [1, 5])
def test_gpu_decode_bucket(seed, num_splits, kernel):
    """T == R (the decode buckets): one kernel serves every request, whatever its q_len."""
    rng = np.random.default_rng(seed)
    seq_lens = [int(x) for x in rng.integers(1, 700, 13)]
    q_lens = [1] * 11 + [2, 3]  # the kernel must still be right for a few multi-token requests
    c = make_case(seed, q_lens, [max(s, 3) for s in seq_lens], num_heads=32, num_kv_heads=8, head_dim=128,
                  dtype=jnp.bfloat16, pad_tokens=0, pad_reqs=3)
    check(c, run_poisoned(c, num_splits=num_splits, kernel=kernel))


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [1, 4])
def test_gpu_long_prefill_chunk(seed, num_splits):
    c = make_case(seed, [1000, 1, 37], [1800, 2000, 37], num_heads=16, num_kv_heads=4, head_dim=128,
                  dtype=jnp.bfloat16)
    check(c, run_poisoned(c, num_splits=num_splits))


@pytest.mark.gpu
def test_gpu_public_entry_point_and_default_splits(seed):
    c = make_case(seed, [1, 1], [3000, 40], num_heads=32, num_kv_heads=8, head_dim=128, dtype=jnp.bfloat16)
    got = jax.jit(lambda q, k, v: ffi.paged_attention_ffi(q, k, v, c.meta, scale=c.scale))(
        c.q, c.k_pages, c.v_pages)
    check(c, np.asarray(got.astype(jnp.float32)))


@pytest.mark.gpu
def test_gpu_bad_shapes_raise_with_a_message(seed):
    check_bad_shapes_raise(seed)
    for dtype, H in ((jnp.bfloat16, 32), (jnp.float32, 128)):
        c = make_case(seed, [2, 1], [5, 20], head_dim=H, dtype=dtype)
        # The handler's own check, past the Python one: the raw custom call, its result read back
        # (a GPU execution error surfaces there, not at dispatch).
        with pytest.raises(Exception, match="no tensor-core kernel"):
            run_poisoned(c, num_splits=1, kernel="tensor_core")


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["simt", "tensor_core"])
def test_gpu_bad_metadata_is_nan(seed, kernel):
    """Out-of-range page ids or lengths never read out of bounds: that request's rows are NaN."""
    c = make_case(seed, [2, 1, 3], [5, 20, 40], head_dim=128, dtype=jnp.bfloat16, pad_tokens=0)
    bt = np.array(c.meta.block_tables)
    bt[1, 1] = 1 << 30
    sl = np.array(c.meta.seq_lens)
    sl[2] = bt.shape[1] * c.k_pages.shape[1] + 5
    out = ffi.paged_attention_call(c.q, c.k_pages, c.v_pages, jnp.asarray(bt), jnp.asarray(sl),
                                   jnp.asarray(c.meta.query_start_loc), scale=c.scale, kernel=kernel)
    out = np.asarray(out.astype(jnp.float32))
    assert np.isnan(out[2]).all() and np.isnan(out[3:6]).all(), f"seed={seed}"
    want = oracle(c)
    assert np.abs(out[:2] - want[:2]).max() <= TOL[jnp.bfloat16], f"seed={seed}"


# ---- batch-invariant calls: a token's output bitwise the same in any batch ----


def _token_in_two_batches(seed: int, beside_opts: dict | None = None, **call_opts) -> tuple[np.ndarray, np.ndarray]:
    """A request of L tokens (Llama-3-8B's heads): its last token's output when the whole prompt
    is one prefill chunk alone, and as a decode row beside a prefill chunk and another decode in a
    padded batch. Returns both [N, H] rows as f32. call_opts go to both calls (kernel, num_splits,
    sliding_window, split_size), beside_opts (if any) on top of them to the second."""
    rng = np.random.default_rng(seed)
    N, K, H, B, L = 32, 8, 128, 16, int(rng.integers(300, 700))
    P = 1 + 3 * (-(-L // B)) + 8
    k_pages = jnp.asarray(rng.standard_normal((P, B, K, H)), jnp.bfloat16)
    v_pages = jnp.asarray(rng.standard_normal((P, B, K, H)), jnp.bfloat16)
    q = jnp.asarray(rng.standard_normal((L, N, H)), jnp.bfloat16)
    M = -(-L // B)
    pages = rng.permutation(np.arange(1, P))
    mine, other, third = pages[:M], pages[M:2 * M], pages[2 * M:3 * M]
    scale = H ** -0.5

    def call(q, tables, seq_lens, qsl, **extra):
        bt = np.zeros((len(tables), M), np.int32)
        for i, t in enumerate(tables):
            bt[i, :len(t)] = t
        out = ffi.paged_attention_call(q, k_pages, v_pages, jnp.asarray(bt), jnp.asarray(seq_lens, jnp.int32),
                                       jnp.asarray(qsl, jnp.int32), scale=scale, **{**call_opts, **extra})
        return np.asarray(out.astype(jnp.float32))

    alone = call(jnp.pad(q, ((0, 16), (0, 0), (0, 0))), [mine], [L], [0, L])[L - 1]
    # beside: a 37-token chunk of another request (context 200), this token as a decode, a decode of 90
    chunk = jnp.asarray(rng.standard_normal((37, N, H)), jnp.bfloat16)
    batch_q = jnp.concatenate([chunk, q[L - 1:], jnp.asarray(rng.standard_normal((1, N, H)), jnp.bfloat16),
                               jnp.zeros((25, N, H), jnp.bfloat16)])
    beside = call(batch_q, [other, mine, third, []], [200, L, 90, 0], [0, 37, 38, 39, 39], **(beside_opts or {}))[37]
    return alone, beside


@pytest.mark.parametrize("seed_offset", [0, 1])
def test_batch_invariant_call_on_cpu(seed, seed_offset):
    """The CPU call computes each token by itself: the same bits in a prefill chunk alone and as a
    decode in a mixed batch (what batch_invariant relies on)."""
    alone, beside = _token_in_two_batches(seed + seed_offset)
    np.testing.assert_array_equal(alone, beside)


@pytest.mark.parametrize("kernel", ["invariant", "invariant16"])
@pytest.mark.parametrize("window", [None, 113])
def test_invariant_kernel_on_cpu(seed, window, kernel):
    """kernel="invariant" / "invariant16" is accepted by the CPU handler (which computes each token
    by itself) with the same numbers as the default, and a split count beside it is refused."""
    opts = dict(sliding_window=window)
    alone, beside = _token_in_two_batches(seed, kernel=kernel, **opts)
    np.testing.assert_array_equal(alone, beside)
    np.testing.assert_array_equal(alone, _token_in_two_batches(seed, **opts)[0])
    with pytest.raises(ValueError, match="unsplit"):
        _token_in_two_batches(seed, kernel=kernel, num_splits=2)


@pytest.mark.parametrize("kernel", ["invariant", "invariant16"])
def test_fixed_split_size_on_cpu_and_its_refusals(seed, kernel):
    """split_size (the invariant kernels' fixed split size) is accepted by the CPU handler, which
    computes each token unsplit: the same bits as without it. Misuse is refused by name: another
    kernel, a size that is no multiple of 64, queries without a tensor-core kernel (f32), and a
    grid of splits below what a request may need."""
    alone, beside = _token_in_two_batches(seed, kernel=kernel, split_size=128)
    np.testing.assert_array_equal(alone, beside)
    np.testing.assert_array_equal(alone, _token_in_two_batches(seed, kernel=kernel)[0])
    with pytest.raises(ValueError, match="split_size is for the kernels"):
        _token_in_two_batches(seed, kernel="tensor_core", split_size=128)
    with pytest.raises(ValueError, match="positive multiple of 64"):
        _token_in_two_batches(seed, kernel=kernel, split_size=100)
    with pytest.raises(ValueError, match="needs num_splits 1"):
        _token_in_two_batches(seed, kernel=kernel, split_size=64, num_splits=2)
    c = make_case(seed, [3, 1], [40, 17], head_dim=64, dtype=jnp.float32)
    with pytest.raises(ValueError, match="tensor-core kernels only"):
        ffi.paged_attention_call(c.q, c.k_pages, c.v_pages, jnp.asarray(c.meta.block_tables),
                                 jnp.asarray(c.meta.seq_lens), jnp.asarray(c.meta.query_start_loc), scale=c.scale,
                                 kernel=kernel, split_size=64)


@pytest.mark.parametrize("window", [None, 5, 100])
def test_fixed_split_bound_covers_every_request(window):
    """fixed_split_bound against the splits each possible request has (every query length and
    context a call of T tokens and this block table allows; a request's splits run from the
    multiple of the size at or below its first token's window start to its last position): never
    below any of them, and without a window equal to the largest."""
    size, T, context = 64, 40, 300
    most = 0
    for seq_len in range(1, context + 1):
        for q_len in range(1, min(T, seq_len) + 1):
            first = seq_len - q_len
            base = (max(0, first - window + 1) if window else 0) // size * size
            most = max(most, -(-(seq_len - base) // size))
    bound = ffi.fixed_split_bound(size, context, T, window)
    assert bound >= most
    if window is None:
        assert bound == most


def test_choose_fixed_splits():
    """One CTA per split only where the unsplit grid leaves SMs idle, within the handler's cap
    and the workspace budget; busy grids (many decodes, a prefill chunk) fold."""
    assert ffi.choose_fixed_splits(8, 8, 32, 8, 128, 16, 132) == 16  # 64 CTAs: split
    assert ffi.choose_fixed_splits(2, 1, 32, 8, 128, 8, 132) == 8  # one request in a 2-token bucket: split
    assert ffi.choose_fixed_splits(256, 256, 32, 8, 128, 16, 132) == 1  # 2048 CTAs: fold
    assert ffi.choose_fixed_splits(2048, 256, 32, 8, 128, 16, 132) == 1  # a prefill chunk: fold
    assert ffi.choose_fixed_splits(8, 8, 32, 8, 128, 1, 132) == 1  # one split: nothing to spread
    assert ffi.choose_fixed_splits(8, 8, 32, 8, 128, 300, 132) == 1  # past the handler's 256
    assert ffi.choose_fixed_splits(200, 256, 64, 1, 256, 200, 132) == 1  # workspace over budget


@pytest.mark.parametrize("choice,kernel", [(None, 4), ("simt", 1), ("tensor_core", 3), ("tensor_core16", 4)])
def test_batch_invariant_attention_kernel_from_the_environment(seed, monkeypatch, choice, kernel):
    """attention.paged_attention(batch_invariant=True) lowers to one unsplit custom call whose
    kernel PAGEDJAX_BATCH_INVARIANT_ATTENTION chooses ("invariant16" unset); another value is refused
    by name, and by the engine's config at start-up."""
    import re

    from pagedjax import attention
    from pagedjax.dummy_weights import random_params
    from pagedjax.engine import EngineConfig
    from pagedjax.models.named import NAMED_CONFIGS

    monkeypatch.delenv(attention.INVARIANT_SPLIT_ENV, raising=False)  # unsplit
    if choice is None:
        monkeypatch.delenv(attention.INVARIANT_ATTENTION_ENV, raising=False)
    else:
        monkeypatch.setenv(attention.INVARIANT_ATTENTION_ENV, choice)
    c = make_case(seed, [3, 1], [40, 17], head_dim=64, dtype=jnp.bfloat16)
    def lower():  # a fresh trace each time: the variable is read when the call is traced
        return jax.jit(lambda q: attention.paged_attention(q, c.k_pages, c.v_pages, c.meta, scale=c.scale,
                                                           impl="ffi", batch_invariant=True)).lower(c.q)

    text = lower().as_text()
    assert re.findall(r"kernel = (\d+) : i32", text) == [str(kernel)], text[-2000:]
    assert re.findall(r"num_splits = (\d+) : i32", text) == ["1"]
    # the engine reads the variable once, into ModelConfig.invariant_attention; the call then follows
    # the config's choice whatever the variable says when it is traced
    cfg = EngineConfig(batch_invariant=True, tensor_parallel_size=1).model_config(NAMED_CONFIGS["tiny-llama"])
    assert cfg.invariant_attention == (choice or attention.DEFAULT_INVARIANT_ATTENTION) == (choice or "tensor_core16")
    assert EngineConfig().model_config(NAMED_CONFIGS["tiny-llama"]).invariant_attention is None
    other = "tensor_core" if cfg.invariant_attention == "simt" else "simt"
    monkeypatch.setenv(attention.INVARIANT_ATTENTION_ENV, other)
    text = jax.jit(lambda q: attention.paged_attention(
        q, c.k_pages, c.v_pages, c.meta, scale=c.scale, impl="ffi", batch_invariant=True,
        invariant_attention=cfg.invariant_attention)).lower(c.q).as_text()
    assert re.findall(r"kernel = (\d+) : i32", text) == [str(kernel)]
    monkeypatch.setenv(attention.INVARIANT_ATTENTION_ENV, "flash")
    with pytest.raises(ValueError, match=attention.INVARIANT_ATTENTION_ENV):
        lower()
    with pytest.raises(ValueError, match=attention.INVARIANT_ATTENTION_ENV):
        EngineConfig(batch_invariant=True).resolve(random_params(NAMED_CONFIGS["tiny-llama"]))


def test_batch_invariant_split_size_from_the_environment(seed, monkeypatch):
    """attention.paged_attention(batch_invariant=True) passes the fixed split size
    PAGEDJAX_BATCH_INVARIANT_SPLIT names (attention.DEFAULT_INVARIANT_SPLIT unset) to the
    tensor-core invariant kernels, and 0 where SIMT runs (f32 queries, kernel "simt"); the engine
    reads it once into ModelConfig.invariant_split; a bad value is refused by name."""
    import re

    from pagedjax import attention
    from pagedjax.dummy_weights import random_params
    from pagedjax.engine import EngineConfig
    from pagedjax.models.named import NAMED_CONFIGS

    def split_attr(dtype=jnp.bfloat16, **opts) -> list[str]:
        c = make_case(seed, [3, 1], [40, 17], head_dim=64, dtype=dtype)
        text = jax.jit(lambda q: attention.paged_attention(q, c.k_pages, c.v_pages, c.meta, scale=c.scale,
                                                           impl="ffi", batch_invariant=True, **opts)).lower(c.q)
        return re.findall(r"split_size = (\d+) : i32", text.as_text())

    monkeypatch.delenv(attention.INVARIANT_SPLIT_ENV, raising=False)
    monkeypatch.delenv(attention.INVARIANT_ATTENTION_ENV, raising=False)
    assert split_attr() == [str(attention.DEFAULT_INVARIANT_SPLIT)]
    monkeypatch.setenv(attention.INVARIANT_SPLIT_ENV, "256")
    assert split_attr() == ["256"]
    assert split_attr(invariant_split=512) == ["512"]  # the engine's choice wins
    assert split_attr(invariant_attention="tensor_core16") == ["256"]
    assert split_attr(invariant_attention="simt") == ["0"]
    assert split_attr(dtype=jnp.float32) == ["0"]
    cfg = EngineConfig(batch_invariant=True, tensor_parallel_size=1).model_config(NAMED_CONFIGS["tiny-llama"])
    assert cfg.invariant_split == 256
    assert EngineConfig().model_config(NAMED_CONFIGS["tiny-llama"]).invariant_split is None
    for bad in ("100", "-64", "big"):
        monkeypatch.setenv(attention.INVARIANT_SPLIT_ENV, bad)
        with pytest.raises(ValueError, match=attention.INVARIANT_SPLIT_ENV):
            split_attr()
        with pytest.raises(ValueError, match=attention.INVARIANT_SPLIT_ENV):
            EngineConfig(batch_invariant=True).resolve(random_params(NAMED_CONFIGS["tiny-llama"]))


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["invariant", "invariant16"])
@pytest.mark.parametrize("window", [None, 113])
def test_gpu_fixed_split_size_batch_invariant_call(seed, kernel, window):
    """A fixed split size (64) on the invariant kernels: a token's bits alone in a prefill chunk
    (one CTA folding its splits) and as a decode beside others with one CTA per split (a grid of
    32 splits, merged after) are the same."""
    for s in range(seed, seed + 3):
        alone, beside = _token_in_two_batches(s, beside_opts=dict(num_splits=32), kernel=kernel, split_size=64,
                                              sliding_window=window)
        np.testing.assert_array_equal(alone, beside, err_msg=f"seed={s}")


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["simt", "invariant", "invariant16"])
@pytest.mark.parametrize("window", [None, 113])
def test_gpu_batch_invariant_call(seed, kernel, window):
    """kernel="invariant" / "invariant16" (what batch_invariant=True runs) and "simt", unsplit: the same bits for a
    token in a prefill chunk alone and as a decode in a mixed batch, with and without a sliding
    window (whose start is no multiple of the K/V tile). The default choice (decode tiles, split by
    the batch's shape) gives other bits for some of the seeds, so the check can fail."""
    differ = 0
    for s in range(seed, seed + 3):
        alone, beside = _token_in_two_batches(s, kernel=kernel, num_splits=1, sliding_window=window)
        np.testing.assert_array_equal(alone, beside, err_msg=f"seed={s}")
        differ += not np.array_equal(*_token_in_two_batches(s, sliding_window=window))
    assert differ, "the default kernels agreed bitwise on every seed: this check cannot tell"

