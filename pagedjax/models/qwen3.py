"""Qwen3 (dense): LLaMA's layer with an RMSNorm over head_dim on each q and k head before rotary.

Dims: D hidden, N query heads, K kv heads, H head dim (its own config key: N * H need not be D).
The module is LLaMA's (`llama.Llama`); q/k norm is the shared `qk_norm` feature of
`layers.Attention`. Qwen3's optional sliding window (`use_sliding_window`, off in every released
checkpoint) is the shared `sliding_window` feature, on the layers from `max_window_layers` on.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from pagedjax.models import llama
from pagedjax.models.config import ModelConfig, f32, gguf_rope_scaling, hf_qwen_window, hf_rope
from pagedjax.models.family import ModelFamily


def config_from_hf(hf: Mapping[str, Any], common: dict[str, Any]) -> ModelConfig:
    N = hf["num_attention_heads"]
    H = hf.get("head_dim") or 128  # Qwen3Config's default
    bias = hf.get("attention_bias", False)
    return ModelConfig(
        **common, hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"], num_heads=N,
        num_kv_heads=hf.get("num_key_value_heads") or N, head_dim=H,
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 32768),
        norm_eps=hf.get("rms_norm_eps", 1e-6), activation=hf.get("hidden_act", "silu"),
        tie_word_embeddings=hf.get("tie_word_embeddings", False), qkv_bias=bias, o_bias=bias, qk_norm=True,
        **hf_rope(hf, H, 1.0), **hf_qwen_window(hf),
    )


def config_from_gguf(meta: Mapping[str, Any], tensor_names: Collection[str], name: str = "") -> ModelConfig:
    """llama.cpp's `qwen3.*` keys (half-split rotary: q/k rows are not permuted)."""
    g = lambda key, default=None: meta.get(f"qwen3.{key}", default)
    D, N = int(g("embedding_length")), int(g("attention.head_count"))
    H = int(g("attention.key_length", D // N))
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return ModelConfig(
        architecture="qwen3", vocab_size=int(g("vocab_size", 0)) or len(meta["tokenizer.ggml.tokens"]),
        hidden_size=D, num_layers=int(g("block_count")), num_heads=N,
        num_kv_heads=int(g("attention.head_count_kv", N)), head_dim=H,
        intermediate_size=int(g("feed_forward_length")), max_position_embeddings=int(g("context_length")),
        norm_eps=f32(g("attention.layer_norm_rms_epsilon")),
        tie_word_embeddings="output.weight" not in tensor_names, qk_norm=True,
        qkv_bias="blk.0.attn_q.bias" in tensor_names, o_bias="blk.0.attn_output.bias" in tensor_names,
        rotary_dim=H, rope_theta=f32(g("rope.freq_base", 1000000.0)),
        rope_scaling=gguf_rope_scaling(meta, "qwen3"),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_ids=() if eos is None else (int(eos),),
        name=name,
    )


HF_WEIGHT_MAP = {
    **llama.HF_WEIGHT_MAP,
    "model.layers.{}.self_attn.q_norm.weight": ("layers_{}.attn.q_norm.scale", "copy"),
    "model.layers.{}.self_attn.k_norm.weight": ("layers_{}.attn.k_norm.scale", "copy"),
}

GGUF_TENSOR_MAP = {
    **llama.GGUF_TENSOR_MAP,
    **{f"blk.{{}}.attn_{p}.bias": f"model.layers.{{}}.self_attn.{p}_proj.bias" for p in "qkv"},
    "blk.{}.attn_output.bias": "model.layers.{}.self_attn.o_proj.bias",
    "blk.{}.attn_q_norm.weight": "model.layers.{}.self_attn.q_norm.weight",
    "blk.{}.attn_k_norm.weight": "model.layers.{}.self_attn.k_norm.weight",
}


def check(cfg: ModelConfig, fail) -> None:
    if not cfg.rotary_dim:
        fail("qwen3 needs rotary embeddings (rotary_dim > 0)")
    if not cfg.qk_norm:
        fail("qwen3 has q/k norm (qk_norm=True)")


FAMILY = ModelFamily(
    name="qwen3",
    model=llama.Llama,
    hf_architectures=("Qwen3ForCausalLM",),
    config_from_hf=config_from_hf,
    weight_map=HF_WEIGHT_MAP,
    base_prefix="model.",
    options=frozenset({"qkv_bias", "o_bias", "qk_norm", "rotary_dim", "rope_theta", "rope_scaling",
                       "quantization", "sliding_window", "layer_types"}),
    check=check,
    gguf_architectures=("qwen3",),
    config_from_gguf=config_from_gguf,
    gguf_tensor_map=GGUF_TENSOR_MAP,
)
