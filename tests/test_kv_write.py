"""The KV page write custom call against the jnp scatter (bitwise), CPU and CUDA."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pagedjax  # noqa: F401  (registers the FFI targets)
from pagedjax import _ffi
from pagedjax.kv_cache import page_pool


def _random_write(rng, num_pages, page_size, K, H, T, num_pad, dtype):
    """A pool with random contents, T new rows for distinct random slots, and padding."""
    shape = (num_pages, page_size, K, H)
    k_pages = jnp.asarray(rng.standard_normal(shape), dtype)
    v_pages = jnp.asarray(rng.standard_normal(shape), dtype)
    slots = rng.choice(np.arange(page_size, num_pages * page_size), size=T, replace=False)
    slots = np.concatenate([slots, page_pool.padding_slots(num_pad, num_pages, page_size)])
    perm = rng.permutation(len(slots))  # padding anywhere in the batch, not only at the end
    slots = slots[perm].astype(np.int32)
    k = jnp.asarray(rng.standard_normal((len(slots), K, H)), dtype)
    v = jnp.asarray(rng.standard_normal((len(slots), K, H)), dtype)
    return k_pages, v_pages, k, v, jnp.asarray(slots)


def _check(platform, dtype, seed, K, H, T, num_pad):
    rng = np.random.default_rng(seed)
    device = jax.devices(platform)[0]
    num_pages = max(9, T // 16 + 3)  # room for T distinct slots outside the null page
    args = _random_write(rng, num_pages, 16, K, H, T, num_pad, dtype)
    args = jax.device_put(args, device)
    want = jax.jit(lambda *a: page_pool.write_kv(*a, impl="xla"))(*args)
    before = [np.asarray(a) for a in args[:2]]
    fn = jax.jit(lambda *a: page_pool.write_kv(*a, impl="ffi"), donate_argnums=(0, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed donation means a pool copy
        got = fn(*args)
    for w, g, b in zip(want, got, before):
        w, g = np.asarray(w), np.asarray(g)
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(g.view(np.uint8), w.view(np.uint8))
        assert not np.array_equal(g.view(np.uint8), b.view(np.uint8))  # something was written
    # Padding slots were dropped: rows not addressed by a real slot are unchanged.
    flat_before = before[0].reshape(-1, K, H)
    flat_got = np.asarray(got[0]).reshape(-1, K, H)
    real = np.asarray(args[4])
    untouched = np.setdiff1d(np.arange(flat_before.shape[0]), real[real < flat_before.shape[0]])
    np.testing.assert_array_equal(flat_got[untouched].view(np.uint8),
                                  flat_before[untouched].view(np.uint8))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("K,H,T,num_pad", [(2, 64, 37, 5), (1, 128, 1, 0), (4, 80, 16, 16), (3, 8, 3, 1)])
def test_kv_write_cpu_bitwise(dtype, K, H, T, num_pad):
    _check("cpu", dtype, seed=hash((str(dtype), K, H, T)) % 2**32, K=K, H=H, T=T, num_pad=num_pad)


def test_kv_write_in_place_under_donation():
    """With the pool donated, the custom call writes into the same buffer."""
    rng = np.random.default_rng(0)
    k_pages, v_pages, k, v, slots = _random_write(rng, 5, 16, 2, 16, 7, 1, jnp.float32)
    ptr = k_pages.unsafe_buffer_pointer()
    fn = jax.jit(lambda *a: page_pool.write_kv(*a, impl="ffi"), donate_argnums=(0, 1))
    k_new, _ = fn(k_pages, v_pages, k, v, slots)
    assert k_new.unsafe_buffer_pointer() == ptr
    assert k_pages.is_deleted()


def test_kv_write_bad_shapes_raise():
    rng = np.random.default_rng(1)
    k_pages, v_pages, k, v, slots = _random_write(rng, 5, 16, 2, 16, 7, 0, jnp.float32)
    with pytest.raises(ValueError, match="do not fit"):
        page_pool.write_kv(k_pages, v_pages, k[:, :1], v[:, :1], slots, impl="ffi")
    with pytest.raises(ValueError, match="unknown impl"):
        page_pool.write_kv(k_pages, v_pages, k, v, slots, impl="nope")


def test_kv_write_ffi_rejects_dtype_mismatch():
    """The handler's own checks surface as a Python error, not a crash."""
    rng = np.random.default_rng(2)
    k_pages, v_pages, k, v, slots = _random_write(rng, 5, 16, 2, 16, 7, 0, jnp.float32)
    call = jax.ffi.ffi_call(
        "pagedjax_kv_write",
        (jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype),) * 2,
        input_output_aliases={0: 0, 1: 1},
    )
    with pytest.raises(Exception, match="share one dtype"):
        jax.block_until_ready(call(k_pages, v_pages, k.astype(jnp.bfloat16), v, slots))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("K,H,T,num_pad", [(8, 128, 300, 20), (1, 64, 1, 0), (3, 80, 17, 3)])
def test_kv_write_cuda_bitwise(dtype, K, H, T, num_pad):
    assert _ffi.with_cuda(), "the extension was built without CUDA handlers"
    _check("gpu", dtype, seed=7, K=K, H=H, T=T, num_pad=num_pad)
