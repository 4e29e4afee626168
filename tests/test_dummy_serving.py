"""vLLM's `--load-format dummy` with `--tokenizer` a vocab-only GGUF: random weights of a config
serve real text, and the server gives what the offline engine gives for the same seed.

The config is a tiny Llama with Llama-3's vocabulary (128,256 ids); the tokenizer is llama.cpp's
vocab-only `ggml-vocab-llama-bpe.gguf` (Llama-3's BPE), checked against llama.cpp's own expected
ids. The oracle for the server is the offline `LLM` on the same folder, dtype and seed: the
weights are drawn from the seed on each side, so equal tokens need equal weights, tokenizer and
sampling on both.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests.server_process import serve

VOCAB = "llama-bpe"
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a land far away,"]
MAX_TOKENS = 12
SEED = 1234
ENGINE = {"max_model_len": 128, "max_num_seqs": 4, "max_num_batched_tokens": 64, "num_pages": 64}


def _vocab_file(name: str = VOCAB) -> Path:
    folder = os.environ.get("PAGEDJAX_LLAMA_CPP_VOCABS")
    if not folder:
        pytest.fail("PAGEDJAX_LLAMA_CPP_VOCABS is not set (tools/test.sh sets it); to run this file directly: "
                    'export PAGEDJAX_LLAMA_CPP_VOCABS="$(bash tools/llama_cpp_vocabs.sh)"')
    path = Path(folder) / f"ggml-vocab-{name}.gguf"
    assert path.is_file(), f"{path} is missing"
    return path


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory) -> Path:
    """A folder with only a config.json: a 2-layer Llama of Llama-3's vocabulary (no weights, no tokenizer)."""
    d = tmp_path_factory.mktemp("tiny-llama3-config")
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "tie_word_embeddings": False, "bos_token_id": 128000,
        "eos_token_id": 128001, "torch_dtype": "float32"}))
    return d


@pytest.fixture(scope="module")
def offline(config_dir):
    import jax.numpy as jnp

    import pagedjax as pj

    return pj.LLM(str(config_dir), dtype=jnp.float32, load_format="dummy", tokenizer=str(_vocab_file()),
                  seed=SEED, **ENGINE)


def test_the_gguf_tokenizer_is_llama3s(offline):
    """The vocab-only GGUF tokenizes as llama.cpp says Llama-3's tokenizer does (its test vectors)."""
    path = _vocab_file()
    texts = Path(f"{path}.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")[:-1]
    expected = Path(f"{path}.out").read_text().split("\n")[:-1]
    assert len(texts) == len(expected) > 40
    for text, ids in zip(texts, expected, strict=True):
        assert offline.tokenizer.encode(text, add_special_tokens=False) == [int(i) for i in ids.split()], text


def test_dummy_weights_come_from_the_seed(config_dir):
    """Same seed, same weights; another seed, other weights (so matching outputs below mean something)."""
    import jax
    import jax.numpy as jnp

    from pagedjax.dummy_weights import dummy_params

    a, b, c = (dummy_params(str(config_dir), dtype=jnp.float32, seed=s) for s in (SEED, SEED, SEED + 1))
    la, lb, lc = (jax.tree_util.tree_leaves(p) for p in (a, b, c))
    assert len(la) == len(lb) == len(lc) > 0
    shapes = {tuple(x.shape) for x in la}
    assert (128256, 64) in shapes, shapes  # the config's vocabulary and hidden size
    for x, y, z in zip(la, lb, lc, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        if np.asarray(x).std() > 0:  # norm scales are ones under every seed
            assert not np.array_equal(np.asarray(x), np.asarray(z))


@pytest.mark.parametrize("mode", [["--no-engine-process"], []], ids=["engine-thread", "engine-process"])
def test_server_gives_the_offline_outputs(offline, config_dir, tmp_path, mode):
    """Offline and through the server, in both process modes (the front end's tokenizer is then
    a copy of the engine core's)."""
    import pagedjax as pj

    greedy = pj.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    sampled = [pj.SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, top_p=0.9, seed=7 + i, ignore_eos=True)
               for i in range(len(PROMPTS))]
    want_greedy = offline.generate(PROMPTS, greedy)
    want_sampled = offline.generate(PROMPTS, sampled)
    assert len({o.outputs[0].text for o in want_greedy}) == len(PROMPTS)  # not one degenerate output
    engine_args = [a for k, v in ENGINE.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    with serve(config_dir, tmp_path / "server.log", "--load-format", "dummy", "--tokenizer", str(_vocab_file()),
               "--seed", str(SEED), *engine_args, *mode) as srv:
        client = srv.client()
        for i, prompt in enumerate(PROMPTS):
            ids = srv.http.post("/tokenize", json={"model": srv.model, "prompt": prompt}).json()["tokens"]
            assert ids == list(want_greedy[i].prompt_token_ids), prompt
            r = client.completions.create(model=srv.model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0,
                                          extra_body={"ignore_eos": True})
            assert r.choices[0].text == want_greedy[i].outputs[0].text, prompt
            assert r.usage.completion_tokens == len(want_greedy[i].outputs[0].token_ids) == MAX_TOKENS
            r = client.completions.create(model=srv.model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=1.0,
                                          top_p=0.9, seed=7 + i, extra_body={"ignore_eos": True})
            assert r.choices[0].text == want_sampled[i].outputs[0].text, prompt
        srv.assert_healthy()
