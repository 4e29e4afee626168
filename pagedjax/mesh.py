"""The device mesh seen from the kernels: axis names and the ambient mesh while tracing.

Imports only jax, so the attention and page-pool wrappers can find the tensor-parallel axis
without importing the model-level sharding rules of pagedjax.parallel.
"""

from __future__ import annotations

import contextlib

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

TP = "tp"  # tensor parallelism: heads, kv heads, MLP columns and the page pool split over it
DP = "dp"  # data parallelism: one engine per row of the [dp, tp] device grid


def use_mesh(mesh: Mesh | None):
    """Context making `mesh` the ambient mesh while tracing (no-op for None).

    Inside it, bare PartitionSpecs work in sharding constraints and `jax.shard_map` can take
    `jax.sharding.get_abstract_mesh()`: how a custom call learns the mesh it runs under.
    """
    if mesh is None:
        return contextlib.nullcontext()
    return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def tp_mesh(axis: str = TP):
    """The mesh the step is being traced under, when it splits `axis` over several devices."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.shape.get(axis, 1) <= 1:
        return None
    return mesh


def match_spec(x: jax.Array, mesh, spec: PartitionSpec) -> jax.Array:
    """x resharded to `spec` where the mesh has Explicit axes (shard_map then requires operands
    sharded as its in_specs say); under Auto axes shard_map reshards by itself."""
    if any(t == AxisType.Explicit for t in mesh.axis_types):
        return jax.reshard(x, NamedSharding(mesh, spec))
    return x
