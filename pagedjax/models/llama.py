"""LLaMA (and SmolLM2, Llama 2/3): RMSNorm, rotary, grouped-query attention, SwiGLU MLP.

The model contract: pagedjax.models.layers.DecoderLM.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import flax.linen as nn
import jax

from pagedjax.attention import AttentionMetadata
from pagedjax.models.config import ModelConfig, f32, gguf_rope_scaling, hf_rope
from pagedjax.models.family import ModelFamily
from pagedjax.models.layers import DecoderBlock, DecoderLM, feed_forward, norm


class LlamaBlock(DecoderBlock):
    """Pre-norm decoder layer: x + attn(norm(x)), then x + mlp(norm(x)) (SwiGLU, or experts)."""

    @nn.compact
    def __call__(self, x: jax.Array, kv, meta: AttentionMetadata):
        """x [T, D] -> ([T, D], new kv)."""
        cfg = self.config
        h, kv = self.attention(norm(cfg, "attn_norm")(x), kv, meta)
        x = x + h
        x = x + feed_forward(cfg, self.layer_idx, norm(cfg, "mlp_norm")(x), meta)
        return x, kv


class Llama(DecoderLM):
    """LLaMA causal LM over a ragged flat batch with the paged KV pool as explicit state."""

    block = LlamaBlock


# --- the family: config readers, weight maps ------------------------------------------------


def config_from_hf(hf: Mapping[str, Any], common: dict[str, Any]) -> ModelConfig:
    N = hf["num_attention_heads"]
    H = hf.get("head_dim") or hf["hidden_size"] // N
    bias = hf.get("attention_bias", False)
    return ModelConfig(
        **common, hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"], num_heads=N,
        num_kv_heads=hf.get("num_key_value_heads") or N, head_dim=H,
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get("rms_norm_eps", 1e-6), activation=hf.get("hidden_act", "silu"),
        tie_word_embeddings=hf.get("tie_word_embeddings", False), norm="rms",
        qkv_bias=bias, o_bias=bias, mlp_bias=hf.get("mlp_bias", False),
        **hf_rope(hf, H, 1.0),
    )


def config_from_gguf(meta: Mapping[str, Any], tensor_names: Collection[str], name: str = "",
                     experts: bool = True) -> ModelConfig:
    """A LLaMA-family GGUF file's metadata (llama.cpp's `llama.*` keys); with experts, Mixtral's."""
    g = lambda key, default=None: meta.get(f"llama.{key}", default)
    if experts and g("expert_count", 0):
        from pagedjax.models import mixtral  # llama.cpp writes Mixtral as a llama with experts

        return mixtral.config_from_gguf(meta, tensor_names, name)
    if "rope_freqs.weight" in tensor_names:
        raise ValueError("GGUF rope_freqs tensors (llama3 rope scaling) are not supported")
    rope = gguf_rope_scaling(meta, "llama")
    D, N = int(g("embedding_length")), int(g("attention.head_count"))
    H = int(g("attention.key_length", D // N))
    if int(g("rope.dimension_count", H)) != H:
        raise ValueError("GGUF llama with partial rotary is not supported")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return ModelConfig(
        architecture="llama",
        vocab_size=int(g("vocab_size", 0)) or len(meta["tokenizer.ggml.tokens"]),
        hidden_size=D,
        num_layers=int(g("block_count")),
        num_heads=N,
        num_kv_heads=int(g("attention.head_count_kv", N)),
        head_dim=H,
        intermediate_size=int(g("feed_forward_length")),
        max_position_embeddings=int(g("context_length")),
        norm_eps=f32(g("attention.layer_norm_rms_epsilon")),
        tie_word_embeddings="output.weight" not in tensor_names,
        norm="rms",
        rotary_dim=H,
        rope_theta=f32(g("rope.freq_base", 10000.0)),
        rope_scaling=rope,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
        name=name,
    )


HF_WEIGHT_MAP = {
    "model.embed_tokens.weight": ("embed.embedding", "copy"),
    "model.norm.weight": ("final_norm.scale", "copy"),
    "lm_head.weight": ("lm_head.kernel", "linear"),
    "model.layers.{}.input_layernorm.weight": ("layers_{}.attn_norm.scale", "copy"),
    "model.layers.{}.post_attention_layernorm.weight": ("layers_{}.mlp_norm.scale", "copy"),
    **{f"model.layers.{{}}.self_attn.{p}_proj.weight": (f"layers_{{}}.attn.{p}_proj.kernel", "linear")
       for p in "qkvo"},
    **{f"model.layers.{{}}.self_attn.{p}_proj.bias": (f"layers_{{}}.attn.{p}_proj.bias", "copy") for p in "qkvo"},
    **{f"model.layers.{{}}.mlp.{p}_proj.weight": (f"layers_{{}}.mlp.{p}_proj.kernel", "linear")
       for p in ("gate", "up", "down")},
    **{f"model.layers.{{}}.mlp.{p}_proj.bias": (f"layers_{{}}.mlp.{p}_proj.bias", "copy")
       for p in ("gate", "up", "down")},
}

GGUF_TENSOR_MAP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
}

def check(cfg: ModelConfig, fail) -> None:
    if not cfg.rotary_dim:
        fail("llama needs rotary embeddings (rotary_dim > 0)")


FAMILY = ModelFamily(
    name="llama",
    model=Llama,
    hf_architectures=("LlamaForCausalLM",),
    config_from_hf=config_from_hf,
    weight_map=HF_WEIGHT_MAP,
    base_prefix="model.",
    options=frozenset({"qkv_bias", "o_bias", "mlp_bias", "rotary_dim", "rope_theta", "rope_scaling",
                       "quantization"}),
    check=check,
    gguf_architectures=("llama",),
    config_from_gguf=config_from_gguf,
    gguf_tensor_map=GGUF_TENSOR_MAP,
    gguf_permuted={"attn_q": "num_heads", "attn_k": "num_kv_heads"},
)
