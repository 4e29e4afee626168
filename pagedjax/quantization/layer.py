"""What a quantized linear layer declares and calls: param specs, its QuantizedWeight, kv-head
replicas, and the tensor-parallel matmul.

Dims: T tokens, K in_features, N out_features (heads x H when the layer's kernel keeps heads as
their own dim: q_proj [D, N, H] quantizes as one [N * H, D] weight), H head dim.

A layer holds its quantized weight as plain params ({"qvalue", "scale"[, "zero"][, "input_scale"][, "perm"]},
each with logical axis names), so Params, abstract_params, the loader's dotted paths and the
sharding rules see ordinary arrays; `weight_from_params` rebuilds the QuantizedWeight (static
layout from the QuantConfig) right where `quantized_matmul` needs it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from pagedjax.quantization.config import QuantConfig
from pagedjax.quantization.linear import quantized_matmul
from pagedjax.quantization.weight import INT4_TILE_N, QuantizedWeight, expected_shapes, logical_axes


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One param of a quantized linear: shape, dtype and logical axis names."""

    shape: tuple[int, ...]
    dtype: Any
    axes: tuple[str | None, ...]


def _group_size(config: QuantConfig, in_features: int) -> int:
    return in_features if config.group_size == -1 else config.group_size


def param_specs(config: QuantConfig, in_features: int, out_features: int, *, in_axis: str | None,
                out_axis: str | None, scale_dtype=jnp.float16) -> dict[str, ParamSpec]:
    """The params a quantized [out_features, in_features] linear declares (int4 scales in scale_dtype:
    f16 for AWQ / GPTQ checkpoints)."""
    static = config.activation == "static"
    shapes = expected_shapes(config.weight_dtype, in_features, out_features, weight_strategy=config.weight_strategy,
                             block_size=config.block_size, group_size=_group_size(config, in_features),
                             static_input=static, act_order=config.act_order)
    axes = logical_axes(config.weight_dtype, out_axis, in_axis, weight_strategy=config.weight_strategy,
                        static_input=static, act_order=config.act_order)
    out = {}
    for name, (shape, dtypes) in shapes.items():
        dtype = scale_dtype if (config.weight_dtype, name) == ("int4", "scale") else dtypes[0]
        out[name] = ParamSpec(shape, jnp.dtype(dtype), axes[name])
    return out


def weight_from_params(config: QuantConfig, params: Mapping[str, Any], in_features: int,
                       out_features: int) -> QuantizedWeight:
    """A layer's quantized params -> the QuantizedWeight quantized_matmul takes."""
    return QuantizedWeight(params["qvalue"], params["scale"], params.get("zero"), params.get("input_scale"),
                           config.weight_dtype, in_features, out_features, block_size=config.block_size,
                           group_size=_group_size(config, in_features) if config.weight_dtype == "int4" else 0,
                           activation=config.activation, perm=params.get("perm"))


def repeat_out_heads(w: QuantizedWeight, num_heads: int, repeat: int) -> QuantizedWeight:
    """Each of the num_heads heads along N repeated `repeat` times (head j of the result is head
    j // repeat of w), as pagedjax.parallel.repeat_kv_heads does to bf16 k/v kernels when the
    mesh has more devices than kv heads. Numpy in, numpy out (load time); jax arrays also work."""
    if repeat == 1:
        return w
    N = w.out_features
    if N % num_heads:
        raise ValueError(f"out_features {N} is not {num_heads} heads")
    H = N // num_heads

    def rep(a, axis: int, unit: int):
        """Repeat blocks of `unit` rows (one head) along `axis` of a."""
        if unit <= 0 or a.shape[axis] != num_heads * unit:
            raise ValueError(f"a head of {H} does not cover whole units of this {w.kind} layout ({a.shape})")
        xp = np if isinstance(a, np.ndarray) else jnp
        shape = a.shape[:axis] + (num_heads, unit) + a.shape[axis + 1:]
        out = xp.repeat(a.reshape(shape), repeat, axis=axis)
        return out.reshape(a.shape[:axis] + (num_heads * repeat * unit,) + a.shape[axis + 1:])

    if w.kind == "int4":
        if H % INT4_TILE_N:
            raise ValueError(f"int4 kv-head replicas need a head dim that is a multiple of {INT4_TILE_N}, got {H}")
        qvalue = rep(w.qvalue, 0, H // INT4_TILE_N)
        scale, zero = rep(w.scale, 1, H), rep(w.zero, 1, H)
    else:
        qvalue, scale, zero = rep(w.qvalue, 0, H), w.scale, None
        if w.weight_strategy == "channel":
            scale = rep(w.scale, 0, H)
        elif w.weight_strategy == "block":
            bn = w.block_size[0]
            if H % bn:
                raise ValueError(f"fp8 kv-head replicas need whole {bn}-row blocks per head, got head dim {H}")
            scale = rep(w.scale, 0, H // bn)
    return dataclasses.replace(w, qvalue=qvalue, scale=scale, zero=zero, out_features=N * repeat)


def quantized_matmul_tp(x: jax.Array, w: QuantizedWeight, mesh: Mesh, *, split: str, axis: str = "tp",
                        impl: str = "auto") -> jax.Array:
    """y [T, N] = x [T, K] @ w.T with w split over mesh axis `axis`, each shard's matmul in shard_map.

    split "out" (column parallel: q/k/v, gate/up): x replicated, y [T, N] split along N.
    split "in" (row parallel: o_proj, down): x split along K, partial sums all-reduced, y replicated.
    A custom call on sharded operands outside shard_map would be gathered whole on every device.
    Dynamic activation scales are then per shard (each device quantizes its slice of x, as vLLM's
    row-parallel layers do).
    """
    if split not in ("out", "in"):
        raise ValueError(f"quantized_matmul_tp: split must be 'out' or 'in', got {split!r}")
    tp = mesh.shape[axis]
    K, N = w.in_features, w.out_features
    local_k, local_n = (K, N // tp) if split == "out" else (K // tp, N)
    if (N if split == "out" else K) % tp:
        raise ValueError(f"quantized_matmul_tp: {split}_features {N if split == 'out' else K} do not divide "
                         f"over {tp} devices")
    axes = logical_axes(w.kind, axis if split == "out" else None, axis if split == "in" else None,
                        weight_strategy=w.weight_strategy, static_input=w.input_scale is not None,
                        act_order=w.act_order)
    specs = dataclasses.replace(w, **{name: P(*a) for name, a in axes.items()})
    local = dataclasses.replace(w, in_features=local_k, out_features=local_n)
    expected_shapes(w.kind, local_k, local_n, weight_strategy=w.weight_strategy, block_size=w.block_size,
                    group_size=w.group_size, act_order=w.act_order)  # raises unless a shard holds whole
    # tiles and groups
    if w.block_size is not None and (local_n % w.block_size[0] or local_k % w.block_size[1]):
        raise ValueError(f"quantized_matmul_tp: a shard [{local_n}, {local_k}] splits fp8 blocks {w.block_size}")

    def body(x, w_shard):
        w_shard = dataclasses.replace(w_shard, in_features=local.in_features, out_features=local.out_features)
        if w_shard.act_order and split == "in":  # x whole: this shard's rows read the channels of its perm
            x, w_shard = jnp.take(x, w_shard.perm, axis=1), dataclasses.replace(w_shard, perm=None)
        y = quantized_matmul(x, w_shard, impl=impl)
        return jax.lax.psum(y, axis) if split == "in" else y

    x_spec = P() if split == "out" or w.act_order else P(None, axis)  # act order: x whole (gathered)
    y_spec = P(None, axis) if split == "out" else P()
    return jax.shard_map(body, mesh=mesh, in_specs=(x_spec, specs), out_specs=y_spec, axis_names={axis},
                         check_vma=False)(x, w)
