"""Gemma 2: sliding-window and global layers alternating, soft-capped attention and final logits,
pre- and post-norms with Gemma's (1 + w) RMSNorm, GeGLU MLP, embeddings scaled by sqrt(hidden).

The model contract: pagedjax.models.layers.DecoderLM.
The `Gemma` module also serves Gemma 3 (gemma3.py), whose differences are features of the
shared attention (q/k norm, local rotary base).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pagedjax.attention import AttentionMetadata
from pagedjax.models import llama
from pagedjax.models.config import ModelConfig, RopeScaling, f32, hf_rope
from pagedjax.models.family import ModelFamily
from pagedjax.models.layers import DecoderBlock, DecoderLM, Embed, GatedMLP, norm


class GemmaBlock(DecoderBlock):
    """x + post_attn_norm(attn(attn_norm(x))), then x + post_mlp_norm(mlp(mlp_norm(x)))."""

    @nn.compact
    def __call__(self, x: jax.Array, kv, meta: AttentionMetadata):
        """x [T, D] -> ([T, D], new kv)."""
        cfg = self.config
        h, kv = self.attention(norm(cfg, "attn_norm")(x), kv, meta)
        x = x + norm(cfg, "post_attn_norm")(h)
        h = GatedMLP(cfg, name="mlp")(norm(cfg, "mlp_norm")(x))
        return x + norm(cfg, "post_mlp_norm")(h), kv


class Gemma(DecoderLM):
    """Gemma 2 / 3 causal LM over a ragged flat batch with the paged KV pool as explicit state;
    the logits soft-capped by lm_head (final_logit_softcap)."""

    block = GemmaBlock

    def embed_tokens(self, embed: Embed, tokens: jax.Array, meta: AttentionMetadata) -> jax.Array:
        x = embed(tokens)  # [T, D]
        return x * jnp.asarray(math.sqrt(self.config.hidden_size), x.dtype)  # rounded to the activation dtype, as HF


# --- the family: config readers, weight maps ------------------------------------------------

# Gemma2Config's defaults, for keys a config.json leaves out
HF_DEFAULTS = dict(head_dim=256, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192,
                   rms_norm_eps=1e-6, tie_word_embeddings=True, query_pre_attn_scalar=256, sliding_window=4096,
                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0)


def hf_features(hf: Mapping[str, Any], common: dict[str, Any], default_layer_types: list[str]) -> dict[str, Any]:
    """The ModelConfig fields Gemma 2 and 3 read alike from config.json (HF_DEFAULTS merged in)."""
    if hf.get("use_bidirectional_attention"):
        raise ValueError("gemma: use_bidirectional_attention=True (an encoder) is not supported")
    N, W = hf["num_attention_heads"], hf.get("sliding_window") or 0
    layer_types = tuple(hf.get("layer_types") or default_layer_types) if W else ()
    bias = hf.get("attention_bias", False)
    return dict(
        **common, hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"], num_heads=N,
        num_kv_heads=hf.get("num_key_value_heads") or N, head_dim=hf["head_dim"],
        intermediate_size=hf["intermediate_size"], max_position_embeddings=hf["max_position_embeddings"],
        norm_eps=hf["rms_norm_eps"], activation=hf.get("hidden_activation") or hf.get("hidden_act"),
        tie_word_embeddings=hf["tie_word_embeddings"], norm="rms_unit_offset", qkv_bias=bias, o_bias=bias,
        sliding_window=W, layer_types=layer_types, query_pre_attn_scalar=float(hf["query_pre_attn_scalar"]),
        attn_logit_softcap=float(hf.get("attn_logit_softcapping") or 0.0),
        final_logit_softcap=float(hf.get("final_logit_softcapping") or 0.0),
    )


def config_from_hf(hf: Mapping[str, Any], common: dict[str, Any]) -> ModelConfig:
    L = hf["num_hidden_layers"]
    types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(L)]  # Gemma2Config's
    return ModelConfig(**hf_features(hf, common, types), **hf_rope(hf, hf["head_dim"], 1.0))


def gguf_features(arch: str, meta: Mapping[str, Any], tensor_names: Collection[str], name: str,
                  layer_types: list[str]) -> dict[str, Any]:
    """The ModelConfig fields Gemma 2 and 3 GGUF files (llama.cpp's `gemma2.*` / `gemma3.*`) share."""
    g = lambda key, default=None: meta.get(f"{arch}.{key}", default)
    D, N, L = int(g("embedding_length")), int(g("attention.head_count")), int(g("block_count"))
    H = int(g("attention.key_length", 256))
    scaling = g("rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise ValueError(f"unsupported GGUF rope scaling type {scaling!r} for {arch}")
    # llama.cpp scales scores by 1/sqrt(head_dim), but by 1/sqrt(D / N) for the 27B models (46 and
    # 62 layers), as their HF query_pre_attn_scalar says
    qpas = D // N if L in (46, 62) else H
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return dict(
        architecture=arch, vocab_size=int(g("vocab_size", 0)) or len(meta["tokenizer.ggml.tokens"]),
        hidden_size=D, num_layers=L, num_heads=N, num_kv_heads=int(g("attention.head_count_kv", N)), head_dim=H,
        intermediate_size=int(g("feed_forward_length")), max_position_embeddings=int(g("context_length")),
        norm_eps=f32(g("attention.layer_norm_rms_epsilon")), activation="gelu_pytorch_tanh",
        tie_word_embeddings="output.weight" not in tensor_names, norm="rms_unit_offset",
        sliding_window=int(g("attention.sliding_window")), layer_types=tuple(layer_types),
        query_pre_attn_scalar=float(qpas),
        attn_logit_softcap=f32(g("attn_logit_softcapping", 0.0)),
        final_logit_softcap=f32(g("final_logit_softcapping", 0.0)),
        rotary_dim=H, rope_theta=f32(g("rope.freq_base", 10000.0)),
        rope_scaling=RopeScaling("linear", f32(g("rope.scaling.factor"))) if scaling == "linear" else RopeScaling(),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_ids=() if eos is None else (int(eos),),
        name=name,
    )


def config_from_gguf(meta: Mapping[str, Any], tensor_names: Collection[str], name: str = "") -> ModelConfig:
    L = int(meta["gemma2.block_count"])
    types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(L)]  # llama.cpp's swa pattern 2
    return ModelConfig(**gguf_features("gemma2", meta, tensor_names, name, types))


def gguf_fix(name: str, w):
    """llama.cpp stores Gemma's RMSNorm weights as 1 + w (its norm multiplies by the weight)."""
    return w - 1 if name.endswith("norm.weight") else w


_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attn_norm",
          "pre_feedforward_layernorm": "mlp_norm", "post_feedforward_layernorm": "post_mlp_norm"}
HF_WEIGHT_MAP = {  # LLaMA's names (entries whose targets a config lacks are not looked for), Gemma's norms
    **{k: v for k, v in llama.HF_WEIGHT_MAP.items() if "layernorm" not in k},
    **{f"model.layers.{{}}.{hf}.weight": (f"layers_{{}}.{ours}.scale", "copy") for hf, ours in _NORMS.items()},
}

GGUF_TENSOR_MAP = {
    **{k: v for k, v in llama.GGUF_TENSOR_MAP.items() if "ffn_norm" not in k},
    "blk.{}.post_attention_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.pre_feedforward_layernorm.weight",
    "blk.{}.post_ffw_norm.weight": "model.layers.{}.post_feedforward_layernorm.weight",
}


def check(cfg: ModelConfig, fail) -> None:
    if not cfg.rotary_dim:
        fail("gemma needs rotary embeddings (rotary_dim > 0)")
    if cfg.norm != "rms_unit_offset":
        fail("gemma's norm is the (1 + w) RMSNorm (norm='rms_unit_offset')")


OPTIONS = frozenset({"norm", "qkv_bias", "o_bias", "rotary_dim", "rope_theta", "rope_scaling", "sliding_window",
                     "layer_types", "attn_logit_softcap", "final_logit_softcap", "query_pre_attn_scalar"})

FAMILY = ModelFamily(
    name="gemma2",
    model=Gemma,
    hf_architectures=("Gemma2ForCausalLM",),
    config_from_hf=config_from_hf,
    weight_map=HF_WEIGHT_MAP,
    base_prefix="model.",
    options=OPTIONS,
    check=check,
    hf_defaults=HF_DEFAULTS,
    gguf_architectures=("gemma2",),
    config_from_gguf=config_from_gguf,
    gguf_tensor_map=GGUF_TENSOR_MAP,
    gguf_fix=gguf_fix,
)
