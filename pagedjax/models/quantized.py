"""Quantized linears in the model: which linears a config's QuantConfig covers, and the quantized
form of `layers.Einsum` (its params declared by logical axes, the quantized matmul called).

Dims: T tokens (x's leading dims, flattened), K in_features (the kernel's contracted dims merged:
heads x head dim for o_proj), N out_features (its output dims merged: heads x head dim for q_proj).

A linear is quantized when the config carries a QuantConfig that covers the linear's HF module
name (its `ignore` list does not name it). The LM head never is: it stays in the model's dtype,
with the embeddings and the norms. The HF name comes from the family's weight map: our
"layers_0.attn.q_proj.kernel" is filled by "model.layers.0.self_attn.q_proj.weight", so the
QuantConfig is asked about "model.layers.0.self_attn.q_proj".

Under tensor parallelism the XLA path runs as GSPMD partitions it (dynamic activation scales stay
global: the same numbers as on one device); the CUDA custom calls run per shard in shard_map
(`quantized_matmul_tp`): column-parallel linears split N, row-parallel ones split K and
all-reduce, their dynamic activation scales then per shard, as vLLM's are.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax

from pagedjax.mesh import TP, tp_mesh
from pagedjax.quantization import QuantConfig, QuantizedWeight, param_specs, quantized_matmul, weight_from_params
from pagedjax.quantization.layer import quantized_matmul_tp
from pagedjax.quantization.linear import resolve_impl

LM_HEAD = "lm_head"  # HF's name of the output projection in every family


@functools.lru_cache(maxsize=64)
def quantized_linears(config) -> dict[str, str]:
    """{our module path ("layers_0.attn.q_proj"): its HF module name} of each quantized linear."""
    q = config.quantization
    if q is None:
        return {}
    from pagedjax.models.registry import family  # late: the registry imports the model files

    out = {}
    for hf, (ours, how) in family(config.architecture).weight_map.items():
        if how != "linear" or not isinstance(ours, str) or not ours.endswith(".kernel") or not hf.endswith(".weight"):
            continue  # fused tensors (GPT-2's c_attn, NeoX's qkv) are not quantizable here
        for i in range(config.num_layers) if "{}" in hf else (0,):
            hf_module = hf.removesuffix(".weight").replace("{}", str(i))
            if hf_module == LM_HEAD or hf_module.endswith("." + LM_HEAD):
                continue
            if q.is_quantized(hf_module):
                out[ours.removesuffix(".kernel").replace("{}", str(i))] = hf_module
    return out


@functools.lru_cache(maxsize=64)
def kv_scale_tensors(config) -> dict[str, tuple[str, ...]]:
    """{our param ("layers_0.attn.k_scale"): its checkpoint names} of each attention's FP8 KV-cache
    scale, for a quantization with a kv_cache_scheme; {} otherwise.

    llm-compressor saves them as "<attention>.k_scale" / ".v_scale"; older checkpoints as the
    k/v projections' "output_scale" (vLLM reads both). The attention is the module holding the
    family's k_proj / v_proj."""
    q = config.quantization
    if q is None or q.kv_cache_scheme is None:
        return {}
    from pagedjax.models.registry import family  # late: the registry imports the model files

    out = {}
    for hf, (ours, how) in family(config.architecture).weight_map.items():
        for proj, name in (("k_proj", "k_scale"), ("v_proj", "v_scale")):
            if how == "linear" and isinstance(ours, str) and ours.endswith(f".{proj}.kernel") \
                    and hf.endswith(f".{proj}.weight"):
                attn_hf, attn = hf.removesuffix(f".{proj}.weight"), ours.removesuffix(f".{proj}.kernel")
                for i in range(config.num_layers) if "{}" in hf else (0,):
                    out[f"{attn}.{name}".replace("{}", str(i))] = tuple(
                        n.replace("{}", str(i)) for n in (f"{attn_hf}.{name}", f"{attn_hf}.{proj}.output_scale"))
    if len(out) != 2 * config.num_layers:
        raise ValueError(f"{config.architecture}: checkpoint KV-cache scales (kv_cache_scheme) need separate "
                         f"k_proj / v_proj linears in every layer")
    return out


def linear_quantization(config, path: tuple[str, ...]) -> QuantConfig | None:
    """The QuantConfig of the linear at module `path` (Flax's Module.path), None if it is not quantized."""
    if config is None or config.quantization is None:
        return None
    return config.quantization if ".".join(path) in quantized_linears(config) else None


def linear_shape(eqn: str, shape: tuple[int, ...], axes: tuple[str | None, ...]):
    """An Einsum's (number of contracted kernel dims, K, N, in_axis, out_axis).

    The kernel must list its contracted dims first, in x's order, then its output dims in the
    result's order ("td,dnh->tnh", "tnh,nhd->td"): then x [..., K] @ w.T [K, N] reshapes to the
    einsum, and the merged dims are HF's [out, in] rows and columns.
    """
    x_dims, rest = eqn.split(",")
    k_dims, y_dims = rest.split("->")
    nc = sum(c in x_dims for c in k_dims)
    batch = x_dims[: len(x_dims) - nc]
    if x_dims != batch + k_dims[:nc] or y_dims != batch + k_dims[nc:]:
        raise ValueError(f"quantized Einsum {eqn!r}: the kernel must hold its contracted dims first, "
                         f"in the order of x, then the output dims")
    return nc, math.prod(shape[:nc]), math.prod(shape[nc:]), axes[0], axes[nc]


def quantized_einsum(module: nn.Module, qcfg: QuantConfig, eqn: str, shape: tuple[int, ...],
                     axes: tuple[str | None, ...], x: jax.Array) -> jax.Array:
    """The einsum of `layers.Einsum` on a quantized weight: declares the params, runs the matmul."""
    nc, K, N, in_axis, out_axis = linear_shape(eqn, shape, axes)
    specs = param_specs(qcfg, K, N, in_axis=in_axis, out_axis=out_axis)
    params = {name: module.param(name, nn.with_logical_partitioning(nn.initializers.zeros, s.axes), s.shape, s.dtype)
              for name, s in specs.items()}
    w = weight_from_params(qcfg, params, K, N)
    lead = x.shape[: x.ndim - nc]
    y = linear(x.reshape(-1, K), w, in_axis, out_axis)  # [T, N]
    return y.reshape(*lead, *shape[nc:])


def linear(x: jax.Array, w: QuantizedWeight, in_axis: str | None, out_axis: str | None) -> jax.Array:
    """y [T, N] = x [T, K] @ w.T; per shard in shard_map when a custom call runs under a tp mesh."""
    mesh = tp_mesh()
    split = None if mesh is None else tp_split(in_axis, out_axis)
    impl = None if split is None else shard_map_impl(w, x)
    if impl is not None:
        return quantized_matmul_tp(x, w, mesh, split=split, impl=impl)
    return quantized_matmul(x, w)


def tp_split(in_axis: str | None, out_axis: str | None) -> str | None:
    """"out" (column parallel), "in" (row parallel) or None, by pagedjax.parallel's one table."""
    from pagedjax.parallel import LOGICAL_AXIS_RULES  # late: parallel imports the models

    if LOGICAL_AXIS_RULES.get(out_axis) == TP:
        return "out"
    if LOGICAL_AXIS_RULES.get(in_axis) == TP:
        return "in"
    return None


def shard_map_impl(w: QuantizedWeight, x: jax.Array) -> str | None:
    """The impl run per shard in shard_map under tensor parallelism: "ffi" where the custom call
    serves this matmul; None (GSPMD partitions the XLA path) elsewhere."""
    return "ffi" if resolve_impl("auto", w, x.dtype, x.shape[0]) == "ffi" else None
