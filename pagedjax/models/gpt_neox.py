"""GPT-NeoX (Pythia): LayerNorm, partial rotary, parallel (or sequential) residual, GELU MLP.

Dims: T tokens in the flat batch, S positions whose logits are needed, D hidden, V vocab.
Contract (all model files): `logits [S, V] f32, pages = Model(cfg).apply(variables, tokens [T],
pages, meta)`; one param subtree `layers_{i}` and one (k, v) pool pair per layer, unrolled.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from pagedjax.attention import AttentionMetadata
from pagedjax.kv_cache.page_pool import KVPages
from pagedjax.models.config import ModelConfig
from pagedjax.models.layers import MLP, Attention, Embed, check_pages, head_rows, lm_head, norm


class GPTNeoXBlock(nn.Module):
    """x + attn(ln_1(x)) + mlp(ln_2(x)) with parallel residual, else the pre-norm sequence."""

    config: ModelConfig
    layer_idx: int
    attn_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, kv, meta: AttentionMetadata):
        """x [T, D] -> ([T, D], new kv)."""
        cfg = self.config
        h, kv = Attention(cfg, self.layer_idx, self.attn_impl, name="attn")(norm(cfg, "attn_norm")(x), kv, meta)
        mlp, mlp_norm = MLP(cfg, name="mlp"), norm(cfg, "mlp_norm")
        if cfg.parallel_residual:
            return x + h + mlp(mlp_norm(x)), kv
        x = x + h
        return x + mlp(mlp_norm(x)), kv


class GPTNeoX(nn.Module):
    """GPT-NeoX causal LM over a ragged flat batch with the paged KV pool as explicit state."""

    config: ModelConfig
    attn_impl: str = "auto"

    @nn.compact
    def __call__(self, tokens: jax.Array, pages: KVPages, meta: AttentionMetadata, all_hidden: bool = False):
        """tokens [T] -> (logits [S, V] f32 at meta.logits_indices, new pages); all_hidden: head_rows."""
        cfg = self.config
        check_pages(cfg, pages)
        embed = Embed(cfg.vocab_size, cfg.hidden_size, name="embed")
        x = embed(tokens)  # [T, D]
        new_pages = []
        for i, kv in enumerate(pages):
            x, kv = GPTNeoXBlock(cfg, i, self.attn_impl, name=f"layers_{i}")(x, kv, meta)
            new_pages.append(kv)
        x = head_rows(self, x, meta, all_hidden, norm(cfg, "final_norm"))  # [S, D]
        return lm_head(cfg, embed, x), new_pages
