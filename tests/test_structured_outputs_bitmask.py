"""apply_token_bitmask (JAX, jitted) against llguidance's numpy helper and a numpy unpacking."""

import jax
import jax.numpy as jnp
import llguidance.numpy as llg_np
import numpy as np
import pytest

from pagedjax.structured_outputs.bitmask import apply_token_bitmask

SEED = 20261204


def numpy_reference(logits: np.ndarray, bitmask: np.ndarray) -> np.ndarray:
    """Bit j of word w (little-endian within the int32) allows token 32*w + j."""
    V = logits.shape[1]
    bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :V].astype(bool)  # [R, V]
    return np.where(bits, logits, -np.inf).astype(np.float32)


@pytest.mark.parametrize("V", [1, 31, 32, 33, 1000, 49152 + 77])
@pytest.mark.parametrize("extra_words", [0, 2])
def test_matches_llguidance_and_numpy(V, extra_words):
    seed = SEED + V + 1000 * extra_words
    rng = np.random.default_rng(seed)
    R, W = 6, -(-V // 32) + extra_words
    logits = rng.standard_normal((R, V)).astype(np.float32) * 4
    bitmask = rng.integers(-(2**31), 2**31, size=(R, W), dtype=np.int64).astype(np.int32)  # [R, W]
    bitmask[1] = -1  # an unconstrained row: all ones
    bitmask[2] = 0  # nothing allowed
    bitmask[3] &= np.int32(0x0F0F0F0F)  # sparse
    bitmask[4, : W // 2] = 0
    got = np.asarray(jax.jit(apply_token_bitmask)(jnp.asarray(logits), jnp.asarray(bitmask)))
    want = numpy_reference(logits, bitmask)
    ll = logits.copy()
    llg_np.apply_token_bitmask_inplace(ll, np.ascontiguousarray(bitmask[:, : -(-V // 32)]))
    np.testing.assert_array_equal(want, ll, err_msg=f"seed={seed}: the numpy reference disagrees with llguidance")
    np.testing.assert_array_equal(got, want, err_msg=f"seed={seed}")
    np.testing.assert_array_equal(got[1], logits[1], err_msg=f"seed={seed}: an all-ones row changed")
    assert np.isneginf(got[2]).all()


def test_bfloat16_logits_and_bad_shapes():
    rng = np.random.default_rng(SEED)
    logits = jnp.asarray(rng.standard_normal((2, 40)), jnp.bfloat16)
    mask = np.zeros((2, 2), np.int32)
    mask[:, 0] = 1 << 5
    out = apply_token_bitmask(logits, jnp.asarray(mask))
    assert out.dtype == jnp.bfloat16
    assert np.isneginf(np.asarray(out, np.float32)[:, np.arange(40) != 5]).all()
    assert (np.asarray(out[:, 5]) == np.asarray(logits[:, 5])).all()
    with pytest.raises(ValueError, match="bitmask must be"):
        apply_token_bitmask(logits, jnp.zeros((2, 1), jnp.int32))  # 32 bits for 40 tokens
    with pytest.raises(ValueError, match="bitmask must be"):
        apply_token_bitmask(logits, jnp.zeros((3, 2), jnp.int32))
