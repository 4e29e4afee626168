"""Params: the weights as a JAX pytree that also carries the static model config and tokenizer source.

The weight tree is the child (so params can be jitted, donated and sharded like any pytree);
the ModelConfig and the tokenizer source ride along as aux data, so `generate(params, prompts)`
needs nothing else.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from pagedjax.models.config import ModelConfig

_NIBBLES = (jnp.dtype(jnp.int4), jnp.dtype(jnp.uint4))


def array_bytes(x) -> int:
    """Bytes of an array (or its abstract shape) on a device: int4 / uint4 (int4 MoE experts'
    codes) two to a byte, as XLA packs them, though their dtype's itemsize says 1."""
    n = math.prod(x.shape)
    return -(-n // 2) if jnp.dtype(x.dtype) in _NIBBLES else n * jnp.dtype(x.dtype).itemsize


@jax.tree_util.register_pytree_with_keys_class
class Params:
    """Model weights ({"params": ...} as Flax wants), their ModelConfig and tokenizer location."""

    def __init__(self, variables: dict[str, Any], config: ModelConfig, tokenizer: str | None = None):
        self.variables = variables  # {"params": nested dict of arrays}
        self.config = config
        self.tokenizer = tokenizer  # HF folder or .gguf file holding the tokenizer, or None

    def tree_flatten_with_keys(self):
        return ((jax.tree_util.GetAttrKey("variables"), self.variables),), (self.config, self.tokenizer)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], *aux)

    @property
    def num_params(self) -> int:
        """Number of scalar weights."""
        return sum(math.prod(x.shape) for x in jax.tree.leaves(self.variables))

    @property
    def dtype(self):
        """The dtype of the unquantized weights (the model's activations run in it)."""
        from pagedjax.models import own_dtype

        def first(tree):
            if "qvalue" in tree:  # a quantized linear: its params keep their own dtypes
                return None
            for k, v in tree.items():
                if isinstance(v, dict):
                    d = first(v)
                else:  # FP8 experts' codes and scales, FP8 KV-cache scales: their own dtypes
                    d = None if own_dtype(k, v) else v.dtype
                if d is not None:
                    return d
            return None

        return first(self.variables["params"])

    @property
    def nbytes(self) -> int:
        """Bytes of all weights."""
        return sum(array_bytes(x) for x in jax.tree.leaves(self.variables))

    def __repr__(self) -> str:
        dtypes = sorted({str(x.dtype) for x in jax.tree.leaves(self.variables)})
        return (f"Params({self.config.name or self.config.architecture}, {self.num_params:,} weights, "
                f"{'/'.join(dtypes)}, tokenizer={self.tokenizer!r})")
