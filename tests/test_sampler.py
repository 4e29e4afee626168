"""The on-device sampler against independent float64 numpy computations (vLLM V1 semantics)."""

import dataclasses
import functools

import jax
import numpy as np
import pytest
from scipy import stats

from pagedjax import sampler as S
from pagedjax.sampling_metadata import make_sampling_metadata, static_flags
from pagedjax.sampling_params import SamplingParams

_sample = jax.jit(S.sample, static_argnames=("flags", "num_logprobs"))


def sample(logits, meta: S.SamplingMetadata, num_logprobs: int = 0) -> S.SamplerOutput:
    """The production path: the batch's static flags from its numpy metadata, then the device."""
    return _sample(logits, meta, flags=static_flags(meta), num_logprobs=num_logprobs)


@jax.jit
def allowed_mask(x, top_k, top_p, min_p):
    """The mask the sampler draws from (every filter compiled in; each row's values decide)."""
    return S._combine(x, *S._thresholds(x, top_k, top_p, min_p, S.SampleFlags()))


def params(**kw) -> SamplingParams:
    """vLLM's SamplingParams (its defaults), overridden by `kw`."""
    return SamplingParams(**kw)


def meta_for(ps, outputs=None, *, num_rows=None, prompts=None, **kw) -> S.SamplingMetadata:
    outputs = outputs if outputs is not None else [[] for _ in ps]
    return make_sampling_metadata(ps, outputs, num_rows=num_rows or len(ps), prompt_token_ids=prompts, **kw)


# --- float64 numpy oracles, written from vLLM's description, not from pagedjax ----------------------


def np_softmax(x):
    z = np.exp(x - x.max())
    return z / z.sum()


def np_allowed(x, top_k, top_p, min_p):
    """vLLM V1: min-p on the softmax, then top-k (ties kept), then top-p by ascending sorted cumsum."""
    V = x.size
    probs = np_softmax(x)
    keep = np.ones(V, bool)
    if min_p > 0:
        keep &= probs >= min_p * probs.max()
    if 0 < top_k < V:
        keep &= x >= np.sort(x)[::-1][top_k - 1]
    if top_p < 1:
        q = np.where(keep, probs, 0.0)
        q /= q.sum()
        order = np.argsort(q, kind="stable")  # ascending
        remove = np.cumsum(q[order]) <= 1 - top_p
        remove[-1] = False
        keep[order[remove]] = False
    return keep


def np_ambiguous(x, top_k, top_p, min_p, tol=1e-5):
    """True when a float32 rounding could legitimately flip a token at the boundary."""
    probs = np_softmax(x)
    if min_p > 0 and np.any(np.abs(probs / probs.max() - min_p) < tol):
        return True
    keep = np_allowed(x, top_k, 1.0, min_p)
    if top_p < 1:
        q = np.sort(np.where(keep, probs, 0.0) / np.where(keep, probs, 0.0).sum())
        if np.any(np.abs(np.cumsum(q) - (1 - top_p)) < tol):
            return True
    return False


def np_penalize(logits, prompt, output, rp, fp, pp):
    x = logits.astype(np.float64).copy()
    counts = np.bincount(np.asarray(output, np.int64), minlength=x.size).astype(np.float64)
    seen = counts > 0
    seen[list(prompt)] = True
    x[seen] = np.where(x[seen] > 0, x[seen] / rp, x[seen] * rp)
    return x - fp * counts - pp * (counts > 0)


def np_log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


# --- tests -------------------------------------------------------------------------------------------


def test_greedy_equals_temperature_zero_equals_top_k_one():
    rng = np.random.default_rng(0)
    R, V = 24, 97
    logits = rng.normal(size=(R, V)).astype(np.float32) * 3
    expected = logits.astype(np.float64).argmax(axis=1)
    greedy = sample(logits, meta_for([params(temperature=0.0) for _ in range(R)])).token_ids
    top1 = sample(logits, meta_for([params(temperature=1.3, top_k=1, seed=s) for s in range(R)])).token_ids
    mixed = [params(temperature=0.0) if r % 2 else params(temperature=0.9, top_k=1, top_p=0.5)
             for r in range(R)]
    np.testing.assert_array_equal(greedy, expected)
    np.testing.assert_array_equal(top1, expected)
    np.testing.assert_array_equal(sample(logits, meta_for(mixed)).token_ids, expected)


def test_allowed_mask_matches_numpy_on_random_rows():
    rng = np.random.default_rng(1)
    R, V = 384, 301
    x = (rng.normal(size=(R, V)) * rng.uniform(0.3, 6.0, size=(R, 1))).astype(np.float32)
    # each filter alone, in pairs and all three; off values include -1, 0 and >= V for top_k
    use = rng.integers(0, 8, size=R)
    top_k = np.where(use & 1, rng.integers(1, V + 3, size=R), rng.choice([0, -1], size=R)).astype(np.int32)
    top_p = np.where(use & 2, rng.uniform(0.02, 1.0, size=R), 1.0).astype(np.float32)
    min_p = np.where(use & 4, rng.uniform(0.0, 0.6, size=R), 0.0).astype(np.float32)
    got = np.asarray(allowed_mask(x, top_k, top_p, min_p))
    checked = 0
    for r in range(R):
        args = (x[r].astype(np.float64), int(top_k[r]), float(top_p[r]), float(min_p[r]))
        if np_ambiguous(*args):
            continue
        checked += 1
        np.testing.assert_array_equal(got[r], np_allowed(*args), err_msg=f"row {r}: k, p, min_p = {args[1:]}")
    assert checked >= 0.95 * R
    assert got.sum(axis=1).min() >= 1  # never empty


def test_allowed_mask_edge_cases():
    x = np.array([[3.0, 2.0, 2.0, 2.0, 1.0, -np.inf]] * 4, np.float32)
    top_k = np.array([2, 6, 0, 0], np.int32)
    top_p = np.array([1.0, 1.0, 1e-7, 1.0], np.float32)
    min_p = np.array([0.0, 0.0, 0.0, 1.0], np.float32)
    got = np.asarray(allowed_mask(x, top_k, top_p, min_p))
    np.testing.assert_array_equal(got[0], [1, 1, 1, 1, 0, 0])  # ties with the k-th value are kept
    np.testing.assert_array_equal(got[1], [1, 1, 1, 1, 1, 0])  # a banned (-inf) token never comes back
    np.testing.assert_array_equal(got[2], [1, 0, 0, 0, 0, 0])  # a tiny top_p keeps the best token
    np.testing.assert_array_equal(got[3], [1, 0, 0, 0, 0, 0])  # min_p = 1 keeps only the max


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=1.0),
        dict(temperature=0.7, top_k=9),
        dict(temperature=1.2, top_p=0.8),
        dict(temperature=0.9, min_p=0.08),
        dict(temperature=0.8, top_k=12, top_p=0.9, min_p=0.02),
    ],
)
def test_sampled_frequencies_follow_masked_softmax(kw):
    rng = np.random.default_rng(2)
    V, N = 40, 12000
    logits = (rng.normal(size=V) * 1.5).astype(np.float32)
    x = logits.astype(np.float64) / kw["temperature"]
    keep = np_allowed(x, kw.get("top_k", 0), kw.get("top_p", 1.0), kw.get("min_p", 0.0))
    assert not np_ambiguous(x, kw.get("top_k", 0), kw.get("top_p", 1.0), kw.get("min_p", 0.0))
    expected = np.where(keep, np_softmax(x), 0.0)
    expected /= expected.sum()
    # half the draws vary the seed, half the step of one seed
    meta = meta_for([params(**kw, seed=s) for s in range(N // 2)] + [params(**kw, seed=7)] * (N // 2))
    meta = meta.replace(steps=np.concatenate([np.zeros(N // 2), np.arange(N // 2)]).astype(np.int32))
    ids = np.asarray(sample(np.broadcast_to(logits, (N, V)), meta).token_ids)
    counts = np.bincount(ids, minlength=V)
    assert counts[~keep].sum() == 0  # a masked token is never sampled
    assert (counts[N * expected >= 20] > 0).all()  # an allowed one is (a miss has odds e^-20)
    big = N * expected >= 5  # chi-square wants >= 5 expected per bin: pool the rare tokens
    observed = np.append(counts[big], counts[keep & ~big].sum())
    wanted = np.append(N * expected[big], N * expected[keep & ~big].sum())
    keep_bins = wanted > 0
    _, pvalue = stats.chisquare(observed[keep_bins], wanted[keep_bins])
    assert pvalue > 1e-3, (observed, wanted)


def test_penalties_match_numpy():
    rng = np.random.default_rng(3)
    R, V = 6, 50
    logits = rng.normal(size=(R, V)).astype(np.float32) * 2
    prompts = [list(rng.integers(0, V, size=rng.integers(1, 12))) for _ in range(R)]
    outputs = [list(rng.integers(0, V, size=rng.integers(0, 20))) for _ in range(R)]
    ps = [
        params(repetition_penalty=1.5),
        params(repetition_penalty=0.7),
        params(frequency_penalty=0.4),
        params(presence_penalty=-0.8),
        params(repetition_penalty=1.2, frequency_penalty=-0.3, presence_penalty=0.6),
        params(),
    ]
    meta = meta_for(ps, outputs, prompts=prompts)
    got = np.asarray(jax.jit(S._apply_penalties)(logits, meta))
    for r, p in enumerate(ps):
        want = np_penalize(logits[r], prompts[r], outputs[r],
                           p.repetition_penalty, p.frequency_penalty, p.presence_penalty)
        np.testing.assert_allclose(got[r], want, rtol=1e-6, atol=1e-6)
    # greedy rows take the argmax of the penalized logits
    greedy = [dataclasses.replace(p, temperature=0.0) for p in ps]
    ids = sample(logits, meta_for(greedy, outputs, prompts=prompts)).token_ids
    want = [np_penalize(logits[r], prompts[r], outputs[r], p.repetition_penalty, p.frequency_penalty,
                        p.presence_penalty).argmax() for r, p in enumerate(ps)]
    np.testing.assert_array_equal(ids, want)


def test_min_tokens_bans_stop_tokens():
    V = 10
    logits = np.tile(np.arange(V, dtype=np.float32) * 5, (4, 1))  # token 9 best, then 8, 7
    ps = [
        params(temperature=0.0, min_tokens=3, stop_token_ids=[8]),
        params(temperature=0.0, min_tokens=3, stop_token_ids=[8]),
        params(temperature=0.0, min_tokens=3, ignore_eos=True),
        params(temperature=1.0, min_tokens=3, stop_token_ids=[8], seed=0),
    ]
    meta = meta_for(ps, [[1, 2], [1, 2, 3], [], [5]], eos_token_id=9)
    np.testing.assert_array_equal(sample(logits, meta).token_ids, [7, 9, 9, 7])


def test_logprobs_match_numpy():
    rng = np.random.default_rng(4)
    R, V, k = 8, 120, 21  # past 16 the top-k is taken in rounds
    logits = (rng.normal(size=(R, V)) * 4).astype(np.float32)
    ps = [params(temperature=0.0) if r % 2 else params(temperature=1.0, repetition_penalty=2.0, seed=r)
          for r in range(R)]
    meta = meta_for(ps, [[0, 1, 2]] * R, prompts=[[3, 4]] * R)
    out = sample(logits, meta, num_logprobs=k)
    ref = np_log_softmax(logits)  # raw: before penalties and temperature
    ids = np.asarray(out.token_ids)
    np.testing.assert_allclose(out.logprobs, ref[np.arange(R), ids], atol=1e-5)
    np.testing.assert_array_equal(out.top_token_ids, np.argsort(-ref, axis=1)[:, :k])
    np.testing.assert_allclose(out.top_logprobs, -np.sort(-ref, axis=1)[:, :k], atol=1e-5)
    np.testing.assert_array_equal(out.ranks, (ref >= ref[np.arange(R), ids][:, None]).sum(axis=1))
    none = sample(logits, meta)
    np.testing.assert_array_equal(none.token_ids, out.token_ids)
    assert none.top_logprobs.shape == (R, 0)


def test_same_seed_and_step_same_token_whatever_the_batch():
    rng = np.random.default_rng(5)
    V = 1000
    row = rng.normal(size=V).astype(np.float32) * 0.3  # near uniform: a different key gives a different token
    mine = params(temperature=1.0, top_p=0.95, seed=1234)
    out = list(range(7))

    def token_at(position, num_rows, neighbours):
        ps = neighbours[:position] + [mine] + neighbours[position:]
        outs = [[]] * position + [out] + [[]] * (len(ps) - position - 1)
        logits = rng.normal(size=(num_rows, V)).astype(np.float32)
        logits[position] = row
        return int(sample(logits, meta_for(ps, outs, num_rows=num_rows)).token_ids[position])

    a = token_at(0, 4, [params(temperature=0.0), params(top_k=5, seed=1)])
    b = token_at(5, 8, [params(min_p=0.1), params(temperature=0.0)] * 3)  # other neighbours, other bucket
    c = token_at(2, 8, [params(presence_penalty=1.0)] * 5)
    assert a == b == c

    def tokens(seeds, steps):
        ps = [params(temperature=1.0, seed=s) for s in seeds]
        meta = meta_for(ps).replace(steps=np.asarray(steps, np.int32))
        return np.asarray(sample(np.broadcast_to(row, (len(ps), V)), meta).token_ids)

    assert len(set(tokens(range(64), [0] * 64))) > 40  # different seeds differ
    assert len(set(tokens([3] * 64, range(64)))) > 40  # so do different steps of one seed
    np.testing.assert_array_equal(tokens([3] * 4, [9] * 4), tokens([3] * 4, [9] * 4)[0])


def test_unseeded_rows_are_random():
    ps = [params(temperature=1.0)] * 64
    row = np.zeros((64, 1000), np.float32)
    assert len(set(np.asarray(sample(row, meta_for(ps)).token_ids))) > 40


def test_no_recompile_across_parameter_mixes():
    # Every filter compiled in (the flags only ever leave out work): values are arrays, no recompile.
    fn = jax.jit(functools.partial(S.sample, num_logprobs=2, flags=S.SampleFlags()))
    rng = np.random.default_rng(6)
    R, V = 8, 64
    mixes = [
        [params(temperature=0.0)] * 5,
        [params(top_k=3, seed=1), params(temperature=0.0), params(top_p=0.5)],
        [params(min_p=0.3, repetition_penalty=1.4), params(frequency_penalty=0.5, presence_penalty=0.1)] * 4,
        [params(top_k=1, top_p=0.1, min_p=0.9, seed=2, min_tokens=4, stop_token_ids=[1, 2])],
        [params(temperature=2.0)] * 8,
    ]
    for ps in mixes:
        meta = meta_for(ps, [[1, 2, 3]] * len(ps), num_rows=R, prompts=[[4, 5]] * len(ps),
                        eos_token_id=0, penalty_width=16, banned_width=4)
        fn(rng.normal(size=(R, V)).astype(np.float32), meta).token_ids.block_until_ready()
    assert fn._cache_size() == 1


def test_make_sampling_metadata_pads_and_buckets():
    meta = meta_for([params(temperature=0.5, top_k=-1, seed=2**32 + 5, repetition_penalty=1.1)],
                    [[7] * 20], num_rows=4, prompts=[[3, 3, 2]])
    np.testing.assert_array_equal(meta.temperature, [0.5, 0, 0, 0])  # padding rows are greedy
    assert meta.seeds[0] == 5 and meta.steps[0] == 20
    assert meta.penalty_token_ids.shape == (4, 32)  # 2 distinct prompt tokens + 20 outputs -> 32
    np.testing.assert_array_equal(meta.penalty_token_ids[0, :22], [2, 3] + [7] * 20)
    assert meta.num_prompt_tokens[0] == 2 and (meta.penalty_token_ids[1:] == -1).all()
    assert meta_for([params()], num_rows=2).penalty_token_ids.shape == (2, 0)
    assert meta_for([params()], num_rows=2).banned_token_ids.shape == (2, 0)
    with pytest.raises(ValueError, match="prompt_token_ids"):
        meta_for([params(repetition_penalty=1.2)])
    with pytest.raises(ValueError, match="penalty_width"):
        meta_for([params(presence_penalty=1.0)], [[1] * 20], penalty_width=16)
    with pytest.raises(ValueError, match="rows"):
        meta_for([params()] * 3, num_rows=2)


def test_make_sampling_metadata_mixed_rows_column_by_column():
    """Every column of a batch mixing beam-search, seeded, unseeded, min_tokens and logit_bias
    rows, written out by hand; unseeded rows draw from the rng in row order; a params object
    used twice, and one derived from it by for_sample, each give their own values."""
    from pagedjax.sampling_params import BeamSearchParams

    seeded = params(temperature=0.7, top_p=0.9, seed=-3 + 2**40)
    ps = [
        BeamSearchParams(beam_width=2, max_tokens=8),
        seeded,
        params(temperature=1.0, top_k=5, min_p=0.1),  # unseeded
        params(temperature=0.0, min_tokens=3, stop_token_ids=[9]),  # greedy, bans 9 and EOS for now
        params(temperature=1.0, logit_bias={4: 2.5}),  # unseeded
        seeded,
        seeded.for_sample(2),
    ]
    outputs = [[1], [1, 2], [], [5], [], [6], [7]]
    rng = np.random.default_rng(11)
    meta = make_sampling_metadata(ps, outputs, num_rows=8, num_pending=[0, 1, 0, 1, 0, 0, 0], eos_token_id=2,
                                  rng=np.random.default_rng(11))
    draws = rng.integers(0, 2**32, size=3)  # rows 2, 3 (greedy rows draw too: unused) and 4
    np.testing.assert_allclose(meta.temperature, [0, 0.7, 1, 0, 1, 0.7, 0.7, 0], rtol=0, atol=1e-7)
    np.testing.assert_array_equal(meta.top_k, [0, 0, 5, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(meta.top_p, [1, 0.9, 1, 1, 1, 0.9, 0.9, 1], rtol=0, atol=1e-7)
    np.testing.assert_allclose(meta.min_p, [0, 0, 0.1, 0, 0, 0, 0, 0], rtol=0, atol=1e-7)
    seed = (2**40 - 3) % 2**32
    np.testing.assert_array_equal(meta.seeds, [0, seed, *draws, seed, (seed + 2) % 2**32, 0])
    np.testing.assert_array_equal(meta.steps, [1, 3, 0, 2, 0, 1, 1, 0])
    assert meta.banned_token_ids.shape == (8, 16)
    assert sorted(meta.banned_token_ids[3][meta.banned_token_ids[3] >= 0].tolist()) == [2, 9]
    assert (np.delete(meta.banned_token_ids, 3, axis=0) == -1).all()
    assert meta.bias_token_ids[4, 0] == 4 and meta.bias_values[4, 0] == 2.5
    assert (np.delete(meta.bias_token_ids, 4, axis=0) == -1).all()
    assert meta.penalty_token_ids.shape == (8, 0)
    # Once min_tokens are out (3 outputs with the pending one), nothing is banned.
    later = make_sampling_metadata(ps[3:4], [[5, 6]], num_rows=1, num_pending=[1], eos_token_id=2)
    assert later.banned_token_ids.shape == (1, 0)
