"""SamplingParams / BeamSearchParams: vLLM's defaults, normalization and range checks."""

import dataclasses

import pytest

from pagedjax.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams, SamplingType


def test_defaults_are_vllms():
    sp = SamplingParams()
    expected = dict(
        n=1, best_of=None, presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0,
        temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, seed=None, stop=[], stop_token_ids=[],
        ignore_eos=False, max_tokens=16, min_tokens=0, logprobs=None, prompt_logprobs=None,
        detokenize=True, skip_special_tokens=True,
        include_stop_str_in_output=False, output_kind=RequestOutputKind.CUMULATIVE,
    )  # fmt: skip
    assert {k: getattr(sp, k) for k in expected} == expected
    assert sp.sampling_type == SamplingType.RANDOM and not sp.is_greedy


def test_normalization():
    sp = SamplingParams(stop="###", stop_token_ids=[5, 3, 5], top_k=-1, seed=-1, logprobs=True, prompt_logprobs=True)
    assert sp.stop == ["###"] and sp.stop_token_ids == [5, 3]
    assert sp.top_k == 0 and sp.seed is None and sp.logprobs == 1 and sp.prompt_logprobs == 1
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(logprobs=-1).logprobs == -1  # the whole vocabulary


def test_greedy_resets_filters_and_wants_one_output():
    sp = SamplingParams(temperature=0.0, top_k=5, top_p=0.5, min_p=0.3)
    assert (sp.top_k, sp.top_p, sp.min_p) == (0, 1.0, 0.0)
    assert sp.is_greedy and sp.sampling_type == SamplingType.GREEDY
    assert SamplingParams(temperature=1e-6).is_greedy
    with pytest.raises(ValueError, match="n must be 1 when using greedy"):
        SamplingParams(temperature=0.0, n=2)
    with pytest.raises(ValueError, match="best_of"):
        SamplingParams(temperature=0.0, best_of=3)


def test_sampling_type_seeded():
    assert SamplingParams(seed=7).sampling_type == SamplingType.RANDOM_SEED
    assert SamplingParams(temperature=0, seed=7).sampling_type == SamplingType.GREEDY


@pytest.mark.parametrize(
    "kwargs, field, allowed",
    [
        (dict(n=0), "n", ">= 1"),
        (dict(n=1.5), "n", "integer"),
        (dict(n=3, best_of=2), "best_of", ">= n"),
        (dict(presence_penalty=2.5), "presence_penalty", "[-2, 2]"),
        (dict(frequency_penalty=-2.1), "frequency_penalty", "[-2, 2]"),
        (dict(repetition_penalty=0.0), "repetition_penalty", "> 0"),
        (dict(repetition_penalty=float("inf")), "repetition_penalty", "finite"),
        (dict(temperature=-0.1), "temperature", ">= 0"),
        (dict(temperature=float("nan")), "temperature", "finite"),
        (dict(top_p=0.0), "top_p", "(0, 1]"),
        (dict(top_p=1.1), "top_p", "(0, 1]"),
        (dict(top_k=-2), "top_k", ">= 1"),
        (dict(top_k=2.0), "top_k", "integer"),
        (dict(min_p=1.5), "min_p", "[0, 1]"),
        (dict(seed=1.5), "seed", "integer"),
        (dict(max_tokens=0), "max_tokens", ">= 1"),
        (dict(min_tokens=-1), "min_tokens", ">= 0"),
        (dict(max_tokens=4, min_tokens=5), "min_tokens", "<= max_tokens"),
        (dict(logprobs=-2), "logprobs", ">= 0"),
        (dict(prompt_logprobs=-3), "prompt_logprobs", ">= 0"),
        (dict(stop=["ok", ""]), "stop", "non-empty"),
        (dict(stop="x", detokenize=False), "detokenize", "True"),
        (dict(stop_token_ids=[1, -1]), "stop_token_ids", "token ids"),
        (dict(stop_token_ids=["a"]), "stop_token_ids", "token ids"),
    ],
)
def test_out_of_range_values_name_the_field_and_the_range(kwargs, field, allowed):
    with pytest.raises(ValueError) as e:
        SamplingParams(**kwargs)
    msg = str(e.value)
    assert msg.startswith(field + " must be") and allowed in msg and "got" in msg


def test_in_range_edges_are_accepted():
    SamplingParams(presence_penalty=-2, frequency_penalty=2, top_p=1.0, min_p=1.0, top_k=1, logprobs=0)
    SamplingParams(max_tokens=None, min_tokens=100)
    SamplingParams(n=4, best_of=4, temperature=0.7)


def test_for_sample_gives_each_sample_its_seed():
    sp = SamplingParams(n=3, seed=10, temperature=0.8)
    children = [sp.for_sample(i) for i in range(3)]
    assert [c.seed for c in children] == [10, 11, 12]
    assert all(c.n == 1 and c.temperature == 0.8 for c in children)
    assert SamplingParams(n=2).for_sample(1).seed is None
    assert sp.num_sequences == 3 and SamplingParams(n=2, best_of=5).num_sequences == 5


def test_frozen_and_replace_revalidates():
    sp = SamplingParams(temperature=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        sp.temperature = 1.0
    with pytest.raises(ValueError, match="top_p"):
        dataclasses.replace(sp, top_p=2.0)


def test_beam_search_params():
    bp = BeamSearchParams(beam_width=4, max_tokens=20)
    assert (bp.ignore_eos, bp.temperature, bp.length_penalty, bp.early_stopping) == (False, 0.0, 1.0, False)
    assert bp.sampling_type == SamplingType.BEAM and bp.n == 1 and bp.num_sequences == 1
    assert BeamSearchParams(beam_width=2, max_tokens=5, early_stopping="never").early_stopping == "never"
    for kwargs, field in [
        (dict(beam_width=0, max_tokens=5), "beam_width"),
        (dict(beam_width=2, max_tokens=0), "max_tokens"),
        (dict(beam_width=2, max_tokens=5, early_stopping="sometimes"), "early_stopping"),
        (dict(beam_width=2, max_tokens=5, length_penalty=float("nan")), "length_penalty"),
        (dict(beam_width=2, max_tokens=5, temperature=-1.0), "temperature"),
        (dict(beam_width=2, max_tokens=5, min_tokens=6), "min_tokens"),
    ]:
        with pytest.raises(ValueError, match=f"^{field} must be"):
            BeamSearchParams(**kwargs)


def test_generation_config_defaults(tmp_path):
    """vLLM's --generation-config: "auto" reads the model folder's generation_config.json (its
    sampling fields; max_new_tokens as max_tokens; not do_sample, token ids or unknown keys),
    "vllm" reads nothing, a folder path reads that folder's; bad values are refused by name."""
    import json

    from pagedjax.generation_config import sampling_defaults

    model = tmp_path / "model"
    model.mkdir()
    (model / "generation_config.json").write_text(json.dumps({
        "do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "bos_token_id": 1,
        "eos_token_id": [2, 3], "max_new_tokens": 512, "transformers_version": "4.51.0"}))
    want = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_tokens": 512}
    assert sampling_defaults(model) == want
    assert SamplingParams(**sampling_defaults(model)).top_k == 20
    assert sampling_defaults(model, "vllm") == {}
    assert sampling_defaults(None) == {} and sampling_defaults("named:llama3-8b") == {}
    assert sampling_defaults(tmp_path / "model.gguf") == {}  # a file: no generation config beside it
    other = tmp_path / "other"
    other.mkdir()
    (other / "generation_config.json").write_text(json.dumps({"repetition_penalty": 1.1, "min_p": 0.05}))
    assert sampling_defaults(model, str(other)) == {"repetition_penalty": 1.1, "min_p": 0.05}
    with pytest.raises(ValueError, match="'auto', 'vllm', or a folder"):
        sampling_defaults(model, str(tmp_path / "nowhere"))
    (other / "generation_config.json").write_text(json.dumps({"top_k": 2.5}))
    with pytest.raises(ValueError, match="top_k must be an int"):
        sampling_defaults(model, str(other))
