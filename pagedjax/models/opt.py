"""OPT: learned positions (offset 2), pre- or post-LayerNorm, ReLU MLP, optional project_in/out.

D hidden, E embedding width (word_embed_proj_dim). The model contract: pagedjax.models.layers.DecoderLM.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax

from pagedjax.attention import AttentionMetadata
from pagedjax.models.config import ModelConfig
from pagedjax.models.family import ModelFamily
from pagedjax.models.layers import MLP, DecoderBlock, DecoderLM, Einsum, Embed, norm

POSITION_OFFSET = 2  # OPT's learned position table starts 2 rows in (a fairseq legacy)


class OPTBlock(DecoderBlock):
    """Pre-norm (x + attn(norm(x))) or, for OPT-350m, post-norm (norm(x + attn(x))) layer."""

    @nn.compact
    def __call__(self, x: jax.Array, kv, meta: AttentionMetadata):
        """x [T, D] -> ([T, D], new kv)."""
        cfg = self.config
        pre = cfg.do_layer_norm_before
        attn_norm, mlp_norm = norm(cfg, "attn_norm"), norm(cfg, "mlp_norm")
        h, kv = self.attention(attn_norm(x) if pre else x, kv, meta)
        x = x + h if pre else attn_norm(x + h)
        h = MLP(cfg, name="mlp")(mlp_norm(x) if pre else x)
        x = x + h if pre else mlp_norm(x + h)
        return x, kv


class OPT(DecoderLM):
    """OPT causal LM over a ragged flat batch with the paged KV pool as explicit state."""

    block = OPTBlock

    def embed_tokens(self, embed: Embed, tokens: jax.Array, meta: AttentionMetadata) -> jax.Array:
        cfg = self.config
        D, E = cfg.hidden_size, cfg.embed_dim
        pos_embed = Embed(cfg.max_position_embeddings + POSITION_OFFSET, D, (None, "embed"), name="pos_embed")
        x = embed(tokens)  # [T, E]
        if E != D:
            x = Einsum("te,ed->td", (E, D), (None, "embed"), config=cfg, name="project_in")(x)  # [T, D]
        return x + pos_embed(meta.positions + POSITION_OFFSET)

    def head_in(self) -> Callable[[jax.Array], jax.Array]:
        """[rows, D] -> [rows, E]: the final norm (unless post-norm layers), then project_out."""
        cfg = self.config
        D, E = cfg.hidden_size, cfg.embed_dim
        final_norm = norm(cfg, "final_norm") if cfg.final_norm else None
        project_out = Einsum("sd,de->se", (D, E), ("embed", None), config=cfg, name="project_out") if E != D else None

        def head_in(h: jax.Array) -> jax.Array:
            h = final_norm(h) if final_norm is not None else h
            return project_out(h) if project_out is not None else h

        return head_in


# --- the family: config reader, weight map --------------------------------------------------


def config_from_hf(hf: Mapping[str, Any], common: dict[str, Any]) -> ModelConfig:
    D, N = hf["hidden_size"], hf["num_attention_heads"]
    proj = hf.get("word_embed_proj_dim") or D
    pre = hf.get("do_layer_norm_before", True)
    bias = hf.get("enable_bias", True)
    return ModelConfig(
        **common, hidden_size=D, num_layers=hf["num_hidden_layers"], num_heads=N, num_kv_heads=N,
        head_dim=D // N, intermediate_size=hf["ffn_dim"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        activation=hf.get("activation_function", "relu"), norm="layer",
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
        qkv_bias=bias, o_bias=bias, mlp_bias=bias,
        do_layer_norm_before=pre, word_embed_proj_dim=proj if proj != D else 0,
        final_norm=pre and not hf.get("_remove_final_layer_norm", False),
        norm_affine=hf.get("layer_norm_elementwise_affine", True),
    )


_LAYER_NORMS = {"self_attn_layer_norm": "attn_norm", "final_layer_norm": "mlp_norm"}
HF_WEIGHT_MAP = {
    "model.decoder.embed_tokens.weight": ("embed.embedding", "copy"),
    "model.decoder.embed_positions.weight": ("pos_embed.embedding", "copy"),
    "model.decoder.project_in.weight": ("project_in.kernel", "linear"),
    "model.decoder.project_out.weight": ("project_out.kernel", "linear"),
    "model.decoder.final_layer_norm.weight": ("final_norm.scale", "copy"),
    "model.decoder.final_layer_norm.bias": ("final_norm.bias", "copy"),
    "lm_head.weight": ("lm_head.kernel", "linear"),
    **{f"model.decoder.layers.{{}}.self_attn.{hf}.{w}": (f"layers_{{}}.attn.{ours}.{o}", h)
       for hf, ours in (("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj"), ("out_proj", "o_proj"))
       for w, o, h in (("weight", "kernel", "linear"), ("bias", "bias", "copy"))},
    **{f"model.decoder.layers.{{}}.{hf}.{w}": (f"layers_{{}}.{ours}.{o}", "copy")
       for hf, ours in _LAYER_NORMS.items() for w, o in (("weight", "scale"), ("bias", "bias"))},
    **{f"model.decoder.layers.{{}}.{hf}.{w}": (f"layers_{{}}.mlp.{ours}.{o}", h)
       for hf, ours in (("fc1", "fc_in"), ("fc2", "fc_out"))
       for w, o, h in (("weight", "kernel", "linear"), ("bias", "bias", "copy"))},
}


def check(cfg: ModelConfig, fail) -> None:
    if cfg.num_kv_heads != cfg.num_heads:
        fail("opt has no grouped-query attention (num_kv_heads must equal num_heads)")
    if cfg.num_heads * cfg.head_dim != cfg.hidden_size:
        fail("num_heads * head_dim must equal hidden_size")


FAMILY = ModelFamily(
    name="opt",
    model=OPT,
    hf_architectures=("OPTForCausalLM",),
    config_from_hf=config_from_hf,
    weight_map=HF_WEIGHT_MAP,
    base_prefix="model.",
    options=frozenset({"norm", "norm_affine", "qkv_bias", "o_bias", "mlp_bias", "do_layer_norm_before",
                       "word_embed_proj_dim", "final_norm"}),
    check=check,
)
