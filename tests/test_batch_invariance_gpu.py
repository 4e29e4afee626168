"""batch_invariant=True on the GPU: the checks of tests/test_batch_invariance.py at Llama-3-8B's
widths (hidden 4096, MLP 14336, 32/8 heads of 128, vocabulary 128,256; 4 layers, random bf16
weights), where XLA's GPU GEMMs and reductions choose their algorithms by shape and the custom
call's tensor-core kernels and split-KV count follow the batch.

The probe (300 random token ids) runs alone on a fresh engine; then beside 8, 64 and 255 random
strangers, with its prompt in chunks of 64 and 256, after prefix-cache hits, with async scheduling
off and after preemption (recompute and swap). Tokens and top-2 logprobs are compared with ==,
greedy and seeded. Without the flag the same runs differ (the checks can fail). Marked `gpu`: skipped without CUDA.
"""

from __future__ import annotations

import numpy as np
import pytest

import pagedjax as pj
from tests.invariance_cases import reference_runs, run, same

pytestmark = pytest.mark.gpu

ENGINE = dict(max_num_seqs=256, max_model_len=1024, max_num_batched_tokens=512, precompile=False,
              enable_prefix_caching=False)


@pytest.fixture(scope="module")
def params():
    import jax.numpy as jnp

    from pagedjax.dummy_weights import random_params
    from pagedjax.models.named import NAMED_CONFIGS

    return random_params(NAMED_CONFIGS["llama3-8b"].replace(num_layers=4), dtype=jnp.bfloat16, seed=7)


@pytest.fixture(scope="module")
def probe() -> list[int]:
    return np.random.default_rng(1).integers(100, 120000, 300).tolist()


@pytest.fixture(scope="module")
def alone(params, probe):
    return reference_runs(params, probe, ENGINE)


@pytest.fixture(scope="module")
def invariant(params):
    return pj.LLM(params, batch_invariant=True, **ENGINE)


def test_run_to_run(params, probe, alone):
    """A second fresh engine, the probe alone: the same bits (tells nondeterminism from batch effects)."""
    assert same(run(pj.LLM(params, batch_invariant=True, **ENGINE), probe), alone[True])


def test_the_engine_runs_the_chosen_gemm(invariant):
    """The engine's GEMM is the one models/invariant_matmul.choose gives this GPU at tp 1 (the
    checks here cover it: PAGEDJAX_BATCH_INVARIANT_MATMUL, unset, leaves it to the engine)."""
    import os

    from pagedjax.models import invariant_matmul

    gemm = invariant.engine.runner.config.invariant_gemm
    assert gemm == invariant_matmul.choose(1)
    if invariant_matmul.IMPL_ENV not in os.environ:
        assert gemm == invariant_matmul.DEFAULT_ORDER[0]


def test_the_engine_runs_the_chosen_norm_and_attention(invariant):
    """The norms' method, the attention kernel and its fixed split size the engine runs: as the
    variables say, and with them unset the GPU defaults (the norms' kernel, the tensor-core
    attention's 16-row tiles, DEFAULT_INVARIANT_SPLIT) the tests here cover."""
    import os

    from pagedjax import attention
    from pagedjax.models import layers

    cfg = invariant.engine.runner.config
    assert cfg.invariant_norm == os.environ.get(layers.NORM_ENV, "kernel")
    assert cfg.invariant_attention == os.environ.get(attention.INVARIANT_ATTENTION_ENV, "tensor_core16")
    assert cfg.invariant_split == int(os.environ.get(attention.INVARIANT_SPLIT_ENV, attention.DEFAULT_INVARIANT_SPLIT))


@pytest.mark.parametrize("n", [8, 64, 255])
def test_beside_strangers(invariant, probe, alone, n):
    assert same(run(invariant, probe, n, seed=n), alone[True])


@pytest.mark.parametrize("chunk", [64, 256])
def test_prompt_chunking(params, probe, alone, chunk):
    llm = pj.LLM(params, batch_invariant=True, **{**ENGINE, "long_prefill_token_threshold": chunk})
    assert same(run(llm, probe, 8, seed=chunk), alone[True])


def test_prefix_cache_hits(params, probe, alone):
    llm = pj.LLM(params, batch_invariant=True, **{**ENGINE, "enable_prefix_caching": True})
    assert same(run(llm, probe), alone[True])
    hits = llm.engine.stats().prefix_cache_hits
    assert same(run(llm, probe, 8, seed=5), alone[True])
    assert llm.engine.stats().prefix_cache_hits >= hits + 2 * 288


def test_sync_scheduling(params, probe, alone):
    llm = pj.LLM(params, batch_invariant=True, **{**ENGINE, "async_scheduling": False})
    assert same(run(llm, probe, 8, seed=11), alone[True])


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption(params, probe, mode):
    """A pool too small for the probe and 8 growing strangers (as the CPU test): the probe,
    admitted last, is preempted and resumes (recomputed, or swapped back in from host memory:
    16 MiB holds 64 of these pages) with the same numbers."""
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
    llm = pj.LLM(params, batch_invariant=False, **ENGINE)
    runs = [run(llm, probe, n, seed=n) for n in (8, 64, 255)]
    assert any(not same(r, alone[False]) for r in runs)


@pytest.mark.parametrize("method", ["tiles", "kernel"])
@pytest.mark.parametrize("shape", [(4096,), (2560,), (32, 128)], ids=["hidden", "hidden-2560", "qk-heads"])
def test_norm_rows_keep_their_bits(monkeypatch, method, shape):
    """RMSNorm under batch_invariant with each PAGEDJAX_BATCH_INVARIANT_NORM method: rows taken from
    one 2048-row input give the same bits at any row count as in the 2048-row call (behind a residual
    add, as in the model), and match a float64 oracle."""
    import jax
    import jax.numpy as jnp

    from pagedjax.models import layers

    monkeypatch.setenv(layers.NORM_ENV, method)
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((2048, *shape)) * rng.uniform(0.01, 30, (2048,) + (1,) * len(shape)))
    r = rng.standard_normal((2048, *shape))
    w = rng.uniform(0.5, 1.5, shape[-1:])
    x, r = jnp.asarray(x, jnp.bfloat16), jnp.asarray(r, jnp.bfloat16)
    mod = layers.RMSNorm(eps=1e-5, batch_invariant=True)
    variables = {"params": {"scale": jnp.asarray(w, jnp.bfloat16)}}
    f = jax.jit(lambda a, b: mod.apply(variables, a + b))
    full = np.asarray(f(x, r).astype(jnp.float32))
    h = np.asarray((x + r).astype(jnp.float32), np.float64)
    want = h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + 1e-5) * np.asarray(
        jnp.asarray(w, jnp.bfloat16).astype(jnp.float32), np.float64)
    np.testing.assert_allclose(full, want, rtol=2e-2, atol=1e-2)
    for m in (1, 3, 16, 100, 128, 255, 256, 257, 1000):
        start = int(rng.integers(0, 2048 - m + 1))
        part = np.asarray(f(x[start:start + m], r[start:start + m]).astype(jnp.float32))
        assert np.array_equal(part, full[start:start + m]), (method, m)
