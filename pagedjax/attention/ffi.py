"""Paged attention as the XLA FFI custom call "pagedjax_paged_attention" (xla_kernels/).

Dims: T tokens in the flat batch, R requests, M max pages per request, N query heads, K kv heads,
H head dim, P pages, B page size, S split-KV partitions.

One call serves the whole ragged batch (decode tokens and prefill chunks alike). The CUDA handler
splits long contexts over S partitions when the grid would otherwise leave SMs idle; S is chosen
here from static shapes only (so the call is safe inside CUDA graphs) and its scratch is the
call's second output, never a malloc. The CPU handler runs the same signature (S is ignored).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import pagedjax._ffi as _ffi
from pagedjax.attention.metadata import AttentionMetadata

TARGET = "pagedjax_paged_attention"
KERNELS = {"auto": 0, "simt": 1, "tensor_core": 2}  # the `kernel` attribute (CUDA only)
MAX_SPLITS = 32  # the heuristic's cap (the handler accepts up to 256)
MIN_SPLIT_POSITIONS = 512  # a split should have at least this many positions of a full context
WORKSPACE_BUDGET_BYTES = 256 << 20


@functools.cache
def _num_sms() -> int:
    """Streaming multiprocessors of the default device (132 on an H100 SXM if unknown)."""
    return int(getattr(jax.devices()[0], "core_count", 0) or 132)


def choose_num_splits(num_tokens: int, num_reqs: int, num_heads: int, num_kv_heads: int,
                      head_dim: int, max_context: int, num_sms: int) -> int:
    """Split-KV partitions for a call, from static shapes only.

    Without splitting the grid has about max(min(T, R), T / 16) * K blocks; split when that is
    under one block per SM, aiming at two, with at least MIN_SPLIT_POSITIONS positions of a
    full-length context per split and the partials within WORKSPACE_BUDGET_BYTES.
    """
    blocks = max(min(num_tokens, num_reqs), num_tokens // 16, 1) * num_kv_heads
    if blocks >= num_sms:
        return 1
    splits = min(math.ceil(2 * num_sms / blocks), max_context // MIN_SPLIT_POSITIONS, MAX_SPLITS)
    per_split = num_tokens * num_heads * (head_dim + 1) * 4
    splits = min(splits, WORKSPACE_BUDGET_BYTES // max(per_split, 1))
    return max(int(splits), 1)


def workspace_elements(num_splits: int, num_tokens: int, num_heads: int, head_dim: int) -> int:
    """f32 elements of split-KV scratch: o [S, T, N, H] then lse [S, T, N] (1 when S == 1)."""
    return 1 if num_splits <= 1 else num_splits * num_tokens * num_heads * (head_dim + 1)


def paged_attention_call(
    q: jax.Array,  # [T, N, H]
    k_pages: jax.Array,  # [P, B, K, H]
    v_pages: jax.Array,  # [P, B, K, H]
    block_tables: jax.Array,  # [R, M] int32
    seq_lens: jax.Array,  # [R] int32
    query_start_loc: jax.Array,  # [R+1] int32
    *,
    scale: float,
    num_splits: int | None = None,
    kernel: str = "auto",
) -> jax.Array:
    """The custom call on local (unsharded) arrays; returns out [T, N, H] in q's dtype."""
    if kernel not in KERNELS:
        raise ValueError(f"paged_attention_ffi: unknown kernel {kernel!r} (expected one of {list(KERNELS)})")
    backend = jax.default_backend()
    _ffi.require(TARGET, backend)
    T, N, H = q.shape
    R, M = block_tables.shape
    if num_splits is None:
        num_splits = 1 if backend != "gpu" else choose_num_splits(
            T, R, N, k_pages.shape[2], H, M * k_pages.shape[1], _num_sms())
    out_type = jax.ShapeDtypeStruct((T, N, H), q.dtype)  # [T, N, H]
    ws_type = jax.ShapeDtypeStruct((workspace_elements(num_splits, T, N, H),), jnp.float32)
    out, _ = jax.ffi.ffi_call(TARGET, (out_type, ws_type))(
        q, k_pages, v_pages, block_tables, seq_lens, query_start_loc,
        scale=np.float32(scale), num_splits=np.int32(num_splits), kernel=np.int32(KERNELS[kernel]))
    return out


def paged_attention_sharded(
    q: jax.Array,  # [T, N, H], N sharded over `axis`
    k_pages: jax.Array,  # [P, B, K, H], K sharded over `axis`
    v_pages: jax.Array,  # [P, B, K, H], K sharded over `axis`
    meta: AttentionMetadata,  # replicated
    *,
    scale: float,
    mesh: Mesh,
    axis: str = "tp",
    num_splits: int | None = None,
    kernel: str = "auto",
) -> jax.Array:
    """The custom call per device under tensor parallelism: heads split over mesh `axis`.

    A custom call on sharded inputs outside shard_map would be all-gathered; inside, each device
    attends with its own query and kv heads (N and K must both divide by the axis size).
    """
    tp = mesh.shape[axis]
    N, K = q.shape[1], k_pages.shape[2]
    if N % tp or K % tp:
        raise ValueError(f"paged_attention_ffi: {N} query heads and {K} kv heads must divide over "
                         f"{tp} devices of mesh axis {axis!r}")
    heads = P(None, axis, None)  # [T, N, H]
    pool = P(None, None, axis, None)  # [P, B, K, H]
    body = functools.partial(paged_attention_call, scale=scale, num_splits=num_splits, kernel=kernel)
    return jax.shard_map(
        body, mesh=mesh, in_specs=(heads, pool, pool, P(), P(), P()), out_specs=heads,
        axis_names={axis}, check_vma=False,
    )(q, k_pages, v_pages, meta.block_tables, meta.seq_lens, meta.query_start_loc)


def paged_attention_ffi(
    q: jax.Array,  # [T, N, H]
    k_pages: jax.Array,  # [P, B, K, H]
    v_pages: jax.Array,  # [P, B, K, H]
    meta: AttentionMetadata,
    *,
    scale: float,
    mesh: Mesh | None = None,
    axis: str = "tp",
    num_splits: int | None = None,
    kernel: str = "auto",
) -> jax.Array:
    """Causal paged attention of the ragged batch `meta` describes; returns [T, N, H].

    Args:
      mesh / axis: when given, run under shard_map with heads split over `axis`.
      num_splits: split-KV partitions (CUDA); default chosen from static shapes.
      kernel: "auto", "simt" (CUDA cores) or "tensor_core": which CUDA kernels run (for tests).
    Padding tokens (index >= query_start_loc[R]) get zeros.
    """
    if mesh is not None:
        return paged_attention_sharded(q, k_pages, v_pages, meta, scale=scale, mesh=mesh, axis=axis,
                                       num_splits=num_splits, kernel=kernel)
    return paged_attention_call(q, k_pages, v_pages, jnp.asarray(meta.block_tables),
                                jnp.asarray(meta.seq_lens), jnp.asarray(meta.query_start_loc),
                                scale=scale, num_splits=num_splits, kernel=kernel)


# The name pagedjax.attention.paged_attention dispatches to.
paged_attention = paged_attention_ffi
