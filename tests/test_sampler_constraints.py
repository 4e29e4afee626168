"""The sampler's token controls against float64 numpy oracles: the allowed-token bitmask
(structured outputs, allowed_token_ids), logit_bias and bad words (vLLM's semantics).

Bitmasks here are packed by numpy (`np.packbits`, little bit order) from random boolean rows,
not by the code under test. Order checked: bitmask, then logprobs (a masked token's is -inf, as
in vLLM V1 where the grammar mask precedes the sampler), then bans and bias (raw logprobs do not
see them), then temperature and the filters.
"""

import jax
import numpy as np
import pytest
from scipy import stats

from pagedjax import sampler as S
from pagedjax.sampling_metadata import bad_word_bans, make_sampling_metadata, needs_token_history, static_flags
from pagedjax.sampling_params import SamplingParams
from pagedjax.structured_outputs.manager import token_row

_sample = jax.jit(S.sample, static_argnames=("flags", "num_logprobs"))


def sample(logits, meta, bitmask=None, num_logprobs=0):
    flags = static_flags(meta)._replace(bitmask=bitmask is not None)
    return _sample(logits, meta, flags=flags, num_logprobs=num_logprobs, token_bitmask=bitmask)


def pack_rows(allowed: np.ndarray) -> np.ndarray:
    """Boolean [R, V] -> int32 [R, ceil(V / 32)] with numpy alone (bit j of word w = token 32w + j)."""
    R, V = allowed.shape
    W = -(-V // 32)
    padded = np.zeros((R, W * 32), bool)
    padded[:, :V] = allowed
    return np.packbits(padded, axis=1, bitorder="little").view(np.int32)


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def random_allowed(rng, R, V):
    """Rows of every density: a single token, sparse, dense, all (unconstrained)."""
    density = rng.choice([0.0, 0.02, 0.3, 0.9, 1.0], size=R)
    allowed = rng.random((R, V)) < density[:, None]
    allowed[np.arange(R), rng.integers(0, V, R)] = True  # never empty
    return allowed


def test_token_row_matches_numpy_packing():
    rng = np.random.default_rng(10)
    for V in (32, 33, 300, 4097):
        ids = rng.choice(V, size=int(rng.integers(1, V)), replace=False)
        allowed = np.zeros((1, V), bool)
        allowed[0, ids] = True
        np.testing.assert_array_equal(token_row(ids.tolist(), -(-V // 32)), pack_rows(allowed)[0], err_msg=f"V={V}")


def test_bitmask_greedy_sampled_and_logprobs():
    seed = 11
    rng = np.random.default_rng(seed)
    R, V, k = 24, 301, 3  # V not a multiple of 32: the last word is partial
    logits = (rng.normal(size=(R, V)) * 3).astype(np.float32)
    allowed = random_allowed(rng, R, V)
    allowed[:, :k] = True  # at least k allowed per row, for the top logprobs
    ps = [SamplingParams(temperature=0.0) if r % 2 else SamplingParams(temperature=1.0, seed=r) for r in range(R)]
    out = sample(logits, make_sampling_metadata(ps, [[]] * R, num_rows=R), pack_rows(allowed), num_logprobs=k)
    ids = np.asarray(out.token_ids)
    masked = np.where(allowed, logits.astype(np.float64), -np.inf)
    assert allowed[np.arange(R), ids].all(), f"seed={seed}: a masked token was sampled"
    np.testing.assert_array_equal(ids[1::2], masked[1::2].argmax(axis=1), err_msg=f"seed={seed}")
    ref = np_log_softmax(masked)  # the constrained distribution, before temperature
    np.testing.assert_allclose(out.logprobs, ref[np.arange(R), ids], atol=1e-5, err_msg=f"seed={seed}")
    np.testing.assert_array_equal(out.top_token_ids, np.argsort(-ref, axis=1, kind="stable")[:, :k])
    np.testing.assert_allclose(out.top_logprobs, -np.sort(-ref, axis=1)[:, :k], atol=1e-5)
    np.testing.assert_array_equal(out.ranks, (ref >= ref[np.arange(R), ids][:, None]).sum(axis=1))


def test_sampled_frequencies_follow_the_allowed_softmax():
    seed = 12
    rng = np.random.default_rng(seed)
    V, N, temperature = 70, 12000, 0.8
    logits = (rng.normal(size=V) * 1.5).astype(np.float32)
    allowed = rng.random(V) < 0.5
    allowed[np.argmax(logits)] = False  # the model's favourite is forbidden
    x = logits.astype(np.float64) / temperature
    expected = np.where(allowed, np.exp(x - x.max()), 0.0)
    expected /= expected.sum()
    meta = make_sampling_metadata([SamplingParams(temperature=temperature, seed=s) for s in range(N)],
                                  [[]] * N, num_rows=N)
    ids = np.asarray(sample(np.broadcast_to(logits, (N, V)), meta, np.broadcast_to(pack_rows(allowed[None]), (N, 3))
                            ).token_ids)
    counts = np.bincount(ids, minlength=V)
    assert counts[~allowed].sum() == 0, f"seed={seed}"
    big = N * expected >= 5
    observed = np.append(counts[big], counts[allowed & ~big].sum())
    wanted = np.append(N * expected[big], N * expected[allowed & ~big].sum())
    keep = wanted > 0
    _, pvalue = stats.chisquare(observed[keep], wanted[keep])
    assert pvalue > 1e-3, (seed, observed, wanted)


def test_logit_bias_adds_after_the_raw_logprobs():
    seed = 13
    rng = np.random.default_rng(seed)
    R, V = 6, 97
    logits = (rng.normal(size=(R, V)) * 2).astype(np.float32)
    sizes = [20, *rng.integers(1, 20, size=R - 3)]  # 20: a width of 32 (powers of two from 16)
    biases = [{int(t): float(rng.uniform(-5, 5)) for t in rng.choice(V, size=int(n), replace=False)} for n in sizes]
    runner_up = np.argsort(-logits, axis=1)
    biases.append({int(runner_up[R - 2, 0]): -100.0})  # bans the model's choice
    biases.append({int(runner_up[R - 1, -1]): 100.0})  # forces its least likely token
    ps = [SamplingParams(temperature=0.0, logit_bias=b) for b in biases]
    meta = make_sampling_metadata(ps, [[]] * R, num_rows=R)
    assert meta.bias_token_ids.shape == (R, 32)
    out = sample(logits, meta, num_logprobs=2)
    want = logits.astype(np.float64).copy()
    for r, b in enumerate(biases):
        for t, v in b.items():
            want[r, t] += v
    np.testing.assert_array_equal(out.token_ids, want.argmax(axis=1), err_msg=f"seed={seed}")
    assert out.token_ids[R - 2] == runner_up[R - 2, 1] and out.token_ids[R - 1] == runner_up[R - 1, -1]
    ref = np_log_softmax(logits)  # raw: the bias does not show in logprobs
    np.testing.assert_allclose(out.logprobs, ref[np.arange(R), np.asarray(out.token_ids)], atol=1e-5)
    # A bias never brings back a token the bitmask forbids.
    allowed = np.ones((R, V), bool)
    allowed[R - 1, runner_up[R - 1, -1]] = False
    ids = np.asarray(sample(logits, meta, pack_rows(allowed)).token_ids)
    assert ids[R - 1] != runner_up[R - 1, -1]
    np.testing.assert_array_equal(ids[:R - 1], want[:R - 1].argmax(axis=1))


def test_logit_bias_values_are_clamped_and_checked():
    sp = SamplingParams(logit_bias={5: 250, 6: -1e9, 7: 3})
    assert sp.logit_bias == {5: 100.0, 6: -100.0, 7: 3.0}
    for bad in ({-1: 1.0}, {"5": 1.0}, {5: float("nan")}, {5: "x"}, [5]):
        with pytest.raises(ValueError, match="logit_bias"):
            SamplingParams(logit_bias=bad)


def test_bad_words_follow_vllm():
    # vLLM's rule, written out: a word's last token is banned when the output ends with the rest
    # of the word; a one-token word always; a word longer than the output + 1 never.
    words = [[7], [3, 4], [1, 2, 9], [5, 5]]
    assert sorted(bad_word_bans(words, [])) == [7]
    assert sorted(bad_word_bans(words, [3])) == [4, 7]
    assert sorted(bad_word_bans(words, [0, 1, 2])) == [7, 9]
    assert sorted(bad_word_bans(words, [5, 5])) == [5, 7]
    assert sorted(bad_word_bans(words, [2, 1])) == [7]
    one = SamplingParams(_bad_words_token_ids=[[7]])
    several = SamplingParams(_bad_words_token_ids=[[7], [3, 4]])
    assert not needs_token_history(one) and needs_token_history(several)
    meta = make_sampling_metadata([several, one, SamplingParams()], [[0, 3], [3], [3]], num_rows=4)
    assert sorted(set(meta.banned_token_ids[0].tolist()) - {-1}) == [4, 7]
    assert sorted(set(meta.banned_token_ids[1].tolist()) - {-1}) == [7]
    assert (meta.banned_token_ids[2:] == -1).all()
    logits = np.tile(np.arange(10, dtype=np.float32), (4, 1))  # 9 is best
    with_nine = SamplingParams(temperature=0.0, _bad_words_token_ids=[[9], [8]])
    meta = make_sampling_metadata([with_nine], [[]], num_rows=4)
    assert int(sample(logits, meta).token_ids[0]) == 7


def test_bad_words_tokenize_as_vllm(tmp_path):
    """vLLM's update_from_tokenizer: each word as written (leading spaces stripped), plus its form
    after a space when that is another token sequence of the same length."""
    from pagedjax.tokenizer import load_tokenizer
    from tests.tiny_tokenizer import make_test_tokenizer

    tok = load_tokenizer(make_test_tokenizer(tmp_path))
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    # In the test vocabulary "The" and " The" are one token each; "fox" is two, " fox" one.
    assert len(enc("The")) == len(enc(" The")) == 1 and enc("The") != enc(" The")
    assert len(enc("fox")) == 2 and len(enc(" fox")) == 1
    sp = SamplingParams(bad_words=["The", "  fox"]).update_from_tokenizer(tok)
    assert sp._bad_words_token_ids == [enc("The"), enc(" The"), enc("fox")]
    assert sp.bad_words == ["The", "  fox"]
    assert SamplingParams(bad_words="fox").bad_words == ["fox"]
    assert SamplingParams().update_from_tokenizer(tok)._bad_words_token_ids is None
    with pytest.raises(ValueError, match="bad_words"):
        SamplingParams(bad_words=["ok", "  "])


def test_bitmask_flag_and_array_go_together():
    meta = make_sampling_metadata([SamplingParams(temperature=0.0)], [[]], num_rows=2)
    logits = np.zeros((2, 40), np.float32)
    assert static_flags(meta).bitmask is False  # unconstrained batches: the variant without it
    with pytest.raises(ValueError, match="token_bitmask is missing"):
        S.sample(logits, meta, flags=S.SampleFlags(bitmask=True))
    with pytest.raises(ValueError, match="token_bitmask is given"):
        S.sample(logits, meta, flags=S.SampleFlags(), token_bitmask=np.full((2, 2), -1, np.int32))


def test_the_bitmask_variant_has_no_conditionals():
    """Like the other sampler variants (test_engine): no `conditional` a GPU would read back."""
    import jax.numpy as jnp

    from pagedjax.model_runner import _sample as runner_sample
    from pagedjax.model_runner import pack

    ps = [SamplingParams(temperature=0.8, top_k=5, top_p=0.9, seed=1, logit_bias={3: 2.0}), SamplingParams(temperature=0)]
    meta = make_sampling_metadata(ps, [[], []], num_rows=4)
    buf, layout = pack(meta)
    flags = static_flags(meta)._replace(bitmask=True)
    hlo = runner_sample.lower(jnp.zeros((4, 300), jnp.float32), buf, jnp.full((4, 10), -1, jnp.int32), layout=layout,
                              num_logprobs=2, flags=flags, num_slots=4).compile().as_text()
    assert " conditional(" not in hlo


@pytest.mark.gpu
def test_large_vocab_bitmask_on_the_device():
    """Qwen-sized rows (V = 151936, W = 4748) on the accelerator: greedy and sampled rows stay in
    their allowed sets, logprobs are the allowed set's log-softmax (float64 oracle)."""
    seed = 14
    rng = np.random.default_rng(seed)
    R, V = 64, 151936
    logits = (rng.normal(size=(R, V)) * 4).astype(np.float32)
    allowed = random_allowed(rng, R, V)
    ps = [SamplingParams(temperature=0.0) if r % 2 else SamplingParams(temperature=1.0, top_p=0.9, seed=r)
          for r in range(R)]
    out = sample(logits, make_sampling_metadata(ps, [[]] * R, num_rows=R), pack_rows(allowed), num_logprobs=4)
    ids = np.asarray(out.token_ids)
    masked = np.where(allowed, logits.astype(np.float64), -np.inf)
    assert allowed[np.arange(R), ids].all(), f"seed={seed}"
    np.testing.assert_array_equal(ids[1::2], masked[1::2].argmax(axis=1), err_msg=f"seed={seed}")
    ref = np_log_softmax(masked)
    np.testing.assert_allclose(out.logprobs, ref[np.arange(R), ids], atol=1e-4, err_msg=f"seed={seed}")
