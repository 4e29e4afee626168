"""The engine on the real bundled SmolLM2-135M-Instruct against HF `generate` (float32, greedy).

One run mixes what the engine does: chat prompts sharing the system prompt (prefix-cache hits),
a token budget that splits prefills into chunks, and a pool small enough to force preemption.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import transformers

import pagedjax as pj
from pagedjax.engine import EngineConfig, LLMEngine
from pagedjax.tokenizer import bundled_model_path

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "What is 12 times 7?",
    "Who wrote Romeo and Juliet?",
    "Give me a synonym for happy.",
]
MAX_NEW = 16


@pytest.fixture(scope="module")
def smollm2():
    path = str(bundled_model_path())
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    return hf, pj.load_params(dtype=np.float32, progress=False)


def test_smollm2_engine_matches_hf_generate(smollm2):
    hf, params = smollm2
    engine = LLMEngine(params, EngineConfig(max_num_seqs=4, max_num_batched_tokens=32,
                                            max_model_len=128, num_pages=10))
    prompts = [engine.chat_prompt([{"role": "user", "content": q}], tokenize=True) for q in QUESTIONS]
    sp = pj.SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
    for i, p in enumerate(prompts):
        engine.add_request(f"q{i}", p, sp)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    stats = engine.stats()
    assert stats.num_preemptions > 0, "the pool was meant to be too small for all four at once"
    assert stats.prefix_cache_hits > 0, "the shared system prompt was meant to hit the cache"
    eos = engine.eos_token_id
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=eos,
                              pad_token_id=eos)[0, len(p):].tolist()
        c = done[f"q{i}"].outputs[0]
        assert c.token_ids == ref, f"{QUESTIONS[i]!r}: {c.text!r}"
        assert c.finish_reason == ("stop" if ref[-1] == eos else "length")
    assert "Paris" in done["q0"].outputs[0].text
    assert stats.num_free_pages == stats.num_usable_pages
