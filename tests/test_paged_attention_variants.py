"""Sliding windows, logit soft-caps and fp8 pages in the paged-attention custom call.

Dims: T tokens in the flat batch, R requests, N query heads, K kv heads, H head dim, B page size.

The CPU handler (and, marked `gpu`, the CUDA handler's SIMT and tensor-core kernels with split-KV
on and off) against the float64 oracle of tests/attention_cases.py, with poisoned outputs and NaN
in page rows no request owns. Positions before the first window start of each request also hold
NaN where a test says so: a kernel that reads them (instead of skipping them) writes NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagedjax import attention
from pagedjax.attention import ffi, reference
from tests.attention_cases import TOL, Case, check, make_case, mixed_batch, run_poisoned, seed  # noqa: F401

# dtype, N, K, H, B, sliding_window, logit_softcap, fp8 pages
VARIANTS = [
    (jnp.float32, 4, 2, 64, 16, 7, None, False),
    (jnp.bfloat16, 8, 2, 128, 16, 40, 5.0, False),
    (jnp.float16, 4, 4, 80, 16, None, 3.0, False),
    (jnp.bfloat16, 6, 1, 96, 8, 1, None, True),
    (jnp.float32, 2, 2, 16, 32, 20, 5.0, True),
    (jnp.bfloat16, 4, 2, 256, 16, 33, 30.0, True),
    (jnp.float16, 8, 2, 64, 16, 16, None, True),
    (jnp.float32, 4, 1, 32, 16, None, None, True),
]
IDS = [f"{jnp.dtype(v[0]).name}-N{v[1]}K{v[2]}H{v[3]}B{v[4]}-w{v[5]}-cap{v[6]}-{'fp8' if v[7] else 'same'}"
       for v in VARIANTS]


def variant_case(seed, dtype, N, K, H, B, window, cap, fp8, *, long=False, **kw) -> Case:
    q_lens, seq_lens = mixed_batch(seed, B, long=long)
    return make_case(seed, q_lens, seq_lens, num_heads=N, num_kv_heads=K, head_dim=H, page_size=B, dtype=dtype,
                     fp8=fp8, sliding_window=window, logit_softcap=cap, score_scale=4.0 if cap else 1.0, **kw)


def poison_before_windows(c: Case) -> Case:
    """NaN in every position no token of its request sees (before the first token's window)."""
    if c.sliding_window is None:
        return c
    k, v = np.array(c.k_pages), np.array(c.v_pages)
    B = k.shape[1]
    for q_len, s, table in zip(c.query_lens, c.seq_lens, c.tables):
        for pos in range(max(0, s - q_len - c.sliding_window + 1)):
            k[table[pos // B], pos % B] = np.nan
            v[table[pos // B], pos % B] = np.nan
    c.k_pages, c.v_pages = jnp.asarray(k), jnp.asarray(v)
    return c


@pytest.mark.parametrize("dtype,N,K,H,B,window,cap,fp8", VARIANTS, ids=IDS)
def test_matches_float64_oracle(seed, dtype, N, K, H, B, window, cap, fp8):
    c = poison_before_windows(variant_case(seed, dtype, N, K, H, B, window, cap, fp8))
    got = run_poisoned(c)
    check(c, got)
    np.testing.assert_array_equal(run_poisoned(c), got, err_msg=f"seed={seed}: results differ between runs")


@pytest.mark.parametrize("dtype,N,K,H,B,window,cap,fp8", [VARIANTS[1], VARIANTS[4], VARIANTS[5]],
                         ids=[IDS[1], IDS[4], IDS[5]])
def test_public_entry_point_matches_jnp_reference(seed, dtype, N, K, H, B, window, cap, fp8):
    """impl="auto" takes the custom call (window, cap and fp8 pages included) and agrees with impl="reference"."""
    assert attention.resolve_impl("auto", head_dim=H, kv_dtype=jnp.float8_e4m3fn if fp8 else dtype) == "ffi"
    c = variant_case(seed, dtype, N, K, H, B, window, cap, fp8, long=True, tail=7.0)  # finite garbage
    run = lambda impl: jax.jit(lambda q, k, v: attention.paged_attention(q, k, v, c.meta, impl=impl, **c.options))(
        c.q, c.k_pages, c.v_pages)
    got, want = run("auto"), run("reference")
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)),
                               atol=TOL[dtype], rtol=0, err_msg=f"seed={seed}")
    check(c, np.asarray(got.astype(jnp.float32)), "custom call")


def test_a_window_past_every_context_changes_nothing(seed):
    q_lens, seq_lens = mixed_batch(seed, 16)
    c = make_case(seed, q_lens, seq_lens, dtype=jnp.float32, head_dim=64)
    plain = run_poisoned(c)
    c.sliding_window = max(seq_lens)  # every position p - W < 0 <= k
    np.testing.assert_array_equal(run_poisoned(c), plain, err_msg=f"seed={seed}")


def test_per_tensor_scale_is_equal_per_head_scales(seed):
    q_lens, seq_lens = mixed_batch(seed, 16)
    c = make_case(seed, q_lens, seq_lens, dtype=jnp.float32, num_kv_heads=2, fp8=True)
    per_tensor = ffi.paged_attention_ffi(c.q, c.k_pages, c.v_pages, c.meta, scale=c.scale, k_scale=0.25, v_scale=0.5)
    per_head = ffi.paged_attention_ffi(c.q, c.k_pages, c.v_pages, c.meta, scale=c.scale,
                                       k_scale=jnp.full((2,), 0.25), v_scale=jnp.full((2,), 0.5))
    np.testing.assert_array_equal(np.asarray(per_tensor), np.asarray(per_head), err_msg=f"seed={seed}")
    c.k_scale, c.v_scale = jnp.full((2,), 0.25), jnp.full((2,), 0.5)
    check(c, np.asarray(per_tensor))


def test_sharded_fp8_window_over_heads(seed):
    """Under tensor parallelism the scales split with the pool's kv heads (an Explicit mesh here)."""
    if len(jax.devices()) < 2:
        pytest.skip("needs 2 devices (the conftest gives 8 fake CPU devices)")
    c = variant_case(seed, jnp.float32, 8, 2, 64, 16, 9, 5.0, True)
    mesh = jax.make_mesh((2,), ("tp",), devices=jax.devices()[:2])
    q = jax.device_put(c.q, jax.NamedSharding(mesh, jax.P(None, "tp", None)))
    pages = jax.NamedSharding(mesh, jax.P(None, None, "tp", None))
    k, v = jax.device_put(c.k_pages, pages), jax.device_put(c.v_pages, pages)
    fn = jax.jit(lambda q, k, v: ffi.paged_attention_ffi(q, k, v, c.meta, mesh=mesh, **c.options))
    hlo = fn.lower(q, k, v).compile().as_text()
    assert "all-gather" not in hlo, "the custom call's inputs were gathered instead of sharded"
    check(c, np.asarray(fn(q, k, v)))


def test_resolve_impl_by_head_dim_and_pool_dtype():
    assert attention.resolve_impl("auto", head_dim=128, kv_dtype=jnp.float8_e4m3fn) == "ffi"
    assert attention.resolve_impl("auto", head_dim=128, kv_dtype=jnp.bfloat16) == "ffi"
    assert attention.resolve_impl("auto", head_dim=48, kv_dtype=jnp.bfloat16) == "reference"
    assert attention.resolve_impl("auto", head_dim=128, kv_dtype=jnp.float8_e5m2) == "reference"
    assert attention.resolve_impl("reference", head_dim=128) == "reference"


def test_bad_options_raise_a_clear_value_error(seed):
    c = make_case(seed, [2, 1], [5, 20], dtype=jnp.bfloat16)
    f = make_case(seed, [2, 1], [5, 20], dtype=jnp.bfloat16, fp8=True)
    fns = {"entry point": lambda *a, **kw: attention.paged_attention(*a, impl="auto", **kw),
           "reference": reference.paged_attention, "custom call": ffi.paged_attention_ffi}
    cases = [
        (c, dict(sliding_window=0), "sliding_window must be None or a positive int"),
        (c, dict(sliding_window=2.5), "sliding_window must be None or a positive int"),
        (c, dict(sliding_window=True), "sliding_window must be None or a positive int"),
        (c, dict(logit_softcap=0.0), "logit_softcap must be None or a finite float > 0"),
        (c, dict(logit_softcap=float("inf")), "logit_softcap must be None or a finite float > 0"),
        (c, dict(k_scale=jnp.ones(2), v_scale=jnp.ones(2)), "apply to fp8 pages only"),
        (f, dict(), "fp8 pages need k_scale and v_scale"),
        (f, dict(k_scale=jnp.ones(3), v_scale=jnp.ones(2)), r"k_scale must be a scalar or \[2\]"),
        (f, dict(k_scale=jnp.ones(2), v_scale=jnp.asarray([1.0, 0.0])), "v_scale must be finite and > 0"),
        (f, dict(k_scale=jnp.asarray([1.0, np.nan]), v_scale=jnp.ones(2)), "k_scale must be finite and > 0"),
    ]
    for case, kw, message in cases:
        for name, fn in fns.items():
            with pytest.raises(ValueError, match=message):
                fn(case.q, case.k_pages, case.v_pages, case.meta, scale=case.scale, **kw)


def test_cpu_handler_checks_scales_it_reads(seed):
    """Scales traced through jit reach the handler, which refuses non-positive ones."""
    if jax.default_backend() != "cpu":
        pytest.skip("the CUDA handler does not read device data on the host")
    c = make_case(seed, [2, 1], [5, 20], dtype=jnp.float32, fp8=True)
    fn = jax.jit(lambda ks: ffi.paged_attention_ffi(c.q, c.k_pages, c.v_pages, c.meta, scale=c.scale,
                                                    k_scale=ks, v_scale=c.v_scale))
    with pytest.raises(Exception, match="k_scale and v_scale must be finite and > 0"):
        jax.block_until_ready(fn(jnp.asarray([0.5, -1.0])))


def test_handler_refuses_pools_of_other_dtypes(seed):
    c = make_case(seed, [2, 1], [5, 20], dtype=jnp.bfloat16)
    e5 = c.k_pages.astype(jnp.float8_e5m2)
    with pytest.raises(Exception, match="q's or f8e4m3fn"):
        ffi.paged_attention_call(c.q, e5, e5, jnp.asarray(c.meta.block_tables), jnp.asarray(c.meta.seq_lens),
                                 jnp.asarray(c.meta.query_start_loc), scale=c.scale)


# ---- the CUDA handler (run with PAGEDJAX_TEST_GPU=1 on a GPU machine) ----

GPU_VARIANTS = VARIANTS + [
    (jnp.bfloat16, 32, 8, 128, 16, 64, 50.0, True),  # Gemma-2-like: GQA 4, cap 50, fp8
    (jnp.float16, 16, 2, 256, 16, 100, None, True),
    (jnp.bfloat16, 8, 8, 80, 16, 200, None, True),
    (jnp.bfloat16, 64, 2, 64, 16, 17, 5.0, False),  # 32 heads a group: two head chunks
]
GPU_IDS = IDS + [f"extra{i}" for i in range(len(GPU_VARIANTS) - len(VARIANTS))]


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["simt", "tensor_core"])
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("dtype,N,K,H,B,window,cap,fp8", GPU_VARIANTS, ids=GPU_IDS)
def test_gpu_matches_float64_oracle(seed, dtype, N, K, H, B, window, cap, fp8, num_splits, kernel):
    if kernel == "tensor_core" and not ffi.has_tensor_core_kernel(dtype, H, fp8):
        pytest.skip("no tensor-core kernel for f32 queries or this head dim and pool (auto runs simt there)")
    c = poison_before_windows(variant_case(seed, dtype, N, K, H, B, window, cap, fp8, long=num_splits == 3))
    got = run_poisoned(c, num_splits=num_splits, kernel=kernel)
    check(c, got, f"{kernel} S={num_splits}")
    np.testing.assert_array_equal(run_poisoned(c, num_splits=num_splits, kernel=kernel), got,
                                  err_msg=f"seed={seed}: results differ between runs")


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["invariant", "invariant16"])
@pytest.mark.parametrize("dtype,N,K,H,B,window,cap,fp8", GPU_VARIANTS, ids=GPU_IDS)
def test_gpu_invariant_kernel_matches_float64_oracle(seed, dtype, N, K, H, B, window, cap, fp8, kernel):
    """kernel="invariant" / "invariant16" (batch_invariant's: 64-row or 16-row tiles for every
    request, K/V steps from a multiple of 64 below the window's start): the oracle's numbers, NaN
    before the windows never read, the same bits run to run; it runs unsplit, and the handler itself
    refuses a split count (the Python wrapper's refusal: test_invariant_kernel_on_cpu)."""
    c = poison_before_windows(variant_case(seed, dtype, N, K, H, B, window, cap, fp8))
    got = run_poisoned(c, num_splits=1, kernel=kernel)
    check(c, got, kernel)
    np.testing.assert_array_equal(run_poisoned(c, num_splits=1, kernel=kernel), got,
                                  err_msg=f"seed={seed}: results differ between runs")
    with pytest.raises(jax.errors.JaxRuntimeError, match="runs unsplit"):
        run_poisoned(c, num_splits=3, kernel=kernel)


TC_VARIANTS = [v for v in GPU_VARIANTS if ffi.has_tensor_core_kernel(v[0], v[3], v[7])]
TC_IDS = [i for v, i in zip(GPU_VARIANTS, GPU_IDS) if v in TC_VARIANTS]


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["invariant", "invariant16"])
@pytest.mark.parametrize("split_size", [64, 192])
@pytest.mark.parametrize("dtype,N,K,H,B,window,cap,fp8", TC_VARIANTS, ids=TC_IDS)
def test_gpu_fixed_split_size_folded_or_split_gives_one_answer(seed, dtype, N, K, H, B, window, cap, fp8,
                                                               split_size, kernel):
    """A fixed split size on the invariant kernels: the oracle's numbers with one CTA folding each
    request's splits (num_splits=1), and the same bits with one CTA per split merged after
    (num_splits = the bound, and a larger grid), and run to run. The splits really happen: at 64
    positions the bits differ from the unsplit kernel's somewhere."""
    c = poison_before_windows(variant_case(seed, dtype, N, K, H, B, window, cap, fp8, long=True))
    T = c.q.shape[0]
    bound = ffi.fixed_split_bound(split_size, c.meta.block_tables.shape[1] * B, T, window)
    assert bound >= 2, bound  # a real split over CTAs (192 with a window can give 2)
    folded = run_poisoned(c, num_splits=1, kernel=kernel, split_size=split_size)
    check(c, folded, f"{kernel} split_size={split_size} folded")
    for grid in (bound, min(bound + 5, ffi.HANDLER_MAX_SPLITS)):
        np.testing.assert_array_equal(run_poisoned(c, num_splits=grid, kernel=kernel, split_size=split_size),
                                      folded, err_msg=f"seed={seed}: split over {grid} CTAs != folded")
    np.testing.assert_array_equal(run_poisoned(c, num_splits=1, kernel=kernel, split_size=split_size), folded,
                                  err_msg=f"seed={seed}: results differ between runs")
    if split_size == 64:  # many splits a token (at 192 some seeds' tokens see one, whose fold is exact)
        assert not np.array_equal(run_poisoned(c, num_splits=1, kernel=kernel), folded), \
            "the fixed split size gave the unsplit kernel's bits: were the splits taken?"


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["invariant", "invariant16"])
@pytest.mark.parametrize("num_splits", [1, None])
def test_gpu_fixed_split_size_long_decode_reads_only_the_window(seed, kernel, num_splits):
    """Decode at 8k-20k positions with a 4k window on the fixed split size (512): positions before
    each window hold NaN, so a split that read them would write NaN; folded and split (the default
    for this small decode batch) agree bitwise."""
    rng = np.random.default_rng(seed)
    seq_lens = [int(x) for x in rng.integers(8192, 20000, 3)] + [4000, 4096, 4097]
    c = make_case(seed, [1] * 6, seq_lens, num_heads=8, num_kv_heads=2, head_dim=128, dtype=jnp.bfloat16,
                  sliding_window=4096, pad_tokens=2, pad_reqs=2)
    c = poison_before_windows(c)
    T, N, H = c.q.shape
    bound = ffi.fixed_split_bound(512, c.meta.block_tables.shape[1] * c.k_pages.shape[1], T, 4096)
    grid = num_splits or ffi.choose_fixed_splits(T, c.meta.seq_lens.shape[0], N, 2, H, bound, 132)
    assert num_splits == 1 or grid == bound > 1
    got = run_poisoned(c, num_splits=grid, kernel=kernel, split_size=512)
    check(c, got, f"{kernel} S={grid}")
    np.testing.assert_array_equal(got, run_poisoned(c, num_splits=1 if grid > 1 else bound, kernel=kernel,
                                                    split_size=512))


@pytest.mark.gpu
@pytest.mark.parametrize("kernel,num_splits", [("simt", 1), ("simt", 6), ("tensor_core", 1), ("tensor_core", 6),
                                               ("invariant", 1), ("invariant16", 1)])
@pytest.mark.parametrize("fp8", [False, True])
def test_gpu_long_decode_reads_only_the_window(seed, kernel, num_splits, fp8):
    """Decode at 8k-20k positions with a 4k window: positions before each window hold NaN, so a
    kernel that read them (rather than skipping their pages) would write NaN."""
    rng = np.random.default_rng(seed)
    seq_lens = [int(x) for x in rng.integers(8192, 20000, 3)] + [4000, 4096, 4097]
    c = make_case(seed, [1] * 6, seq_lens, num_heads=8, num_kv_heads=2, head_dim=128, dtype=jnp.bfloat16,
                  fp8=fp8, sliding_window=4096, pad_tokens=2, pad_reqs=2)
    c = poison_before_windows(c)
    check(c, run_poisoned(c, num_splits=num_splits, kernel=kernel), f"{kernel} S={num_splits}")


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [1, 4])
def test_gpu_long_prefill_chunk_with_window_and_cap(seed, num_splits):
    c = make_case(seed, [700, 1, 37], [1800, 2000, 37], num_heads=16, num_kv_heads=4, head_dim=128,
                  dtype=jnp.bfloat16, fp8=True, sliding_window=300, logit_softcap=20.0, score_scale=4.0)
    c = poison_before_windows(c)
    check(c, run_poisoned(c, num_splits=num_splits), f"S={num_splits}")


@pytest.mark.gpu
def test_gpu_public_entry_point_default_splits(seed):
    c = make_case(seed, [1, 1, 1], [9000, 3000, 40], num_heads=32, num_kv_heads=8, head_dim=128,
                  dtype=jnp.bfloat16, fp8=True, sliding_window=1024, logit_softcap=50.0)
    c = poison_before_windows(c)
    got = jax.jit(lambda q, k, v: attention.paged_attention(q, k, v, c.meta, **c.options))(
        c.q, c.k_pages, c.v_pages)
    check(c, np.asarray(got.astype(jnp.float32)))

