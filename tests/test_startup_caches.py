"""What a warm start reuses: compiled steps (the executable cache) and converted GGUF weights.

Each cache must give back exactly what was stored, for the program or file it was stored for,
and recompute (never crash or return something else) when its entry does not fit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pagedjax as pj
from pagedjax.compile_cache import ExecutableCache
from pagedjax.gguf_file import GGUFFile


def _double_plus(x, y):
    return x * 2 + y


def test_executables_come_back_from_disk(tmp_path):
    f = jax.jit(_double_plus)
    x, y = jnp.arange(6.0), jnp.ones(6)
    first = ExecutableCache(tmp_path)
    want = np.asarray(first.get("f", f, (x, y))(x, y))
    assert (first.misses, first.disk_hits) == (1, 0)
    again = ExecutableCache(tmp_path)  # a new process's cache: nothing in memory
    got = again.get("f", f, (x, y))(x, y)
    assert (again.misses, again.disk_hits) == (0, 1)
    np.testing.assert_array_equal(got, want)
    other = again.get("f", f, (x[:3], y[:3]))  # another shape is another program
    assert again.misses == 1
    np.testing.assert_array_equal(other(x[:3], y[:3]), want[:3])


def test_a_single_device_program_runs_on_its_device(tmp_path):
    """With 8 (fake) devices, a program compiled for device 3 comes back for device 3 only."""
    assert jax.device_count() == 8
    dev = jax.devices()[3]
    x, y = jax.device_put((jnp.arange(4.0), jnp.ones(4)), dev)
    ExecutableCache(tmp_path).get("f", jax.jit(_double_plus), (x, y))
    loaded = ExecutableCache(tmp_path).get("f", jax.jit(_double_plus), (x, y))
    out = loaded(x, y)
    assert out.devices() == {dev}
    np.testing.assert_array_equal(out, [1, 3, 5, 7])
    on0 = jax.device_put((jnp.arange(4.0), jnp.ones(4)), jax.devices()[0])
    cache = ExecutableCache(tmp_path)
    cache.get("f", jax.jit(_double_plus), on0)
    assert cache.misses == 1  # not device 3's program


def test_a_broken_entry_is_compiled_again(tmp_path):
    f = jax.jit(_double_plus)
    x, y = jnp.arange(3.0), jnp.ones(3)
    ExecutableCache(tmp_path).get("f", f, (x, y))
    (entry,) = (tmp_path / "executables").glob("f-*.bin")
    entry.write_bytes(b"not a program")
    cache = ExecutableCache(tmp_path)
    np.testing.assert_array_equal(cache.get("f", f, (x, y))(x, y), [1, 3, 5])
    assert cache.misses == 1 and cache.disk_hits == 0


def test_engine_steps_load_from_the_cache_with_the_same_tokens(tmp_path, monkeypatch):
    """A second engine with a fresh executable cache on the same folder compiles nothing."""
    from pagedjax import compile_cache

    monkeypatch.setenv("PAGEDJAX_COMPILE_CACHE", str(tmp_path))
    from pagedjax.dummy_weights import random_params
    from pagedjax.models import get_config

    params = random_params(get_config("tiny-llama"), dtype=jnp.float32, seed=3)
    sp = pj.SamplingParams(max_tokens=6, temperature=0.0)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    opts = dict(max_model_len=64, max_num_seqs=4, max_num_batched_tokens=16, num_pages=32)
    monkeypatch.setattr(compile_cache, "_CACHES", {})
    first = pj.LLM(params, **opts)
    want = [o.outputs[0].token_ids for o in first.generate(prompts, sp, use_tqdm=False)]
    assert first.engine.runner.executables.misses > 0
    monkeypatch.setattr(compile_cache, "_CACHES", {})  # as in a new process
    second = pj.LLM(params, **opts)
    got = [o.outputs[0].token_ids for o in second.generate(prompts, sp, use_tqdm=False)]
    c = second.engine.runner.executables
    assert c.misses == 0 and c.disk_hits > 0
    assert got == want


def test_gguf_weights_come_back_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDJAX_WEIGHTS_CACHE", str(tmp_path))
    first = pj.load_params(dtype=jnp.float32, progress=False)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1

    def no_dequantizing(self, name):
        raise AssertionError("a cached load must not read the GGUF's tensors")

    monkeypatch.setattr(GGUFFile, "load", no_dequantizing)
    second = pj.load_params(dtype=jnp.float32, progress=False)
    assert second.config == first.config
    for a, b in zip(jax.tree.leaves(first.variables), jax.tree.leaves(second.variables)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(AssertionError, match="must not read"):  # another dtype is another entry
        pj.load_params(dtype=jnp.bfloat16, progress=False)


def test_a_truncated_weights_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDJAX_WEIGHTS_CACHE", str(tmp_path))
    first = pj.load_params(dtype=jnp.float32, progress=False)
    (entry,) = tmp_path.glob("*.safetensors")
    entry.write_bytes(entry.read_bytes()[:1000])
    again = pj.load_params(dtype=jnp.float32, progress=False)
    for a, b in zip(jax.tree.leaves(first.variables), jax.tree.leaves(again.variables)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert entry.stat().st_size > 1000  # rewritten whole
