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
