"""GPT-NeoX (Pythia): LayerNorm, partial rotary, parallel (or sequential) residual, GELU MLP.

The model contract: pagedjax.models.layers.DecoderLM.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax

from pagedjax.attention import AttentionMetadata
from pagedjax.models.config import ModelConfig, hf_rope
from pagedjax.models.family import ModelFamily
from pagedjax.models.layers import MLP, DecoderBlock, DecoderLM, norm


class GPTNeoXBlock(DecoderBlock):
    """x + attn(ln_1(x)) + mlp(ln_2(x)) with parallel residual, else the pre-norm sequence."""

    @nn.compact
    def __call__(self, x: jax.Array, kv, meta: AttentionMetadata):
        """x [T, D] -> ([T, D], new kv)."""
        cfg = self.config
        h, kv = self.attention(norm(cfg, "attn_norm")(x), kv, meta)
        mlp, mlp_norm = MLP(cfg, name="mlp"), norm(cfg, "mlp_norm")
        if cfg.parallel_residual:
            return x + h + mlp(mlp_norm(x)), kv
        x = x + h
        return x + mlp(mlp_norm(x)), kv


class GPTNeoX(DecoderLM):
    """GPT-NeoX causal LM over a ragged flat batch with the paged KV pool as explicit state."""

    block = GPTNeoXBlock


# --- the family: config reader, weight map --------------------------------------------------


def config_from_hf(hf: Mapping[str, Any], common: dict[str, Any]) -> ModelConfig:
    D, N = hf["hidden_size"], hf["num_attention_heads"]
    bias = hf.get("attention_bias", True)
    return ModelConfig(
        **common, hidden_size=D, num_layers=hf["num_hidden_layers"], num_heads=N, num_kv_heads=N,
        head_dim=D // N, intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get("layer_norm_eps", 1e-5), activation=hf.get("hidden_act", "gelu"), norm="layer",
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        qkv_bias=bias, o_bias=bias, mlp_bias=True,
        parallel_residual=hf.get("use_parallel_residual", True),
        **hf_rope(hf, D // N, 0.25),
    )


def _qkv(kind: str) -> tuple[str, ...]:
    return tuple(f"layers_{{}}.attn.{p}_proj.{kind}" for p in "qkv")


HF_WEIGHT_MAP = {
    "gpt_neox.embed_in.weight": ("embed.embedding", "copy"),
    "gpt_neox.final_layer_norm.weight": ("final_norm.scale", "copy"),
    "gpt_neox.final_layer_norm.bias": ("final_norm.bias", "copy"),
    "embed_out.weight": ("lm_head.kernel", "linear"),
    "gpt_neox.layers.{}.input_layernorm.weight": ("layers_{}.attn_norm.scale", "copy"),
    "gpt_neox.layers.{}.input_layernorm.bias": ("layers_{}.attn_norm.bias", "copy"),
    "gpt_neox.layers.{}.post_attention_layernorm.weight": ("layers_{}.mlp_norm.scale", "copy"),
    "gpt_neox.layers.{}.post_attention_layernorm.bias": ("layers_{}.mlp_norm.bias", "copy"),
    "gpt_neox.layers.{}.attention.query_key_value.weight": (_qkv("kernel"), "neox_qkv"),
    "gpt_neox.layers.{}.attention.query_key_value.bias": (_qkv("bias"), "neox_qkv"),
    "gpt_neox.layers.{}.attention.dense.weight": ("layers_{}.attn.o_proj.kernel", "linear"),
    "gpt_neox.layers.{}.attention.dense.bias": ("layers_{}.attn.o_proj.bias", "copy"),
    "gpt_neox.layers.{}.mlp.dense_h_to_4h.weight": ("layers_{}.mlp.fc_in.kernel", "linear"),
    "gpt_neox.layers.{}.mlp.dense_h_to_4h.bias": ("layers_{}.mlp.fc_in.bias", "copy"),
    "gpt_neox.layers.{}.mlp.dense_4h_to_h.weight": ("layers_{}.mlp.fc_out.kernel", "linear"),
    "gpt_neox.layers.{}.mlp.dense_4h_to_h.bias": ("layers_{}.mlp.fc_out.bias", "copy"),
}


def check(cfg: ModelConfig, fail) -> None:
    if not cfg.rotary_dim:
        fail("gpt_neox needs rotary embeddings (rotary_dim > 0)")
    if cfg.num_kv_heads != cfg.num_heads:
        fail("gpt_neox has no grouped-query attention (num_kv_heads must equal num_heads)")
    if cfg.num_heads * cfg.head_dim != cfg.hidden_size:
        fail("num_heads * head_dim must equal hidden_size")


FAMILY = ModelFamily(
    name="gpt_neox",
    model=GPTNeoX,
    hf_architectures=("GPTNeoXForCausalLM",),
    config_from_hf=config_from_hf,
    weight_map=HF_WEIGHT_MAP,
    base_prefix="gpt_neox.",
    options=frozenset({"norm", "qkv_bias", "o_bias", "mlp_bias", "rotary_dim", "rope_theta", "rope_scaling",
                       "parallel_residual"}),
    check=check,
)
