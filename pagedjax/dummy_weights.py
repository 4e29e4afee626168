"""Dummy weights (vLLM's `--load-format dummy`): random weights of a config, drawn on the device(s).

For benchmarks and serving at the size of real models where no checkpoint exists.

Nothing passes through the host: each leaf is drawn by a jitted function straight into its
sharding (norm scales 1, biases 0, everything else normal(0, 0.02)). The drawers are compiled
once per (shape, dtype, kind, sharding), so an 80-layer model compiles a handful of them, and
kept in pagedjax's executable cache, so that a warm start compiles none.

With `quantization`, each quantized linear is drawn as a float weight in `dtype` (bf16 on a GPU) and quantized
on the device as a checkpoint would be at load: "fp8" online (e4m3, per-channel scales),
"awq" / "gptq" round-to-nearest int4 in groups of 128 (the packed AWQ-layout params the
int4 kernel reads; the codes are not AWQ's searched ones, which changes no timing). An MoE
model's experts are drawn in the layout they are held in: e4m3 codes normal(0, INIT_STD) with unit
scales (FP8), or uniform uint4 codes with zero point 8 and the scale that gives them a standard
deviation of INIT_STD (int4).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from pagedjax.models import abstract_params
from pagedjax.models.config import ModelConfig
from pagedjax.models.layers import INIT_STD, KV_SCALES
from pagedjax.models.moe import ROWS_SUFFIX, SCALE_SUFFIX, ZERO_SUFFIX
from pagedjax.models.quantized import quantized_linears
from pagedjax.params import Params
from pagedjax.quantization import QuantConfig
from pagedjax.quantization.fp8 import quantize_fp8
from pagedjax.quantization.int4 import quantize_int4_jax
from pagedjax.quantization.weight import linear_features
from pagedjax.weights import resolve_sharding

INT4_GROUP_SIZE = 128  # AutoAWQ's and GPTQ's default (less where an in_features is not a multiple: tiny configs)
INT4_RMS = (sum(c * c for c in range(-8, 8)) / 16) ** 0.5  # of uniform codes 0..15 less their zero point 8


def quant_config(method: str | None, config: ModelConfig | None = None) -> QuantConfig | None:
    """The QuantConfig random weights of `config` are quantized with, for vLLM's `quantization` name."""
    if method is None:
        return None
    if method == "fp8":
        return QuantConfig.online("fp8")
    if method in ("awq", "gptq"):
        c = config
        ks = (c.hidden_size, c.num_heads * c.head_dim, c.intermediate_size) if c is not None else ()
        ks += (c.moe_intermediate_size,) if c is not None and c.num_experts else ()
        group = next((g for g in (INT4_GROUP_SIZE, 64, 32, 16, 8) if all(k % g == 0 for k in ks)), -1)
        q = {"quant_method": method, "bits": 4, "group_size": group, "zero_point": True,
             "version": "gemm", "desc_act": False}
        return QuantConfig.from_hf({"quantization_config": q})
    raise ValueError(f"random weights quantized with {method!r}: supported 'fp8', 'awq', 'gptq'")


def _draw_weight(shape: tuple[int, ...], dtype: str, kind: str, sharding_key: str, raw_key):
    """One leaf: norm scales 1, biases 0, other weights normal(0, INIT_STD), from uint32 key data;
    int4 experts' codes uniform, their zeros 8, scales INIT_STD / INT4_RMS and act-order
    row orders the identity. `sharding_key` names the output's placement for the executable
    cache (the jit holds it)."""
    del sharding_key
    if kind == "scale":
        return jnp.ones(shape, dtype)
    if kind == "bias":
        return jnp.zeros(shape, dtype)
    if kind == "int4_zero":
        return jnp.full(shape, 8, dtype)
    if kind == "int4_rows":  # [E, K]
        return jnp.broadcast_to(jnp.arange(shape[-1], dtype=dtype), shape)
    if kind == "int4_scale":
        return jnp.full(shape, INIT_STD / INT4_RMS, dtype)
    if jnp.dtype(dtype) == jnp.dtype(jnp.uint4):
        return jax.random.randint(jax.random.wrap_key_data(raw_key), shape, 0, 16).astype(dtype)
    draw_dtype = jnp.float32 if jnp.dtype(dtype) == jnp.dtype(jnp.float8_e4m3fn) else dtype  # FP8 experts: codes
    return (INIT_STD * jax.random.normal(jax.random.wrap_key_data(raw_key), shape, draw_dtype)).astype(dtype)


def _draw_quantized_linear(qcfg: QuantConfig, K: int, N: int, dtype: str, names: tuple[str, ...],
                           sharding_key: str, raw_key):
    """The params of one random [N, K] linear (by `names`), quantized on device as at load."""
    del sharding_key
    w = INIT_STD * jax.random.normal(jax.random.wrap_key_data(raw_key), (N, K), dtype)  # [N, K]
    if qcfg.weight_dtype == "fp8":
        q = quantize_fp8(w, strategy=qcfg.weight_strategy, block_size=qcfg.block_size)
    else:
        q = quantize_int4_jax(w, K if qcfg.group_size == -1 else qcfg.group_size)
    return tuple(q.params()[n] for n in names)


@functools.cache
def _jitted(fn, num_static: int, out_shardings):
    return jax.jit(fn, static_argnums=tuple(range(num_static)), out_shardings=out_shardings)


def _drawn(name: str, fn, static: tuple, out_shardings, key) -> Any:
    """fn(*static, key data) on device, its executable from pagedjax's executable cache: a warm
    start (the cache on disk) skips tracing and compiling the drawers, seconds on a GPU."""
    from pagedjax.compile_cache import compile_cache_dir, executable_cache

    static = (*static, repr(out_shardings))
    raw = jax.random.key_data(key)
    jitted = _jitted(fn, len(static), out_shardings)
    return executable_cache(compile_cache_dir()).get(name, jitted, (raw,), static_args=static)(raw)


def random_params(config: ModelConfig, *, dtype: Any = jnp.bfloat16, seed: int = 0, shardings: Any = None,
                  quantization: str | None = None) -> Params:
    """Params of `config` with random weights drawn on device; `shardings` as in load_params;
    `quantization` ("fp8", "awq", "gptq") quantizes the linears as they are drawn."""
    dtype = jnp.dtype(dtype)
    if quantization is not None:
        config = config.replace(quantization=quant_config(quantization, config))
    shapes, axes = abstract_params(config, dtype)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    axes_leaves = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    candidates = quantized_linears(config)  # those the model has hold a qvalue (an MoE router never does)
    quantized = {".".join(k.key for k in p[:-1]) for p, _ in leaves if p[-1].key == "qvalue"} & set(candidates)
    int4_codes = {".".join(k.key for k in p) for p, s in leaves if s.dtype == jnp.uint4}  # int4 experts
    key = jax.random.key(seed)
    arrays, drawn = [], {}
    for i, ((path, s), a) in enumerate(zip(leaves, axes_leaves)):
        keys = tuple(k.key for k in path)
        module = ".".join(keys[:-1])
        sharding = resolve_sharding(shardings, ".".join(keys), keys, a, s)
        if module in quantized:  # all params of the linear at its first, from one draw
            if module not in drawn:
                drawn[module] = _draw_quantized(config.quantization, module, leaves, axes_leaves, shardings,
                                                jax.random.fold_in(key, i), dtype)
            arrays.append(drawn[module][keys[-1]])
            continue
        name = ".".join(keys)
        kind = ("int4_scale" if name.endswith(SCALE_SUFFIX) and name.removesuffix(SCALE_SUFFIX) in int4_codes
                else "int4_zero" if name.endswith(ZERO_SUFFIX) and name.removesuffix(ZERO_SUFFIX) in int4_codes
                else "int4_rows" if name.endswith(ROWS_SUFFIX) and name.removesuffix(ROWS_SUFFIX) in int4_codes
                else "scale" if keys[-1] in ("scale", *KV_SCALES) or keys[-1].endswith(SCALE_SUFFIX)
                else "bias" if keys[-1] == "bias" else "weight")
        arrays.append(_drawn("draw", _draw_weight, (tuple(s.shape), s.dtype.name, kind), sharding,
                             jax.random.fold_in(key, i)))
    return Params({"params": jax.tree_util.tree_unflatten(treedef, arrays)}, config, tokenizer=None)


def _draw_quantized(qcfg: QuantConfig, module: str, leaves, axes_leaves, shardings, key, dtype) -> dict[str, jax.Array]:
    """{param name: array} of the quantized linear at `module`, each in its sharding."""
    mine = {}
    for (path, s), a in zip(leaves, axes_leaves):
        keys = tuple(k.key for k in path)
        if ".".join(keys[:-1]) == module:
            mine[keys[-1]] = (s, resolve_sharding(shardings, ".".join(keys), keys, a, s))
    K, N = linear_features(qcfg.weight_dtype, mine["qvalue"][0].shape)
    names = tuple(sorted(mine))
    draw = _drawn("draw_quantized", _draw_quantized_linear, (qcfg, K, N, jnp.dtype(dtype).name, names),
                  tuple(mine[n][1] for n in names), key)
    return dict(zip(names, draw))


def dummy_params(model: str | None, *, dtype: Any = jnp.bfloat16, seed: int = 0, shardings: Any = None,
                 mesh: jax.sharding.Mesh | None = None, quantization: str | None = None) -> Params:
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
    params = random_params(config, dtype=dtype, seed=seed, shardings=shardings, quantization=quantization)
    return Params(params.variables, config, tokenizer)
