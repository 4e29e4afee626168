"""Tiny random HuggingFace models (saved with a tokenizer) and HF `generate` as the oracle.

Weights are large (initializer_range 0.3, perturbed norms and biases) so that a wrong layout
changes the greedy tokens.
"""

from __future__ import annotations

import numpy as np
import torch
import transformers

from tiny_tokenizer import make_test_tokenizer

VOCAB = 512  # >= 259: make_test_tokenizer needs the 256 bytes + 3 special tokens
EOS = 2  # <|im_end|> in make_test_tokenizer's vocabulary
INIT = 0.3

_COMMON = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=EOS, pad_token_id=EOS)

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(
        **_COMMON, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=256, initializer_range=INIT),
    "gpt2": lambda: transformers.GPT2Config(
        **_COMMON, n_embd=64, n_layer=2, n_head=4, n_positions=256, initializer_range=INIT),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        **_COMMON, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=256, rotary_pct=0.5, initializer_range=INIT),
    "opt": lambda: transformers.OPTConfig(
        **_COMMON, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
        max_position_embeddings=256, word_embed_proj_dim=32, init_std=INIT),
}


_SMALL = dict(_COMMON, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=128, max_position_embeddings=256, initializer_range=INIT)
# The 2024-25 families with their peculiarities on: windows of 8 (shorter than most prompts), soft-caps,
# q/k norm, biases, a head_dim of its own, local / global rotary bases, fused Phi-3 projections.
# Gemma runs HF's eager attention (its sdpa path has no soft-cap).
CONFIGS |= {
    "qwen2": lambda: transformers.Qwen2Config(**_SMALL),
    "qwen3": lambda: transformers.Qwen3Config(**_SMALL, head_dim=24, attention_bias=True),
    "mistral": lambda: transformers.MistralConfig(**_SMALL, sliding_window=8),
    "gemma2": lambda: transformers.Gemma2Config(
        **{**_SMALL, "num_hidden_layers": 3}, head_dim=16, sliding_window=8, attn_logit_softcapping=10.0,
        final_logit_softcapping=15.0, query_pre_attn_scalar=20, attn_implementation="eager"),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **{**_SMALL, "num_hidden_layers": 3}, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e5},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}),
    "phi3": lambda: transformers.Phi3Config(
        **_SMALL, sliding_window=12, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                       "partial_rotary_factor": 0.5}),
}
NEW_FAMILIES = ("qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3")
# Mixture of experts: more experts than top_k; Qwen3-MoE with a dense layer among the sparse ones.
CONFIGS |= {
    "mixtral": lambda: transformers.MixtralConfig(**_SMALL, num_local_experts=8, num_experts_per_tok=2),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **{**_SMALL, "num_hidden_layers": 3}, head_dim=24, num_experts=16, num_experts_per_tok=4,
        moe_intermediate_size=32, mlp_only_layers=[1], norm_topk_prob=False),
}
MOE_FAMILIES = ("mixtral", "qwen3_moe")


def build(arch: str, folder, seed: int = 0):
    """Builds, perturbs and saves a tiny HF model of `arch` (with a test tokenizer) in folder."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[arch]()).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(folder)
    make_test_tokenizer(folder, VOCAB)
    return model


def hf_greedy(model, prompt: list[int], max_new_tokens: int, eos: int | None = None) -> list[int]:
    """HF `generate` greedy continuation (float32); stops at `eos` (included) when given."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
            pad_token_id=EOS if eos is None else eos)
    return out[0, len(prompt):].tolist()


def random_prompts(rng: np.random.Generator, n: int, lo: int, hi: int) -> list[list[int]]:
    """n prompts of random lengths in [lo, hi] over the non-special ids."""
    return [rng.integers(3, VOCAB, size=int(rng.integers(lo, hi + 1))).tolist() for _ in range(n)]
