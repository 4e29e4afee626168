"""Tensor parallelism: the mesh, the one table of logical axis -> mesh axis rules, multi-host.

Megatron split over the mesh axis "tp", declared once in LOGICAL_AXIS_RULES and applied where
weights and the pool are placed; the model files only name logical axes, and XLA's partitioner
(GSPMD) inserts the collectives:

  q/k/v, MLP gate/up/fc_in   split by columns (heads, kv_heads, mlp)  no communication
  attention out, MLP down    split by rows (heads, mlp)               one all-reduce [T, D] each
  embedding                  vocab-parallel: each device looks up its rows, zeros elsewhere,
                             one all-reduce [T, D]
  LM head (tied or not)      vocab-parallel columns; the logits [S, V] are gathered once, for
                             sampling (the step constrains them replicated)
  page pool [P, B, K, H]     split on kv heads: each device stores and reads its own heads
  norms, biases over D       replicated (the residual stream [T, D] is replicated)
  MoE experts [X, D, F]      tensor parallel within each expert: every device holds F / tp columns
                             of every expert ("moe_mlp"), one all-reduce [T, D] after the layer;
                             or, with expert parallelism (vLLM's --enable-expert-parallel, the
                             config's `expert_parallel`), X / tp whole experts each ("experts"),
                             the same one all-reduce. The router is replicated.

A vocabulary that does not divide by tp is replicated instead (vLLM pads it; we do not).
Fewer kv heads than devices (K < tp, GQA): as vLLM does, each kv head is replicated on the
tp / K devices whose query heads use it. `tp_config` turns such a config into one with tp kv
heads (kv head j of the new config = kv head j // (tp / K) of the old one: query head n still
reads kv head n // (N / K)), and the loaders repeat k_proj / v_proj to match, so every device
holds exactly one kv head of weights and of pool: 1 / K of the unexpanded pool.

Data parallelism: `make_mesh(tp, dp)` lays devices out as [dp, tp]; each row (`replica_meshes`)
serves one engine of its own. An engine's mesh has dp = 1.

Multi-host (`initialize_distributed`): every process runs the same program on the global mesh.
Scheduling is made identically everywhere rather than on process 0 and broadcast: each
process builds the same engine (same EngineConfig, seed included) and adds the same requests in
the same order; the scheduler is plain deterministic Python, and the sampled tokens of each
step come back replicated to every process, so every process takes the same decisions and
feeds the same global step. Nothing is broadcast; inputs that differ across processes (a
server's HTTP requests) would have to be broadcast first, which is not implemented.

Dims: N query heads, K kv heads, H head dim, D hidden, F MLP width, V vocab, P pages, B page size,
X experts.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pagedjax.mesh import DP, TP, use_mesh  # re-exported: callers name them from here too
from pagedjax.models import abstract_params
from pagedjax.models.config import ModelConfig
from pagedjax.models.quantized import quantized_linears
from pagedjax.params import Params

# The one table: logical axis -> mesh axis (None: replicated). Unlisted axes are replicated.
LOGICAL_AXIS_RULES: dict[str, str | None] = {
    "heads": TP,  # q/k/v columns and attention-out rows: one all-reduce after attention
    "kv_heads": TP,  # k/v columns and the page pool (replicated up to tp first when K < tp)
    "mlp": TP,  # gate/up/fc_in columns and down/fc_out rows: one all-reduce after the MLP
    "vocab": TP,  # vocab-parallel embedding and LM head
    "embed": None,  # the residual stream stays replicated
    "head_dim": None,
    "norm": None,
    "experts": None,  # MoE: every device holds a slice of every expert ...
    "moe_mlp": TP,  # ... its columns of the expert MLPs (gate/up columns, down rows)
}
# Expert parallelism: whole experts per device instead (and nothing else changes).
EXPERT_PARALLEL_RULES: dict[str, str | None] = {**LOGICAL_AXIS_RULES, "experts": TP, "moe_mlp": None}
# Logical axes replicated when their size does not divide by the mesh axis (others raise).
REPLICATE_IF_INDIVISIBLE = ("vocab",)


# --- the mesh -------------------------------------------------------------------------------


def make_mesh(tensor_parallel_size: int, data_parallel_size: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("dp", "tp") mesh of the first dp * tp devices (default: all devices of all processes).

    Consecutive devices form a tp group, so tp stays within a host while it fits in one.
    """
    tp, dp = tensor_parallel_size, data_parallel_size
    if not (isinstance(tp, int) and isinstance(dp, int) and tp >= 1 and dp >= 1):
        raise ValueError(f"tensor_parallel_size {tp!r} and data_parallel_size {dp!r} must be ints >= 1")
    devices = list(jax.devices() if devices is None else devices)
    if tp * dp > len(devices):
        raise ValueError(f"tensor_parallel_size {tp} x data_parallel_size {dp} needs {tp * dp} "
                         f"devices, have {len(devices)}")
    return Mesh(np.array(devices[:tp * dp], dtype=object).reshape(dp, tp), (DP, TP))


def replica_meshes(mesh: Mesh) -> list[Mesh]:
    """The tp sub-mesh of each data-parallel replica (one engine each)."""
    return [Mesh(row[None, :], (DP, TP)) for row in mesh.devices]


def tp_size(mesh: Mesh | None) -> int:
    """Devices along the mesh's "tp" axis (1 without a mesh)."""
    return 1 if mesh is None else int(mesh.shape.get(TP, 1))


def replicated(mesh: Mesh) -> NamedSharding:
    """The same full copy on every device of the mesh (step inputs and outputs)."""
    return NamedSharding(mesh, P())


def mesh_of(params: Params) -> Mesh | None:
    """The tensor-parallel mesh the params are sharded over, or None (one device, or no tp)."""
    for x in jax.tree.leaves(params.variables):
        s = getattr(x, "sharding", None)
        if isinstance(s, NamedSharding) and tp_size(s.mesh) > 1:
            return s.mesh
    return None


def mesh_for(params: Params, tensor_parallel_size: int) -> Mesh | None:
    """An engine's mesh: the params' own if it has this tp size, else make_mesh(tp); None for tp 1."""
    mesh = mesh_of(params)
    if tp_size(mesh) == tensor_parallel_size:
        return mesh
    if tensor_parallel_size == 1:
        raise ValueError(f"the params are sharded over {tp_size(mesh)} devices: pass "
                         f"tensor_parallel_size={tp_size(mesh)} (or leave it unset)")
    return make_mesh(tensor_parallel_size)


# --- configs, logical axes -> shardings -----------------------------------------------------


def axis_rules(expert_parallel: bool = False) -> dict[str, str | None]:
    """The logical axis -> mesh axis table: with or without expert parallelism."""
    return EXPERT_PARALLEL_RULES if expert_parallel else LOGICAL_AXIS_RULES


def check_tensor_parallel(config: ModelConfig, tensor_parallel_size: int) -> None:
    """Raises ValueError unless `config` can be split over tensor_parallel_size devices."""
    tp, N, K = tensor_parallel_size, config.num_heads, config.num_kv_heads
    name = config.name or config.architecture
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tensor_parallel_size must be an int >= 1, got {tp!r}")
    if N % tp:
        raise ValueError(f"{name}: {N} attention heads do not divide over tensor_parallel_size {tp}")
    if K % tp and tp % K:
        raise ValueError(f"{name}: {K} kv heads neither divide over tensor_parallel_size {tp} nor "
                         f"divide it (needed to replicate them)")
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_layers))
    if moe_layers < config.num_layers and config.intermediate_size % tp:
        raise ValueError(f"{name}: MLP width {config.intermediate_size} does not divide over "
                         f"tensor_parallel_size {tp}")
    if moe_layers and config.expert_parallel and config.num_experts % tp:
        raise ValueError(f"{name}: {config.num_experts} experts do not divide over tensor_parallel_size {tp} "
                         f"(expert parallelism splits whole experts)")
    if moe_layers and not config.expert_parallel and config.moe_intermediate_size % tp:
        raise ValueError(f"{name}: expert MLP width {config.moe_intermediate_size} does not divide over "
                         f"tensor_parallel_size {tp} (try expert parallelism)")
    block = config.quantization.expert_block_size if config.quantization is not None else None
    F = config.moe_intermediate_size
    if moe_layers and not config.expert_parallel and block and tp > 1 and any((F // tp) % b for b in block):
        raise ValueError(f"{name}: block-FP8 experts ({block[0]} x {block[1]} blocks) split over "
                         f"tensor_parallel_size {tp} give each device {F // tp} of the {F} expert MLP columns, "
                         f"not whole blocks (try expert parallelism, or a tensor_parallel_size that splits "
                         f"the width into multiples of the block)")
    group = config.quantization.expert_group_size if config.quantization is not None else None
    group = F if group == -1 else group
    if moe_layers and not config.expert_parallel and group and tp > 1 and (F // tp) % group:
        raise ValueError(f"{name}: int4 experts (groups of {group} rows) split over tensor_parallel_size {tp} "
                         f"give each device {F // tp} of the {F} rows of down_proj, not whole groups (try expert "
                         f"parallelism, or a tensor_parallel_size that splits the width into multiples of the group)")
    if moe_layers and not config.expert_parallel and group and config.quantization.act_order and tp > 1:
        raise ValueError(f"{name}: act-order int4 experts (GPTQ desc_act) split over tensor_parallel_size {tp}: "
                         f"each expert's {F} rows of down_proj are held in its own group order, a permutation "
                         f"over all of them, so no device's slice of the width holds its own rows (use expert "
                         f"parallelism: whole experts per device)")


def tp_config(config: ModelConfig, tensor_parallel_size: int) -> ModelConfig:
    """The config the model runs with over tp devices: kv heads replicated up to tp when K < tp."""
    check_tensor_parallel(config, tensor_parallel_size)
    if config.num_kv_heads >= tensor_parallel_size:
        return config
    return config.replace(num_kv_heads=tensor_parallel_size)


def repeat_kv_heads(w, axes: Sequence[str | None], repeat: int):
    """Repeats each kv head of a weight `repeat` times along its "kv_heads" dim (numpy or jax)."""
    if repeat == 1 or "kv_heads" not in tuple(axes):
        return w
    xp = np if isinstance(w, np.ndarray) else jnp
    return xp.repeat(w, repeat, axis=tuple(axes).index("kv_heads"))


def logical_spec(axes: Sequence[str | None], shape: Sequence[int], mesh, rules: dict | None = None) -> P:
    """The mesh PartitionSpec of an array with these logical axes, by `rules` (LOGICAL_AXIS_RULES)."""
    rules = LOGICAL_AXIS_RULES if rules is None else rules
    spec, used = [], set()
    for name, n in zip(tuple(axes), shape):
        axis = rules.get(name) if name else None
        if axis is not None and axis not in mesh.shape:
            axis = None
        if axis is not None and n % mesh.shape[axis]:
            if name not in REPLICATE_IF_INDIVISIBLE:
                raise ValueError(f"logical axis {name!r} of size {n} does not divide over mesh axis "
                                 f"{axis!r} of size {mesh.shape[axis]}")
            axis = None
        if axis is not None and axis in used:
            raise ValueError(f"logical axes {tuple(axes)} map mesh axis {axis!r} twice")
        used.add(axis)
        spec.append(axis)
    return P(*spec)


def param_shardings(config: ModelConfig, mesh: Mesh) -> dict[str, Any]:
    """NamedShardings shaped like `Params.variables` ({"params": ...}) for `config` on `mesh`.

    Usable as `load_params(..., shardings=...)` and `random_params(tp_config(config, tp), ...)`.
    """
    config = tp_config(config, tp_size(mesh))
    shapes, axes = abstract_params(config)
    rules = axis_rules(config.expert_parallel)
    tree = jax.tree.map(lambda s, a: NamedSharding(mesh, logical_spec(a, s.shape, mesh, rules)), shapes, axes,
                        is_leaf=lambda x: isinstance(x, P))
    return {"params": tree}


def pool_sharding(config: ModelConfig, mesh: Mesh) -> NamedSharding:
    """The page pool's sharding, [P, B, K, H] split on kv heads (of tp_config(config))."""
    K = tp_config(config, tp_size(mesh)).num_kv_heads
    return NamedSharding(mesh, logical_spec((None, None, "kv_heads", "head_dim"), (1, 1, K, 1), mesh))


@functools.cache
def _placer(repeat: int, axes: tuple, sharding: NamedSharding):
    return jax.jit(lambda w: repeat_kv_heads(w, axes, repeat), out_shardings=sharding)


def shard_params(params: Params, mesh: Mesh) -> Params:
    """Params placed on `mesh` by the rules (kv heads replicated when K < tp); a no-op when in place.

    For weights already in memory. To load a checkpoint straight into its shards use
    `load_params(path, mesh=mesh)`.
    """
    cfg = tp_config(params.config, tp_size(mesh))
    repeat = cfg.num_kv_heads // params.config.num_kv_heads
    shardings = param_shardings(cfg, mesh)
    _, axes = abstract_params(cfg)
    axes = {"params": axes}
    variables = params.variables
    quantized = quantized_linears(cfg)
    if repeat > 1 and quantized:  # whole kv heads of a quantized linear: its params repeated together
        variables = _repeat_quantized_kv(variables, cfg, params.config.num_kv_heads, repeat, axes)

    def place(path, x, a, s):
        a = tuple(a)
        if repeat == 1 and isinstance(x, jax.Array) and x.sharding.is_equivalent_to(s, x.ndim):
            return x
        in_quantized = ".".join(k.key for k in path[1:-1]) in quantized
        if repeat == 1 or "kv_heads" not in a or in_quantized:
            return jax.device_put(x, s)
        return _placer(repeat, a, s)(x)

    variables = jax.tree_util.tree_map_with_path(place, variables, axes, shardings,
                                                 is_leaf=lambda x: isinstance(x, P))
    return Params(variables, cfg, params.tokenizer)


def _repeat_quantized_kv(variables, cfg: ModelConfig, num_kv_heads: int, repeat: int, axes):
    """The variables with each quantized kv-head linear's weight repeated whole heads at a time."""
    from pagedjax.quantization import repeat_out_heads, weight_from_params
    from pagedjax.quantization.weight import linear_features

    out = jax.tree.map(lambda x: x, variables)  # a copy of the containers
    for module in quantized_linears(cfg):  # candidates: an MoE family's map names modules some layers lack
        keys = module.split(".")
        node, ax = out["params"], axes["params"]
        for k in keys:
            node, ax = node.get(k, {}), ax.get(k, {})
        if "qvalue" not in node or "kv_heads" not in tuple(ax["qvalue"]):
            continue
        K, N = linear_features(cfg.quantization.weight_dtype, node["qvalue"].shape)
        w = repeat_out_heads(weight_from_params(cfg.quantization, node, K, N), num_kv_heads, repeat)
        node.clear()
        node.update(w.params())
    return out


def per_device_bytes(arrays) -> dict[jax.Device, int]:
    """Bytes each device holds of a pytree of arrays (its addressable shards)."""
    out: dict[jax.Device, int] = {}
    for x in jax.tree.leaves(arrays):
        for shard in x.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + math.prod(shard.data.shape) * x.dtype.itemsize
    return out


# --- inside the jitted step -----------------------------------------------------------------


def constrain_step(logits: jax.Array, pages, mesh: Mesh | None):
    """Gathers vocab-sharded logits [S, V] once (replicated, for sampling); keeps the pool split.

    The logits are first pinned vocab-sharded, so that XLA gathers them rather than the (much
    larger) embedding table of a tied head.
    """
    if mesh is None:
        return logits, pages
    wsc = jax.lax.with_sharding_constraint
    vocab = logical_spec((None, "vocab"), logits.shape, mesh)
    logits = wsc(wsc(logits, NamedSharding(mesh, vocab)), replicated(mesh))
    pool = NamedSharding(mesh, logical_spec((None, None, "kv_heads", None), pages[0][0].shape, mesh))
    pages = [(wsc(k, pool), wsc(v, pool)) for k, v in pages]
    return logits, pages


# --- multi-host -----------------------------------------------------------------------------


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, local_device_ids: Sequence[int] | None = None,
                           cpu_collectives: str = "gloo", initialization_timeout: int = 300) -> None:
    """Joins this process to a multi-host run: `jax.distributed.initialize`, before any computation.

    Then jax.devices() lists every process's devices, `make_mesh` spans them, and every process
    must run the same engine on the same requests (see the module docstring). On CPU the
    cross-process collectives go through `cpu_collectives` ("gloo" or "mpi"). Arguments left
    None are auto-detected by JAX where the cluster says (SLURM, Open MPI, cloud TPU).
    """
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               local_device_ids=local_device_ids,
                               initialization_timeout=initialization_timeout)
