"""GPT-2: learned positions, pre-LayerNorm, multi-head attention, GELU MLP, tied head.

The model contract: pagedjax.models.layers.DecoderLM.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax

from pagedjax.attention import AttentionMetadata
from pagedjax.models.config import ModelConfig
from pagedjax.models.family import ModelFamily
from pagedjax.models.layers import MLP, DecoderBlock, DecoderLM, Embed, norm


class GPT2Block(DecoderBlock):
    """Pre-norm decoder layer: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    @nn.compact
    def __call__(self, x: jax.Array, kv, meta: AttentionMetadata):
        """x [T, D] -> ([T, D], new kv)."""
        cfg = self.config
        h, kv = self.attention(norm(cfg, "attn_norm")(x), kv, meta)
        x = x + h
        x = x + MLP(cfg, name="mlp")(norm(cfg, "mlp_norm")(x))
        return x, kv


class GPT2(DecoderLM):
    """GPT-2 causal LM over a ragged flat batch with the paged KV pool as explicit state."""

    block = GPT2Block

    def embed_tokens(self, embed: Embed, tokens: jax.Array, meta: AttentionMetadata) -> jax.Array:
        cfg = self.config
        pos_embed = Embed(cfg.max_position_embeddings, cfg.hidden_size, (None, "embed"), name="pos_embed")
        return embed(tokens) + pos_embed(meta.positions)  # [T, D]


# --- the family: config reader, weight map --------------------------------------------------


def config_from_hf(hf: Mapping[str, Any], common: dict[str, Any]) -> ModelConfig:
    D, N = hf["n_embd"], hf["n_head"]
    return ModelConfig(
        **common, hidden_size=D, num_layers=hf["n_layer"], num_heads=N, num_kv_heads=N,
        head_dim=D // N, intermediate_size=hf.get("n_inner") or 4 * D,
        max_position_embeddings=hf["n_positions"], norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        activation=hf.get("activation_function", "gelu_new"), norm="layer",
        tie_word_embeddings=hf.get("tie_word_embeddings", True), qkv_bias=True, o_bias=True, mlp_bias=True,
        scale_attn_weights=hf.get("scale_attn_weights", True),
        scale_attn_by_inverse_layer_idx=hf.get("scale_attn_by_inverse_layer_idx", False),
    )


def _qkv(kind: str) -> tuple[str, ...]:
    return tuple(f"layers_{{}}.attn.{p}_proj.{kind}" for p in "qkv")


HF_WEIGHT_MAP = {
    "transformer.wte.weight": ("embed.embedding", "copy"),
    "transformer.wpe.weight": ("pos_embed.embedding", "copy"),
    "transformer.ln_f.weight": ("final_norm.scale", "copy"),
    "transformer.ln_f.bias": ("final_norm.bias", "copy"),
    "lm_head.weight": ("lm_head.kernel", "linear"),
    "transformer.h.{}.ln_1.weight": ("layers_{}.attn_norm.scale", "copy"),
    "transformer.h.{}.ln_1.bias": ("layers_{}.attn_norm.bias", "copy"),
    "transformer.h.{}.attn.c_attn.weight": (_qkv("kernel"), "split3"),  # Conv1D: [in, out]
    "transformer.h.{}.attn.c_attn.bias": (_qkv("bias"), "split3"),
    "transformer.h.{}.attn.c_proj.weight": ("layers_{}.attn.o_proj.kernel", "copy"),
    "transformer.h.{}.attn.c_proj.bias": ("layers_{}.attn.o_proj.bias", "copy"),
    "transformer.h.{}.ln_2.weight": ("layers_{}.mlp_norm.scale", "copy"),
    "transformer.h.{}.ln_2.bias": ("layers_{}.mlp_norm.bias", "copy"),
    "transformer.h.{}.mlp.c_fc.weight": ("layers_{}.mlp.fc_in.kernel", "copy"),
    "transformer.h.{}.mlp.c_fc.bias": ("layers_{}.mlp.fc_in.bias", "copy"),
    "transformer.h.{}.mlp.c_proj.weight": ("layers_{}.mlp.fc_out.kernel", "copy"),
    "transformer.h.{}.mlp.c_proj.bias": ("layers_{}.mlp.fc_out.bias", "copy"),
}


def check(cfg: ModelConfig, fail) -> None:
    if cfg.num_kv_heads != cfg.num_heads:
        fail("gpt2 has no grouped-query attention (num_kv_heads must equal num_heads)")
    if cfg.num_heads * cfg.head_dim != cfg.hidden_size:
        fail("num_heads * head_dim must equal hidden_size")


FAMILY = ModelFamily(
    name="gpt2",
    model=GPT2,
    hf_architectures=("GPT2LMHeadModel",),
    config_from_hf=config_from_hf,
    weight_map=HF_WEIGHT_MAP,
    base_prefix="transformer.",
    options=frozenset({"norm", "qkv_bias", "o_bias", "mlp_bias", "scale_attn_weights",
                       "scale_attn_by_inverse_layer_idx"}),
    check=check,
)
