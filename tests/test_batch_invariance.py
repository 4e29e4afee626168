"""batch_invariant=True: a request's tokens and logprobs are bitwise what it gets alone, whatever
else is in the batch, however its prompt is chunked, after prefix-cache hits and preemption.

The bundled SmolLM2-135M-Instruct in bf16 on the CPU. A probe prompt (~300 tokens) runs alone on
a fresh engine: that is the reference. Then it runs beside 2 to 64 random strangers (random
prompts, lengths, output lengths, greedy and seeded sampling), with the prompt split into chunks
of 16, 64 and 256 tokens, again after its prefix was cached, with async scheduling off, in a pool
small enough that it is preempted (recompute and swap) (tensor parallelism:
tests/test_batch_invariance_tp.py). The probe is checked twice each time: greedy, and seeded
sampling (temperature 0.8, top-p 0.95), with its top-2 logprobs.
Without the flag the same runs differ from the reference (the test can fail).
"""

import numpy as np
import pytest

import pagedjax as pj
from tests.invariance_cases import SMOLLM2_ENGINE as ENGINE
from tests.invariance_cases import reference_runs, run, same, smollm2_params, smollm2_probe


@pytest.fixture(scope="module")
def params():
    return smollm2_params()


@pytest.fixture(scope="module")
def probe(params) -> list[int]:
    return smollm2_probe(params)


@pytest.fixture(scope="module")
def alone(params, probe):
    return reference_runs(params, probe, ENGINE)


@pytest.fixture(scope="module")
def invariant(params):
    return pj.LLM(params, batch_invariant=True, **ENGINE)


@pytest.mark.parametrize("n", [2, 8, 32, 64])
def test_beside_strangers(invariant, probe, alone, n):
    assert same(run(invariant, probe, n, seed=n), alone[True])


@pytest.mark.parametrize("chunk", [16, 64, 256])
def test_prompt_chunking(params, probe, alone, chunk):
    llm = pj.LLM(params, batch_invariant=True, **{**ENGINE, "long_prefill_token_threshold": chunk})
    assert same(run(llm, probe, 8, seed=chunk), alone[True])


def test_prefix_cache_hits(params, probe, alone):
    llm = pj.LLM(params, batch_invariant=True, **{**ENGINE, "enable_prefix_caching": True})
    assert same(run(llm, probe), alone[True])  # the first greedy run fills the cache, the rest hit it
    hits = llm.engine.stats().prefix_cache_hits
    assert same(run(llm, probe, 8, seed=5), alone[True])
    assert llm.engine.stats().prefix_cache_hits >= hits + 2 * 288  # both runs: the probe's full pages


def test_sync_scheduling(params, probe, alone):
    llm = pj.LLM(params, batch_invariant=True, **{**ENGINE, "async_scheduling": False})
    assert same(run(llm, probe, 8, seed=11), alone[True])


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption(params, probe, mode):
    """A pool of 30 pages (480 tokens) for a 64-token probe (48 tokens out) and 8 short strangers
    that keep growing (50-70 tokens out): all are admitted, and the probe, admitted last, is the
    first one preempted when they need pages; it resumes (recomputed, or swapped back in) with the
    same numbers."""
    short, out = probe[:64], 48
    want = run(pj.LLM(params, batch_invariant=True, **ENGINE), short, max_tokens=out)
    llm = pj.LLM(params, batch_invariant=True, **{**ENGINE, "num_pages": 31, "preemption_mode": mode,
                                                    "swap_space": 2**-6})
    preempted, probe_ids = [], []
    schedule, add_request = llm.engine.scheduler.schedule, llm.engine.add_request

    def recording_schedule(*args, **kwargs):
        plan = schedule(*args, **kwargs)
        preempted.extend(plan.preempted_ids)
        return plan

    def recording_add_request(request_id, prompt, *args, **kwargs):
        if prompt == short:
            probe_ids.append(request_id)
        return add_request(request_id, prompt, *args, **kwargs)

    llm.engine.scheduler.schedule = recording_schedule
    llm.engine.add_request = recording_add_request
    got = run(llm, short, 8, seed=99, probe_last=True, max_tokens=out, stranger_tokens=(50, 70),
              stranger_prompts=(4, 12))
    assert len(probe_ids) == 2 and set(probe_ids) <= set(preempted), (probe_ids, preempted)
    if mode == "swap":
        assert llm.engine.stats().num_swapped_in > 0
    assert same(got, want)


def test_without_the_flag_the_numbers_change(params, probe, alone):
    """The same runs without batch_invariant: the probe's logprobs move (so the checks above can fail)."""
    llm = pj.LLM(params, batch_invariant=False, **ENGINE)
    runs = [run(llm, probe, n, seed=n) for n in (8, 32)]
    assert any(not same(r, alone[False]) for r in runs)


def test_refused_where_not_supported():
    import jax.numpy as jnp

    from pagedjax.dummy_weights import random_params
    from pagedjax.models.named import NAMED_CONFIGS

    cfg = NAMED_CONFIGS["mixtral-8x7b"].replace(num_layers=1, hidden_size=64, intermediate_size=64,
                                                moe_intermediate_size=32, num_heads=4, num_kv_heads=2, head_dim=16,
                                                rotary_dim=16, vocab_size=128)
    with pytest.raises(ValueError, match="batch_invariant"):
        pj.LLM(random_params(cfg, dtype=jnp.float32), batch_invariant=True, precompile=False)


@pytest.mark.parametrize("method", ["tiles", "kernel"])
@pytest.mark.parametrize("kind, shape", [("rms", (72,)), ("rms_unit_offset", (3, 40)), ("layer", (72,))])
def test_norm_methods_match_the_oracle_and_keep_rows(monkeypatch, method, kind, shape):
    """PAGEDJAX_BATCH_INVARIANT_NORM: each method's norm (RMSNorm, Gemma's unit-offset RMSNorm on
    per-head rows, LayerNorm; D not a power of two) matches a float64 oracle, and rows taken from
    a 40-row input keep their bits at any row count; "tiles" lowers to a loop over row tiles,
    "kernel" to invariant_norm.row_moments; an unknown method is refused when the model is traced."""
    import jax
    import jax.numpy as jnp

    from pagedjax.models import layers

    rng = np.random.default_rng(11)
    d = shape[-1]
    x = rng.standard_normal((40, *shape)) * rng.uniform(0.1, 20, (40,) + (1,) * len(shape)) + 0.5
    w, b = rng.uniform(-0.5, 1.5, d), rng.standard_normal(d)
    h = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    if kind == "layer":
        mod = layers.LayerNorm(eps=1e-5, batch_invariant=True)
        variables = {"params": {"scale": jnp.asarray(w, jnp.float32), "bias": jnp.asarray(b, jnp.float32)}}
        mean = h.mean(-1, keepdims=True)
        want = (h - mean) / np.sqrt(((h - mean) ** 2).mean(-1, keepdims=True) + 1e-5) * w + b
    else:
        mod = layers.RMSNorm(eps=1e-5, unit_offset=kind == "rms_unit_offset", batch_invariant=True)
        variables = {"params": {"scale": jnp.asarray(w, jnp.float32)}}
        want = h / np.sqrt((h * h).mean(-1, keepdims=True) + 1e-5) * (1 + w if kind == "rms_unit_offset" else w)
    monkeypatch.setenv(layers.NORM_ENV, method)
    f = jax.jit(lambda a: mod.apply(variables, a))
    full = np.asarray(f(jnp.asarray(x, jnp.float32)))
    np.testing.assert_allclose(full, want, rtol=1e-5, atol=1e-5)
    for start, m in ((0, 1), (7, 3), (20, 17), (3, 9)):
        part = np.asarray(f(jnp.asarray(x[start:start + m], jnp.float32)))
        assert np.array_equal(part, full[start:start + m]), (method, m)
    text = f.lower(jnp.asarray(x, jnp.float32)).as_text()
    assert ("@row_moments" in text) == (method == "kernel")
    assert (text.count("stablehlo.while") == 1) if method == "tiles" else ("@row_moments" in text)
    monkeypatch.setenv(layers.NORM_ENV, "split")
    with pytest.raises(ValueError, match="PAGEDJAX_BATCH_INVARIANT_NORM='split'"):
        jax.jit(lambda a: mod.apply(variables, a)).lower(jnp.asarray(x, jnp.float32))


def test_the_engine_records_the_norm_method(monkeypatch):
    """The engine reads PAGEDJAX_BATCH_INVARIANT_NORM once, into ModelConfig.invariant_norm; the
    model then follows the config, whatever the variable says when it is traced."""
    import jax
    import jax.numpy as jnp

    from pagedjax.config import EngineConfig
    from pagedjax.models import layers
    from pagedjax.models.named import NAMED_CONFIGS

    base = NAMED_CONFIGS["llama3-8b"].replace(num_layers=1, hidden_size=64)
    monkeypatch.setenv(layers.NORM_ENV, "kernel")
    cfg = EngineConfig(batch_invariant=True, tensor_parallel_size=1).model_config(base)
    assert cfg.invariant_norm == "kernel"
    assert EngineConfig(batch_invariant=False).model_config(base).invariant_norm is None
    monkeypatch.setenv(layers.NORM_ENV, "tiles")
    mod = layers.norm(cfg, "input_layernorm")
    variables = {"params": {"scale": jnp.ones(64, jnp.float32)}}
    text = jax.jit(lambda a: mod.apply(variables, a)).lower(jnp.ones((40, 64), jnp.float32)).as_text()
    assert "@row_moments" in text
    monkeypatch.setenv(layers.NORM_ENV, "split")
    with pytest.raises(ValueError, match="PAGEDJAX_BATCH_INVARIANT_NORM"):
        EngineConfig(batch_invariant=True, tensor_parallel_size=1).model_config(base)


def test_the_norm_kernel_is_the_gpu_default_at_tensor_parallel_size_1(monkeypatch):
    """Unset, PAGEDJAX_BATCH_INVARIANT_NORM means the kernel on a GPU at tensor-parallel size 1 and
    the row tiles elsewhere (the CPU, larger sizes); asked for at a larger size on a GPU, the
    kernel is refused by name (interpreted on the CPU, it runs at any size)."""
    import jax

    from pagedjax.models import layers

    monkeypatch.delenv(layers.NORM_ENV, raising=False)
    assert layers.invariant_norm_method(1) == "tiles"  # this machine: the CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert layers.invariant_norm_method(1) == "kernel"
    assert layers.invariant_norm_method(2) == "tiles"
    monkeypatch.setenv(layers.NORM_ENV, "kernel")
    with pytest.raises(ValueError, match="PAGEDJAX_BATCH_INVARIANT_NORM=kernel runs at tensor_parallel_size 1"):
        layers.invariant_norm_method(2)
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert layers.invariant_norm_method(3) == "kernel"
