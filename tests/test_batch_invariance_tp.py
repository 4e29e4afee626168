"""batch_invariant=True at tensor_parallel_size 3: SmolLM2's 9 heads and 3 kv heads split over 3 of
the 8 fake CPU devices, with the attention custom call and with the pure-jnp reference. The probe
and its checks are tests/test_batch_invariance.py's (tests/invariance_cases.py)."""

import pytest

import pagedjax as pj
from tests.invariance_cases import SMOLLM2_ENGINE as ENGINE
from tests.invariance_cases import run, same, smollm2_params, smollm2_probe


@pytest.fixture(scope="module")
def params():
    return smollm2_params()


@pytest.fixture(scope="module")
def probe(params) -> list[int]:
    return smollm2_probe(params)


def test_tensor_parallel(params, probe):
    """At tensor_parallel_size 3 (SmolLM2's 9 heads and 3 kv heads split over 3 of the 8 fake CPU
    devices): alone, beside 8 and 32 strangers and in chunks of 72 tokens, the same numbers with
    the flag and different ones without. The reference is the probe alone at the same size:
    across sizes the partial sums are added in another order, which the mode does not promise."""
    tp = dict(ENGINE, tensor_parallel_size=3)
    for bi in (True, False):
        alone = run(pj.LLM(params, batch_invariant=bi, **tp), probe)
        llm = pj.LLM(params, batch_invariant=bi, **tp)
        runs = [run(llm, probe, n, seed=n) for n in (8, 32)]
        runs.append(run(pj.LLM(params, batch_invariant=bi, **{**tp, "max_num_batched_tokens": 72}), probe, 8, seed=3))
        if bi:
            assert all(same(r, alone) for r in runs)
        else:
            assert not all(same(r, alone) for r in runs)


def test_tensor_parallel_reference_attention(params, probe):
    """The pure-jnp attention (what runs where the extension is not built) at tensor_parallel_size 3:
    its sums are compiled by XLA per shape, so it keeps a token's numbers only if it attends in
    blocks of a fixed size whatever the batch. Alone, beside 8 strangers and in chunks of 72."""
    tp = dict(ENGINE, tensor_parallel_size=3, attn_impl="reference")
    alone = run(pj.LLM(params, batch_invariant=True, **tp), probe)
    runs = [run(pj.LLM(params, batch_invariant=True, **tp), probe, 8, seed=8),
            run(pj.LLM(params, batch_invariant=True, **{**tp, "max_num_batched_tokens": 72}), probe, 8, seed=3)]
    assert all(same(r, alone) for r in runs)
