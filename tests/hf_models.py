"""Tiny random HuggingFace models (saved with a tokenizer) and HF `generate` as the oracle.

Weights are large (initializer_range 0.3, perturbed norms and biases) so that a wrong layout
changes the greedy tokens.
"""

from __future__ import annotations

import numpy as np
import torch
import transformers

from tests.tiny_tokenizer import make_test_tokenizer

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


def build(arch: str, folder, seed: int = 0, **config: object):
    """Builds, perturbs and saves a tiny HF model of `arch` (with a test tokenizer) in folder;
    `config` overrides fields of its HF config (e.g. max_position_embeddings)."""
    torch.manual_seed(seed)
    hf_config = CONFIGS[arch]()
    for name, value in config.items():
        setattr(hf_config, name, value)
    model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
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


# A Qwen2.5/Qwen3-style chat template (trimmed): tools in the system turn, assistant tool calls as
# <tool_call> JSON, tool results as <tool_response> in a user turn, enable_thinking=False closing
# an empty think block.
QWEN_STYLE_TEMPLATE = """\
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n' }}
{{- 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}
{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within '
    '<tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": <function-name>, "arguments": '
    '<args-json-object>}\\n</tool_call><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>assistant' }}
{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
{%- for tool_call in message.tool_calls or [] %}
{%- set call = tool_call.function if tool_call.function is defined else tool_call %}
{{- '\\n<tool_call>\\n{"name": "' + call.name + '", "arguments": ' + (call.arguments | tojson) + '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}
"""
CHAT_TOKENS = ("<think>", "</think>", "<tool_call>", "</tool_call>")  # added, not special (as in Qwen's)


def build_chat_model(arch: str, folder, seed: int = 0, **config: object):
    """`build`, with a tokenizer that has Qwen's think and tool-call tokens (the last ids of the
    vocab) and QWEN_STYLE_TEMPLATE as chat_template.jinja."""
    import tokenizers

    from tests.tiny_tokenizer import make_test_tokenizer

    model = build(arch, folder, seed, **config)
    make_test_tokenizer(folder, VOCAB - len(CHAT_TOKENS))
    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False) for t in CHAT_TOKENS])
    assert tok.get_vocab_size(with_added_tokens=True) == VOCAB
    tok.save(str(folder / "tokenizer.json"))
    (folder / "chat_template.jinja").write_text(QWEN_STYLE_TEMPLATE, encoding="utf-8")
    return model
