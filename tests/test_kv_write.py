"""The KV page write: the custom call against the jnp scatter (bitwise), CPU and CUDA; the FP8
KV cache's quantization against ml_dtypes (bitwise), on both paths.

Dims: T tokens, K kv heads, H head dim, P pages, B page size. Every case is drawn from a seeded
generator; failure messages name the seed.
"""

import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from pagedjax import _ffi
from pagedjax.kv_cache import kv_dtype, page_pool
from tests.attention_cases import seed  # noqa: F401  (the seeded-test fixture)

FP8 = ml_dtypes.float8_e4m3fn


def _random_write(rng, num_pages, page_size, K, H, T, num_pad, dtype, pool_dtype=None):
    """A pool with random contents, T new rows for distinct random slots, and padding."""
    shape = (num_pages, page_size, K, H)
    pool_dtype = dtype if pool_dtype is None else pool_dtype
    k_pages = jnp.asarray(rng.standard_normal(shape), pool_dtype)
    v_pages = jnp.asarray(rng.standard_normal(shape), pool_dtype)
    slots = rng.choice(np.arange(page_size, num_pages * page_size), size=T, replace=False)
    slots = np.concatenate([slots, page_pool.padding_slots(num_pad, num_pages, page_size)])
    perm = rng.permutation(len(slots))  # padding anywhere in the batch, not only at the end
    slots = slots[perm].astype(np.int32)
    k = jnp.asarray(rng.standard_normal((len(slots), K, H)) * 3, dtype)
    v = jnp.asarray(rng.standard_normal((len(slots), K, H)) * 3, dtype)
    return k_pages, v_pages, k, v, jnp.asarray(slots)


def quantize_like_ml_dtypes(x, scale) -> np.ndarray:
    """The FP8 contract computed on the host with numpy and ml_dtypes: x [T, K, H], scale [K]."""
    inv = np.float32(1) / np.asarray(scale, np.float32)  # [K], IEEE
    q = np.asarray(x).astype(np.float32) * inv[:, None]
    return np.clip(q, -448, 448).astype(FP8)


def _check(platform, dtype, seed, K, H, T, num_pad, fp8=False):
    rng = np.random.default_rng(seed)
    device = jax.devices(platform)[0]
    num_pages = max(9, T // 16 + 3)  # room for T distinct slots outside the null page
    args = _random_write(rng, num_pages, 16, K, H, T, num_pad, dtype, jnp.float8_e4m3fn if fp8 else None)
    scales = {}
    if fp8:
        scales = dict(k_scale=jnp.asarray(rng.uniform(0.01, 0.5, K), jnp.float32),
                      v_scale=jnp.asarray(rng.uniform(0.01, 0.5, K), jnp.float32))
    args = jax.device_put(args, device)
    scales = jax.device_put(scales, device)
    want = jax.jit(lambda *a, **s: page_pool.write_kv(*a, impl="xla", **s))(*args, **scales)
    before = [np.asarray(a) for a in args[:2]]
    fn = jax.jit(lambda *a, **s: page_pool.write_kv(*a, impl="ffi", **s), donate_argnums=(0, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed donation means a pool copy
        got = fn(*args, **scales)
    slots = np.asarray(args[4])
    real = slots < before[0].shape[0] * before[0].shape[1]
    for name, w, g, b, rows, s in zip("kv", want, got, before, args[2:4], ("k_scale", "v_scale")):
        w, g = np.asarray(w), np.asarray(g)
        assert g.dtype == w.dtype, f"seed={seed}"
        np.testing.assert_array_equal(g.view(np.uint8), w.view(np.uint8), err_msg=f"seed={seed} {name}: ffi vs xla")
        assert not np.array_equal(g.view(np.uint8), b.view(np.uint8)), f"seed={seed}: nothing was written"
        flat_got, flat_before = g.reshape(-1, K, H), b.reshape(-1, K, H)
        expect = quantize_like_ml_dtypes(rows, scales[s]) if fp8 else np.asarray(rows)
        np.testing.assert_array_equal(flat_got[slots[real]].view(np.uint8), expect[real].view(np.uint8),
                                      err_msg=f"seed={seed} {name}: written rows")
        # Padding slots were dropped: rows not addressed by a real slot are unchanged.
        untouched = np.setdiff1d(np.arange(flat_before.shape[0]), slots[real])
        np.testing.assert_array_equal(flat_got[untouched].view(np.uint8), flat_before[untouched].view(np.uint8),
                                      err_msg=f"seed={seed} {name}: rows outside the slots changed")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("K,H,T,num_pad", [(2, 64, 37, 5), (1, 128, 1, 0), (4, 80, 16, 16), (3, 8, 3, 1)])
def test_kv_write_cpu_bitwise(seed, dtype, K, H, T, num_pad):
    _check("cpu", dtype, seed, K=K, H=H, T=T, num_pad=num_pad)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("K,H,T,num_pad", [(2, 64, 37, 5), (3, 8, 3, 1)])
def test_kv_write_fp8_cpu_matches_ml_dtypes(seed, dtype, K, H, T, num_pad):
    """Both paths quantize exactly as numpy + ml_dtypes do, bit for bit."""
    _check("cpu", dtype, seed, K=K, H=H, T=T, num_pad=num_pad, fp8=True)


def edge_values() -> np.ndarray:
    """f32 values where rounding and saturation decide: every fp8 value, the midpoints between
    neighbours (ties) and one f32 ulp either side, the range's ends, subnormals, zeros, inf, NaN."""
    grid = np.arange(256, dtype=np.uint8).view(FP8).astype(np.float32)
    grid = np.sort(grid[np.isfinite(grid)])
    mids = (grid[:-1].astype(np.float64) + grid[1:]) / 2  # exact in f32: fp8 has 3 mantissa bits
    mids = mids.astype(np.float32)
    near = np.concatenate([mids, np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(-np.inf))])
    special = np.array([0.0, -0.0, 448, -448, 449, 463.99, 464, 464.01, 480, 500, 1e30, -1e30, np.inf, -np.inf,
                        2.0**-9, 2.0**-10, 1.5 * 2.0**-10, 2.0**-11, 1e-30, -1e-30, 1e-45, 2.0**-6,
                        2.0**-6 * (1 - 2.0**-5), np.nan], np.float32)
    return np.concatenate([grid, near, special, -near])


@pytest.mark.parametrize("impl", ["xla", "ffi"])
def test_fp8_rounding_and_saturation_bit_for_bit(impl):
    """Round to nearest even, ties to the even code, clamp to +-448 (inf too), NaN kept, signed
    zeros and subnormals as ml_dtypes' float8_e4m3fn conversion has them; scales 1 and 2^-3 (exact
    reciprocals), then 0.3 and 1/3 with inputs a few ulps around each tie (the reciprocal's
    rounding decides there: a path that divided, or rounded 1 / scale otherwise, shows)."""
    check_fp8_edges(impl)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["xla", "ffi"])
def test_gpu_fp8_rounding_and_saturation_bit_for_bit(impl):
    """The same on the GPU: the CUDA write kernel, and XLA's own division and conversion."""
    assert jax.default_backend() == "gpu"
    check_fp8_edges(impl)


def check_fp8_edges(impl):
    for scale in (1.0, 0.125, 0.3, 1 / 3):
        s32 = np.float32(scale)
        x = edge_values() * s32  # ties of x * (1 / scale) sit near these: probe a few ulps around
        x = np.concatenate([x + k * np.spacing(x) for k in range(-2, 3)]) if scale in (0.3, 1 / 3) else x
        n = -(-x.size // 8) * 8
        rows = np.zeros(n, np.float32)
        rows[: x.size] = x
        rows = rows.reshape(-1, 2, 4)  # [T, K=2, H=4]
        T = rows.shape[0]
        pool = jnp.zeros((T // 16 + 2, 16, 2, 4), jnp.float8_e4m3fn)
        slots = jnp.arange(16, 16 + T, dtype=jnp.int32)
        s = jnp.full((2,), scale, jnp.float32)  # an argument, as the engine's scales are
        k_pages, _ = jax.jit(lambda *a, s: page_pool.write_kv(*a, impl=impl, k_scale=s, v_scale=s))(
            pool, pool, jnp.asarray(rows), jnp.asarray(rows), slots, s=s)
        got = np.asarray(k_pages).reshape(-1, 2, 4)[16 : 16 + T].reshape(-1)[: x.size]
        want = quantize_like_ml_dtypes(rows, np.full(2, scale)).reshape(-1)[: x.size]
        nan = np.isnan(x)
        assert np.isnan(got[nan].astype(np.float32)).all()
        bad = np.flatnonzero(got[~nan].view(np.uint8) != want[~nan].view(np.uint8))
        assert bad.size == 0, (f"{impl}, scale {scale}: {bad.size} values differ, e.g. "
                               f"{x[~nan][bad[:5]].tolist()} -> {got[~nan][bad[:5]].view(np.uint8).tolist()}, "
                               f"ml_dtypes {want[~nan][bad[:5]].view(np.uint8).tolist()}")
        if jax.default_backend() == "cpu":  # NaN's sign too, on the CPU (CUDA's conversion may drop it)
            np.testing.assert_array_equal(got[nan].view(np.uint8), want[nan].view(np.uint8))


def test_kv_write_in_place_under_donation(seed):
    """With the pool donated, the custom call writes into the same buffer."""
    rng = np.random.default_rng(seed)
    k_pages, v_pages, k, v, slots = _random_write(rng, 5, 16, 2, 16, 7, 1, jnp.float32)
    ptr = k_pages.unsafe_buffer_pointer()
    fn = jax.jit(lambda *a: page_pool.write_kv(*a, impl="ffi"), donate_argnums=(0, 1))
    k_new, _ = fn(k_pages, v_pages, k, v, slots)
    assert k_new.unsafe_buffer_pointer() == ptr
    assert k_pages.is_deleted()


def test_kv_write_bad_shapes_and_scales_raise(seed):
    rng = np.random.default_rng(seed)
    k_pages, v_pages, k, v, slots = _random_write(rng, 5, 16, 2, 16, 7, 0, jnp.float32)
    with pytest.raises(ValueError, match="do not fit"):
        page_pool.write_kv(k_pages, v_pages, k[:, :1], v[:, :1], slots, impl="ffi")
    with pytest.raises(ValueError, match="unknown impl"):
        page_pool.write_kv(k_pages, v_pages, k, v, slots, impl="nope")
    with pytest.raises(ValueError, match="apply to fp8 pages only"):
        page_pool.write_kv(k_pages, v_pages, k, v, slots, k_scale=1.0, v_scale=1.0)
    f8 = k_pages.astype(jnp.float8_e4m3fn)
    for impl in ("xla", "ffi"):
        with pytest.raises(ValueError, match="fp8 pages need k_scale and v_scale"):
            page_pool.write_kv(f8, f8, k, v, slots, impl=impl)
        with pytest.raises(ValueError, match=r"v_scale must be a scalar or \[2\]"):
            page_pool.write_kv(f8, f8, k, v, slots, impl=impl, k_scale=1.0, v_scale=jnp.ones(3))
        with pytest.raises(ValueError, match="k_scale must be finite and > 0"):
            page_pool.write_kv(f8, f8, k, v, slots, impl=impl, k_scale=-1.0, v_scale=1.0)
    with pytest.raises(ValueError, match="differ"):
        page_pool.write_kv(k_pages, f8, k, v, slots)


def test_kv_write_ffi_rejects_dtype_mismatch(seed):
    """The handler's own checks surface as a Python error, not a crash."""
    rng = np.random.default_rng(seed)
    k_pages, v_pages, k, v, slots = _random_write(rng, 5, 16, 2, 16, 7, 0, jnp.float32)
    _ffi.require("pagedjax_kv_write", jax.default_backend())  # registers the handlers (first use)
    ones = jnp.ones((2,), jnp.float32)
    call = jax.ffi.ffi_call(
        "pagedjax_kv_write",
        (jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype),) * 2,
        input_output_aliases={0: 0, 1: 1},
    )
    with pytest.raises(Exception, match="must share dtypes"):
        jax.block_until_ready(call(k_pages, v_pages, k.astype(jnp.bfloat16), v, slots, ones, ones))
    f8 = k_pages.astype(jnp.float8_e4m3fn)
    call8 = jax.ffi.ffi_call("pagedjax_kv_write", (jax.ShapeDtypeStruct(f8.shape, f8.dtype),) * 2,
                             input_output_aliases={0: 0, 1: 1})
    if jax.default_backend() == "cpu":  # the CPU handler reads the scales on the host
        with pytest.raises(Exception, match="must be finite and > 0"):
            jax.block_until_ready(call8(f8, f8, k, v, slots, ones, jnp.asarray([1.0, 0.0])))
    with pytest.raises(Exception, match="f32, f16 or bf16"):
        jax.block_until_ready(call8(f8, f8, k.astype(jnp.int32), v.astype(jnp.int32), slots, ones, ones))


def test_resolve_kv_cache_dtype():
    assert kv_dtype.resolve_kv_cache_dtype("auto", jnp.bfloat16) == jnp.bfloat16
    assert kv_dtype.resolve_kv_cache_dtype("fp8", jnp.bfloat16) == jnp.float8_e4m3fn
    assert kv_dtype.resolve_kv_cache_dtype("fp8_e4m3", jnp.float16) == jnp.float8_e4m3fn
    with pytest.raises(ValueError, match="kv_cache_dtype 'fp8_e5m2' is not one of"):
        kv_dtype.resolve_kv_cache_dtype("fp8_e5m2", jnp.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("K,H,T,num_pad", [(8, 128, 300, 20), (1, 64, 1, 0), (3, 80, 17, 3)])
def test_kv_write_cuda_bitwise(seed, dtype, K, H, T, num_pad):
    assert _ffi.with_cuda(), "the extension was built without CUDA handlers"
    _check("gpu", dtype, seed, K=K, H=H, T=T, num_pad=num_pad)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("K,H,T,num_pad", [(8, 128, 300, 20), (3, 80, 17, 3)])
def test_kv_write_fp8_cuda_matches_ml_dtypes(seed, dtype, K, H, T, num_pad):
    assert _ffi.with_cuda(), "the extension was built without CUDA handlers"
    _check("gpu", dtype, seed, K=K, H=H, T=T, num_pad=num_pad, fp8=True)
