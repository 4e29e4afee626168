"""The executable cache across processes: a program stored by one ExecutableCache and loaded by
another (a fresh process's) runs on the devices it was compiled for, on a host with several
devices (conftest's 8 fake CPU devices) -- jax's loader would otherwise spread it over all of them."""

import jax
import jax.numpy as jnp
import numpy as np

from pagedjax.compile_cache import ExecutableCache


def test_a_stored_program_loads_onto_its_own_devices(tmp_path):
    assert jax.device_count() > 1, "conftest gives the CPU 8 devices"
    fn = jax.jit(lambda x, y: x * 2 + y)
    for device in (jax.devices()[0], jax.devices()[-1]):
        x = jax.device_put(np.arange(6, dtype=np.float32), device)
        y = jax.device_put(np.ones(6, np.float32), device)
        writer, reader = ExecutableCache(tmp_path), ExecutableCache(tmp_path)  # two processes' caches
        writer.get("fn", fn, (x, y))
        compiled = reader.get("fn", fn, (x, y))
        assert writer.misses == 1 and reader.disk_hits == 1 and reader.misses == 0
        out = compiled(x, y)
        np.testing.assert_array_equal(out, np.arange(6) * 2 + 1)
        assert out.devices() == {device}
    assert jnp.asarray(0).devices()  # the backend is still fine


def test_a_program_changed_by_the_environment_is_compiled_again(tmp_path, monkeypatch):
    """Variables that change the traced program (the batch-invariant GEMM's choice, XLA_FLAGS)
    are part of the key: the program stored under one value is not loaded under another."""
    from pagedjax import compile_cache

    fn = jax.jit(lambda x: x + 1)
    x = np.zeros(3, np.float32)
    for name in compile_cache.PROGRAM_ENV:
        monkeypatch.delenv(name, raising=False)
        ExecutableCache(tmp_path).get("fn", fn, (x,))
        monkeypatch.setenv(name, "mosaic" if name.startswith("PAGEDJAX") else "--xla_cpu_enable_fast_math=false")
        other = ExecutableCache(tmp_path)
        other.get("fn", fn, (x,))
        assert other.misses == 1 and other.disk_hits == 0, name
        again = ExecutableCache(tmp_path)
        again.get("fn", fn, (x,))
        assert again.disk_hits == 1, name
    assert "PAGEDJAX_BATCH_INVARIANT_MATMUL" in compile_cache.PROGRAM_ENV


def test_abstract_params_come_from_disk_once_traced(tmp_path, monkeypatch):
    """The model's abstract parameter tree (traced from its init: ~1 s for 30 layers) is stored
    once and read back by a later process (here: with the in-process cache cleared and tracing
    made to fail); a broken entry is traced again and rewritten."""
    import pytest

    from pagedjax import models
    from pagedjax.models.config import get_config

    monkeypatch.setenv("PAGEDJAX_COMPILE_CACHE", str(tmp_path))
    cfg = get_config("tiny-qwen3")
    models._abstract_params.cache_clear()
    shapes, axes = models.abstract_params(cfg, jnp.bfloat16)
    [entry] = (tmp_path / "traced").glob("abstract-params-*.pkl")

    def no_tracing(config):
        raise AssertionError("traced again")

    models._abstract_params.cache_clear()
    with monkeypatch.context() as m:
        m.setattr(models, "_trace_params", no_tracing)
        again = models.abstract_params(cfg, jnp.bfloat16)
        assert again == (shapes, axes)
    models._abstract_params.cache_clear()
    entry.write_bytes(b"not a pickle")
    with pytest.raises(AssertionError, match="traced again"), monkeypatch.context() as m:
        m.setattr(models, "_trace_params", no_tracing)
        models.abstract_params(cfg, jnp.bfloat16)
    models._abstract_params.cache_clear()
    assert models.abstract_params(cfg, jnp.bfloat16) == (shapes, axes)  # traced and rewritten
    leaves = jax.tree.leaves(shapes)
    assert leaves and all(x.dtype == jnp.bfloat16 for x in leaves)
    models._abstract_params.cache_clear()
