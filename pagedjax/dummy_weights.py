"""Dummy weights (vLLM's `--load-format dummy`): random weights of a config, drawn on the device(s).

For benchmarks and serving at the size of real models where no checkpoint exists.

Nothing passes through the host: each leaf is drawn by a jitted function straight into its
sharding (norm scales 1, biases 0, everything else normal(0, 0.02)). The jitted drawers are
cached by (shape, dtype, kind, sharding), so an 80-layer model compiles a handful of them.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from pagedjax.models import abstract_params
from pagedjax.models.config import ModelConfig
from pagedjax.models.layers import INIT_STD
from pagedjax.params import Params
from pagedjax.weights import resolve_sharding


@functools.cache
def _drawer(shape: tuple[int, ...], dtype, kind: str, sharding):
    def draw(key):
        if kind == "scale":
            return jnp.ones(shape, dtype)
        if kind == "bias":
            return jnp.zeros(shape, dtype)
        return INIT_STD * jax.random.normal(key, shape, dtype)

    return jax.jit(draw, out_shardings=sharding)


def random_params(config: ModelConfig, *, dtype: Any = jnp.bfloat16, seed: int = 0,
                  shardings: Any = None) -> Params:
    """Params of `config` with random weights drawn on device; `shardings` as in load_params."""
    dtype = jnp.dtype(dtype)
    shapes, axes = abstract_params(config, dtype)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    axes_leaves = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    key = jax.random.key(seed)
    arrays = []
    for i, ((path, s), a) in enumerate(zip(leaves, axes_leaves)):
        keys = tuple(k.key for k in path)
        sharding = resolve_sharding(shardings, ".".join(keys), keys, a, s)
        kind = keys[-1] if keys[-1] in ("scale", "bias") else "weight"
        arrays.append(_drawer(s.shape, dtype, kind, sharding)(jax.random.fold_in(key, i)))
    return Params({"params": jax.tree_util.tree_unflatten(treedef, arrays)}, config, tokenizer=None)


def dummy_params(model: str | None, *, dtype: Any = jnp.bfloat16, seed: int = 0, shardings: Any = None,
                 mesh: jax.sharding.Mesh | None = None) -> Params:
    """vLLM's `--load-format dummy`: random weights of the config that `model` names.

    `model`: "named:<config>" (pagedjax.models.named), a HF folder (its config.json; no weights
    read), or a .gguf file (its metadata). `mesh` places them by pagedjax.parallel's rules.
    """
    import json
    from pathlib import Path

    from pagedjax import parallel
    from pagedjax.models.config import get_config

    tokenizer = None
    if model is None:
        raise ValueError("load_format='dummy' needs a model config: named:<config>, a HF folder or a .gguf file")
    if model.startswith("named:"):
        config = get_config(model[len("named:"):])
    else:
        path = Path(model)
        if path.is_dir() and (path / "config.json").exists():
            config = ModelConfig.from_hf(json.loads((path / "config.json").read_text()), name=path.name)
            tokenizer = str(path) if any((path / t).exists() for t in ("tokenizer.json", "vocab.json")) else None
        elif path.is_file() and path.suffix == ".gguf":
            from pagedjax.gguf_file import GGUFFile

            gguf = GGUFFile(path)
            config = ModelConfig.from_gguf(gguf.metadata, gguf.tensors.keys(), name=path.stem)
            tokenizer = str(path)
        else:
            raise ValueError(f"load_format='dummy': {model!r} is neither named:<config>, a folder with a "
                             f"config.json nor a .gguf file")
    if mesh is not None:
        config = parallel.tp_config(config, parallel.tp_size(mesh))
        shardings = parallel.param_shardings(config, mesh)
    params = random_params(config, dtype=dtype, seed=seed, shardings=shardings)
    return Params(params.variables, config, tokenizer)
