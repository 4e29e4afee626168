"""OPT: learned positions (offset 2), pre- or post-LayerNorm, ReLU MLP, optional project_in/out.

Dims: T tokens in the flat batch, S positions whose logits are needed, D hidden, E embedding
width (word_embed_proj_dim), V vocab.
Contract (all model files): `logits [S, V] f32, pages = Model(cfg).apply(variables, tokens [T],
pages, meta)`; one param subtree `layers_{i}` and one (k, v) pool pair per layer, unrolled.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from pagedjax.attention import AttentionMetadata
from pagedjax.kv_cache.page_pool import KVPages
from pagedjax.models.config import ModelConfig
from pagedjax.models.layers import MLP, Attention, Einsum, Embed, check_pages, head_rows, lm_head, norm

POSITION_OFFSET = 2  # OPT's learned position table starts 2 rows in (a fairseq legacy)


class OPTBlock(nn.Module):
    """Pre-norm (x + attn(norm(x))) or, for OPT-350m, post-norm (norm(x + attn(x))) layer."""

    config: ModelConfig
    layer_idx: int
    attn_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, kv, meta: AttentionMetadata):
        """x [T, D] -> ([T, D], new kv)."""
        cfg = self.config
        pre = cfg.do_layer_norm_before
        attn_norm, mlp_norm = norm(cfg, "attn_norm"), norm(cfg, "mlp_norm")
        h, kv = Attention(cfg, self.layer_idx, self.attn_impl, name="attn")(attn_norm(x) if pre else x, kv, meta)
        x = x + h if pre else attn_norm(x + h)
        h = MLP(cfg, name="mlp")(mlp_norm(x) if pre else x)
        x = x + h if pre else mlp_norm(x + h)
        return x, kv


class OPT(nn.Module):
    """OPT causal LM over a ragged flat batch with the paged KV pool as explicit state."""

    config: ModelConfig
    attn_impl: str = "auto"

    @nn.compact
    def __call__(self, tokens: jax.Array, pages: KVPages, meta: AttentionMetadata, all_hidden: bool = False):
        """tokens [T] -> (logits [S, V] f32 at meta.logits_indices, new pages); all_hidden: head_rows."""
        cfg = self.config
        check_pages(cfg, pages)
        D, E = cfg.hidden_size, cfg.embed_dim
        embed = Embed(cfg.vocab_size, E, name="embed")
        pos_embed = Embed(cfg.max_position_embeddings + POSITION_OFFSET, D, (None, "embed"), name="pos_embed")
        x = embed(tokens)  # [T, E]
        if E != D:
            x = Einsum("te,ed->td", (E, D), (None, "embed"), name="project_in")(x)  # [T, D]
        x = x + pos_embed(meta.positions + POSITION_OFFSET)
        new_pages = []
        for i, kv in enumerate(pages):
            x, kv = OPTBlock(cfg, i, self.attn_impl, name=f"layers_{i}")(x, kv, meta)
            new_pages.append(kv)
        final_norm = norm(cfg, "final_norm") if cfg.final_norm else None
        project_out = Einsum("sd,de->se", (D, E), ("embed", None), name="project_out") if E != D else None

        def head_in(h: jax.Array) -> jax.Array:  # [S, D] -> [S, E], row by row
            h = final_norm(h) if final_norm is not None else h
            return project_out(h) if project_out is not None else h

        x = head_rows(self, x, meta, all_hidden, head_in)  # [S, E]
        return lm_head(cfg, embed, x), new_pages
