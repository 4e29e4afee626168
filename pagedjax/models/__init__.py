"""Models: the registry of families, the Flax module of a config, and its abstract parameter tree.

Usage: `logits, pages = get_model(cfg).apply(params.variables, tokens, pages, meta)`; with
`all_hidden=True, mutable=["intermediates"]` the head input of every token is sown too, and
`head_logits(cfg, params.variables, x)` turns head inputs into logits (prompt logprobs).
A family is one model file plus one line in `registry.FAMILIES`.
"""

from __future__ import annotations

import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pagedjax.attention import AttentionMetadata
from pagedjax.compile_cache import traced
from pagedjax.models.config import ModelConfig, get_config
from pagedjax.models.layers import KV_SCALES, head_logits
from pagedjax.models.moe import ROWS_SUFFIX, SCALE_SUFFIX, ZERO_SUFFIX
from pagedjax.models.registry import FAMILIES, REGISTRY, family

__all__ = ["FAMILIES", "REGISTRY", "ModelConfig", "abstract_params", "family", "get_config", "get_model",
           "head_logits"]


def get_model(config: ModelConfig, attn_impl: str = "auto") -> nn.Module:
    """The Flax module for `config` (unbound: use it through `.apply`)."""
    return family(config.architecture).model(config, attn_impl=attn_impl)


def abstract_params(config: ModelConfig, dtype=jnp.float32):
    """(shapes, logical axes) of the `params` tree: ShapeDtypeStruct and PartitionSpec leaves.

    Every weight is in `dtype`, but for the params of quantized linears (a module holding a
    "qvalue"), which keep their own dtypes (e4m3 or packed int4 values, f32 or f16 scales).
    Cached per (config, dtype); treat the returned trees as read-only.
    """
    return _abstract_params(config, jnp.dtype(dtype))


@functools.lru_cache(maxsize=32)
def _abstract_params(config: ModelConfig, dtype):
    # Tracing the init took 0.7 s of the CLI's warm start (SmolLM2, 30 layers): a warm start reads it from disk.
    key = f"{config!r} flax {flax.__version__}"
    shapes, axes = traced("abstract-params", key, functools.partial(_trace_params, config))
    return _with_dtype(shapes, dtype), axes


def _trace_params(config: ModelConfig):
    model = get_model(config, attn_impl="reference")
    H, K = config.head_dim, config.num_kv_heads
    pool = jax.ShapeDtypeStruct((2, 1, K, H), jnp.float32)  # [P, B, K, H]: shapes only, nothing allocated
    pages = [(pool, pool)] * config.num_layers
    z = np.zeros(1, np.int32)
    meta = AttentionMetadata(z, z, np.zeros((1, 1), np.int32), z + 1, np.array([0, 1], np.int32), z)
    boxed = jax.eval_shape(model.init, jax.random.key(0), z, pages, meta)["params"]
    return nn.unbox(boxed), nn.get_partition_spec(boxed)


def _with_dtype(tree, dtype):
    """ShapeDtypeStructs in `dtype`, but in the subtrees of quantized linears and for the FP8
    KV-cache scales of a checkpoint (their own dtypes: f32 scales)."""
    if "qvalue" in tree:
        return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in tree.items()}
    return {k: _with_dtype(v, dtype) if isinstance(v, dict)
            else jax.ShapeDtypeStruct(v.shape, v.dtype if own_dtype(k, v) else dtype) for k, v in tree.items()}


def own_dtype(name: str, leaf) -> bool:
    """Whether the param `name` (a leaf outside the quantized linears, whose params all keep
    theirs) keeps its own dtype rather than the model's: FP8 KV-cache scales, and quantized
    experts' codes (e4m3, uint4), scales, zeros and act-order row orders. Params.dtype and the
    abstract params in a dtype both follow it."""
    return name in KV_SCALES or jnp.dtype(leaf.dtype) in (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.uint4)) or (
        name.startswith("experts_") and name.endswith((SCALE_SUFFIX, ZERO_SUFFIX, ROWS_SUFFIX)))
