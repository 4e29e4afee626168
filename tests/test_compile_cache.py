"""The executable cache across processes: a program stored by one ExecutableCache and loaded by
another (a fresh process's) runs on the devices it was compiled for, on a host with several
devices (conftest's 8 fake CPU devices) -- jax's loader would otherwise spread it over all of them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pagedjax as pj
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


def test_arguments_without_a_placement_key_as_the_default_devices_arrays(tmp_path):
    """A program compiled from abstract arguments without a sharding (or numpy arrays) is the one a
    run with arrays on the default device fetches, not compiled again; on another device it is
    another program."""
    fn = jax.jit(lambda x: x + 1)
    cache = ExecutableCache(tmp_path)
    cache.get("fn", fn, (jax.ShapeDtypeStruct((4,), jnp.float32),))
    cache.get("fn", fn, (np.zeros(4, np.float32),))
    compiled = cache.get("fn", fn, (jax.device_put(np.zeros(4, np.float32), jax.devices()[0]),))
    assert (cache.misses, cache.hits) == (1, 2)
    np.testing.assert_array_equal(compiled(jnp.arange(4.0)), np.arange(4.0) + 1)
    cache.get("fn", fn, (jax.device_put(np.zeros(4, np.float32), jax.devices()[-1]),))
    assert cache.misses == 2


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
    assert {"PAGEDJAX_BATCH_INVARIANT_MATMUL", "PAGEDJAX_BATCH_INVARIANT_ATTENTION",
            "PAGEDJAX_BATCH_INVARIANT_NORM", "PAGEDJAX_BATCH_INVARIANT_SPLIT"} <= set(compile_cache.PROGRAM_ENV)


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


def test_precompile_without_running_fetches_the_programs_a_run_does(tmp_path, monkeypatch):
    """On the CPU, start-up fetches (loads or compiles) every bucket's step and sampler without
    running them on padding. The programs must be the very ones a run fetches: the sampler's key
    is built from the step's output info rather than its output, so both ways must store the same
    entries, whether one program is compiled at a time or several (PAGEDJAX_COMPILE_WORKERS), and
    each exactly once. Then the engine serves greedy and random requests on what it fetched, and
    compiles nothing more."""
    from pagedjax.dummy_weights import random_params
    from pagedjax.models.named import NAMED_CONFIGS

    params = random_params(NAMED_CONFIGS["tiny-llama"], dtype=jnp.float32)
    options = dict(max_num_seqs=4, max_model_len=64, max_num_batched_tokens=32, precompile=False)
    stored = {}
    for run, workers in ((True, "1"), (False, "1"), (False, "3")):
        monkeypatch.setenv("PAGEDJAX_COMPILE_CACHE", str(tmp_path / f"{run}{workers}"))
        monkeypatch.setenv("PAGEDJAX_COMPILE_WORKERS", workers)
        llm = pj.LLM(params, **options)
        runner = llm.engine.runner
        runner.precompile(run=run)
        stored[run, workers] = sorted(p.name for p in (tmp_path / f"{run}{workers}").rglob("*.bin"))
        assert runner.executables.misses == len(stored[run, workers]) > 0
    assert stored[True, "1"] == stored[False, "1"] == stored[False, "3"]
    names = [n.split("-")[0] for n in stored[False, "3"]]
    # a step per token bucket; a greedy and a random sampler per row count (buckets may share one)
    assert names.count("step") == len(runner.token_buckets) and names.count("sample") >= 2

    fetched, compiled = dict(runner._executables), runner.executables.misses
    outs = llm.generate([[1, 2, 3], [4, 5, 6, 7]], [pj.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
                                                     pj.SamplingParams(max_tokens=4, seed=1, ignore_eos=True)])
    assert [len(o.outputs[0].token_ids) for o in outs] == [4, 4]
    assert all(runner._executables[k] is v for k, v in fetched.items())  # used as they were, none replaced
    # Nothing compiled while serving: the later steps (which read the last step's tokens on the
    # device) are the same programs, found by the same key, as the first ones start-up compiled.
    assert runner.executables.misses == compiled


def test_compile_workers_come_from_the_environment(monkeypatch):
    from pagedjax.model_runner import COMPILE_WORKERS_ENV, compile_workers

    monkeypatch.setenv(COMPILE_WORKERS_ENV, "5")
    assert compile_workers() == 5
    for bad in ("0", "-1", "two", "1.5"):
        monkeypatch.setenv(COMPILE_WORKERS_ENV, bad)
        with pytest.raises(ValueError, match=COMPILE_WORKERS_ENV):
            compile_workers()
    monkeypatch.delenv(COMPILE_WORKERS_ENV)
    assert 1 <= compile_workers() <= 8


def test_the_largest_steps_temporaries_are_measured_once(tmp_path, monkeypatch):
    """Pool sizing on a GPU compiles the largest step with a tiny pool to read its temporaries'
    size. The figure is kept with the compiled steps: a later start reads it without compiling
    (here the compile would fail and fall back to a guess), and another largest step gets its own."""
    from pagedjax import model_runner as mr
    from pagedjax.dummy_weights import random_params
    from pagedjax.models.named import NAMED_CONFIGS

    monkeypatch.setenv("PAGEDJAX_COMPILE_CACHE", str(tmp_path))
    params = random_params(NAMED_CONFIGS["tiny-llama"], dtype=jnp.float32)
    runner = pj.LLM(params, max_num_seqs=4, max_model_len=64, max_num_batched_tokens=32, precompile=False).engine.runner
    first = runner._activation_bytes()
    entries = list((tmp_path / "traced").glob("step-temporaries-*.pkl"))
    assert len(entries) == 1 and first > 0

    class Unlowerable:
        def lower(self, *a, **k):
            raise AssertionError("compiled again")

    real = mr._step
    monkeypatch.setattr(mr, "_step", Unlowerable())
    assert runner._activation_bytes() == first
    other = pj.LLM(params, max_num_seqs=4, max_model_len=64, max_num_batched_tokens=48, precompile=False).engine.runner
    assert other._activation_bytes() > first  # not in the cache: the guess, which is generous
    monkeypatch.setattr(mr, "_step", real)
    measured = other._activation_bytes()
    assert measured != first and len(list((tmp_path / "traced").glob("step-temporaries-*.pkl"))) == 2
