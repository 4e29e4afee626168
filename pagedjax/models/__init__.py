"""Model registry: architecture name -> Flax module, plus the abstract parameter tree of a config.

Usage: `logits, pages = get_model(cfg).apply(params.variables, tokens, pages, meta)`; with
`all_hidden=True, mutable=["intermediates"]` the head input of every token is sown too, and
`head_logits(cfg, params.variables, x)` turns head inputs into logits (prompt logprobs).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pagedjax.attention import AttentionMetadata
from pagedjax.models.config import HF_ARCHITECTURES, ModelConfig, get_config
from pagedjax.models.gpt2 import GPT2
from pagedjax.models.gpt_neox import GPTNeoX
from pagedjax.models.layers import head_logits
from pagedjax.models.llama import Llama
from pagedjax.models.opt import OPT

__all__ = ["HF_ARCHITECTURES", "MODELS", "ModelConfig", "abstract_params", "get_config", "get_model", "head_logits"]

MODELS: dict[str, type[nn.Module]] = {"llama": Llama, "gpt2": GPT2, "gpt_neox": GPTNeoX, "opt": OPT}


def get_model(config: ModelConfig, attn_impl: str = "auto") -> nn.Module:
    """The Flax module for `config` (unbound: use it through `.apply`)."""
    if config.architecture not in MODELS:
        raise ValueError(f"no model for architecture {config.architecture!r} (have {sorted(MODELS)})")
    return MODELS[config.architecture](config, attn_impl=attn_impl)


def abstract_params(config: ModelConfig, dtype=jnp.float32):
    """(shapes, logical axes) of the `params` tree: ShapeDtypeStruct and PartitionSpec leaves.

    Cached per (config, dtype); treat the returned trees as read-only.
    """
    return _abstract_params(config, jnp.dtype(dtype))


@functools.lru_cache(maxsize=32)
def _abstract_params(config: ModelConfig, dtype):
    model = get_model(config, attn_impl="reference")
    H, K = config.head_dim, config.num_kv_heads
    pool = jax.ShapeDtypeStruct((2, 1, K, H), jnp.float32)  # [P, B, K, H]: shapes only, nothing allocated
    pages = [(pool, pool)] * config.num_layers
    z = np.zeros(1, np.int32)
    meta = AttentionMetadata(z, z, np.zeros((1, 1), np.int32), z + 1, np.array([0, 1], np.int32), z)
    boxed = jax.eval_shape(model.init, jax.random.key(0), z, pages, meta)["params"]
    axes = nn.get_partition_spec(boxed)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), nn.unbox(boxed))
    return shapes, axes
