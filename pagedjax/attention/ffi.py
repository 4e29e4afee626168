"""Paged attention as the XLA FFI custom call "pagedjax_paged_attention" (xla_kernels/).

Dims: T tokens in the flat batch, R requests, M max pages per request, N query heads, K kv heads,
H head dim, P pages, B page size, S split-KV partitions.

One call serves the whole ragged batch (decode tokens and prefill chunks alike). The CUDA handler
splits long contexts over S partitions when the grid would otherwise leave SMs idle; S is chosen
here from static shapes only (so the call is safe inside CUDA graphs) and its scratch is the
call's second output, never a malloc. The CPU handler runs the same signature (S is ignored).
The sliding window and soft-cap are static attributes (0: none); the pool's dequantization
scales k_scale, v_scale [K] are operands (ones for a pool in q's dtype, the FP8 cache's scales).
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
from pagedjax.kv_cache.kv_dtype import is_fp8
from pagedjax.attention.options import check_options
from pagedjax.kv_cache import kv_dtype
from pagedjax.mesh import TP, match_spec

TARGET = "pagedjax_paged_attention"
# The `kernel` attribute (CUDA only). "invariant" (batch_invariant): every token's sums in the same
# order whatever its batch, chunk or neighbours (the tensor-core kernel's 64-row tiles for every
# request, K/V tiles at multiples of 64 positions; SIMT where no tensor-core kernel applies), unsplit.
# "invariant16": the same guarantee on the decode kernel's 16-row tiles for every request, each
# 64-position K/V tile's four 16-position steps on their own warps, merged in one order.
KERNELS = {"auto": 0, "simt": 1, "tensor_core": 2, "invariant": 3, "invariant16": 4}
INVARIANT = ("invariant", "invariant16")
# The tensor-core kernels exist for these head dims with bf16/f16 queries (the pool in q's dtype or
# fp8): the extension's kTensorCoreHeadDims (xla_kernels/paged_attention.h), also in a CPU-only
# build. "auto" runs SIMT elsewhere, a forced "tensor_core" raises.
TENSOR_CORE_HEAD_DIMS = _ffi.tensor_core_head_dims()
MAX_SPLITS = 32  # the heuristic's cap (the handler accepts up to 256)
HANDLER_MAX_SPLITS = 256  # kMaxSplits
MIN_SPLIT_POSITIONS = 512  # the model gives a split at least this many positions of a full context
SPLIT_GRANULE = 64  # kSplitGranule: a split starts at a multiple of this many positions
WORKSPACE_BUDGET_BYTES = 256 << 20

# The decode split-KV model (decode_split_model). A CTA streams one (request, kv head, split)'s
# K/V; time is counted in positions that one CTA streams when nothing else limits it.
# Resident CTAs per SM of the tensor-core decode kernel on an H100 (228 KB shared memory, 64K
# registers, 128 threads): two 64-position K+V stages of (H + 8) 16-bit elements plus ~2.5 KB
# static and reserved, and ptxas's registers (H=128: 70.5 KB, 164 registers -> 3).
DECODE_CTAS_PER_SM = {64: 4, 80: 4, 96: 4, 128: 3, 256: 1}  # other head dims (SIMT): 4
# HBM saturates once this many CTAs per SM stream at once; below that a wave is bounded by each
# CTA's own latency, so splitting pays. 3 (every slot at H=128) is the cautious setting: if the
# sweep shows S=1 at full bandwidth with 2 CTAs per SM (batch 32), lower it.
SATURATING_CTAS_PER_SM = 3
CTA_OVERHEAD_POSITIONS = 96  # a CTA's fixed cost (find its request, load q, write out)
MERGE_OVERHEAD_POSITIONS = 128  # the merge launch that S > 1 adds

# Best split counts measured by `benchmarks/kernels/paged_attention.py --sweep-splits` for decode
# (one token per request) with head dim 128, bf16, on an H100: {(CTAs at S=1, context): S}, where
# CTAs at S=1 = requests x kv heads (x ceil(G / 16) head chunks). Outside the measured range
# the model decides. Measured 2026-11-25, H100 80GB HBM3 (benchmarks/results/*-split_sweep.json).
MEASURED_DECODE_SPLITS: dict[tuple[int, int], int] = {
    (64, 2048): 3, (64, 8192): 3, (64, 32768): 6, (128, 2048): 1, (128, 8192): 3, (128, 32768): 3,
    (256, 2048): 1, (256, 8192): 3, (256, 32768): 3, (512, 2048): 2, (512, 8192): 2, (512, 32768): 2,
    (1024, 2048): 1, (1024, 8192): 1, (1024, 32768): 1,
}
MEASURED_HEAD_DIM = 128


@functools.cache
def _num_sms() -> int:
    """Streaming multiprocessors of the default device (132 on an H100 SXM if unknown)."""
    return int(getattr(jax.devices()[0], "core_count", 0) or 132)


# With an fp8 pool (xla_kernels/paged_attention.h: kTensorCoreFp8HeadDims).
TENSOR_CORE_FP8_HEAD_DIMS = (64, 128, 256)


def has_tensor_core_kernel(dtype, head_dim: int, fp8_pool: bool = False) -> bool:
    """Whether the CUDA handler has a tensor-core kernel for this q dtype, head dim and pool."""
    dims = TENSOR_CORE_FP8_HEAD_DIMS if fp8_pool else TENSOR_CORE_HEAD_DIMS
    return jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and head_dim in dims


def split_ctas(num_tokens: int, num_reqs: int, num_heads: int, num_kv_heads: int) -> int:
    """CTAs with K/V to read at S = 1: a query tile per request (decode) or per ~16 tokens
    (prefill), per kv head and chunk of up to 16 query heads of its group."""
    tiles = max(min(num_tokens, num_reqs), num_tokens // 16, 1)
    return tiles * num_kv_heads * -(-(num_heads // num_kv_heads) // 16)


def decode_split_model(ctas: int, max_context: int, head_dim: int, num_sms: int, cap: int) -> int:
    """The fewest splits S in [1, cap] near the least modeled time of `ctas` CTAs (at S = 1).

    The kernel runs in waves of num_sms * DECODE_CTAS_PER_SM resident CTAs; a wave of n CTAs
    each reading max_context / S positions takes (max_context / S + CTA_OVERHEAD_POSITIONS) *
    max(1, n / (num_sms * SATURATING_CTAS_PER_SM)): below that the CTAs' own latency bounds the
    wave (more CTAs help), above it HBM does (more CTAs only queue). S > 1 adds the merge. So a
    small batch splits until HBM saturates, and a batch that fills a wave and a bit more splits
    so that its last wave is not nearly empty.
    """
    slots = num_sms * DECODE_CTAS_PER_SM.get(head_dim, 4)
    saturating = num_sms * SATURATING_CTAS_PER_SM
    cost = {}
    for s in range(1, max(cap, 1) + 1):
        full, last = divmod(ctas * s, slots)  # full waves, CTAs in the last one
        waves = full * max(1.0, slots / saturating) + (max(1.0, last / saturating) if last else 0.0)
        cost[s] = waves * (max_context / s + CTA_OVERHEAD_POSITIONS) + (MERGE_OVERHEAD_POSITIONS if s > 1 else 0)
    # The fewest splits within 5% of the least cost: each costs workspace, and the model is rough.
    return min(s for s, c in cost.items() if c <= 1.05 * min(cost.values()))


def _measured_splits(ctas: int, max_context: int) -> int | None:
    """The sweep's S at the nearest measured (CTAs, context) in log2, or None outside its range."""
    if not MEASURED_DECODE_SPLITS:
        return None
    keys = list(MEASURED_DECODE_SPLITS)
    lo_c, hi_c = min(k[0] for k in keys), max(k[0] for k in keys)
    lo_l, hi_l = min(k[1] for k in keys), max(k[1] for k in keys)
    if not (lo_c / 2 <= ctas <= 2 * hi_c and lo_l / 2 <= max_context <= 2 * hi_l):
        return None
    near = min(keys, key=lambda k: (abs(math.log2(k[0] / ctas)) + abs(math.log2(k[1] / max_context)), k))
    return MEASURED_DECODE_SPLITS[near]


def choose_num_splits(num_tokens: int, num_reqs: int, num_heads: int, num_kv_heads: int,
                      head_dim: int, max_context: int, num_sms: int, *, measured: bool = True) -> int:
    """Split-KV partitions for a call, from static shapes only (CUDA-graph safe).

    Calls with prefill tiles (T > R) split only a grid of fewer CTAs than SMs, aiming at two per
    SM: their CTAs are compute-heavy and every token's partials cost workspace traffic. Decode
    calls (T <= R) with head dim MEASURED_HEAD_DIM take the sweep's measured table near a
    measured shape (unless `measured` is False), the others decode_split_model. All give a split
    at least MIN_SPLIT_POSITIONS positions of a full context (the table excepted) and stay within
    MAX_SPLITS, the non-empty splits of the context and WORKSPACE_BUDGET_BYTES of partials.
    """
    ctas = split_ctas(num_tokens, num_reqs, num_heads, num_kv_heads)
    per_split = num_tokens * num_heads * (head_dim + 1) * 4
    cap = min(MAX_SPLITS, -(-max_context // SPLIT_GRANULE), WORKSPACE_BUDGET_BYTES // max(per_split, 1))
    if cap <= 1:
        return 1
    if num_tokens > num_reqs:
        if ctas >= num_sms:
            return 1
        return max(1, min(math.ceil(2 * num_sms / ctas), max_context // MIN_SPLIT_POSITIONS, cap))
    table = None
    if measured and head_dim == MEASURED_HEAD_DIM:
        table = _measured_splits(ctas, max_context)
    if table is not None:
        return max(1, min(table, cap))
    return decode_split_model(ctas, max_context, head_dim, num_sms,
                              min(cap, max_context // MIN_SPLIT_POSITIONS))


def fixed_split_bound(split_size: int, context: int, num_tokens: int, sliding_window: int | None) -> int:
    """The most splits of `split_size` positions a request can have in a call whose block table
    holds `context` positions: its splits start at the multiple of split_size at or below its
    first query token's window start (0 without a window) and end at its last token."""
    bound = -(-context // split_size)
    if sliding_window:
        bound = min(bound, -(-(sliding_window + num_tokens) // split_size) + 1)
    return max(bound, 1)


def choose_fixed_splits(num_tokens: int, num_reqs: int, num_heads: int, num_kv_heads: int, head_dim: int,
                        bound: int, num_sms: int) -> int:
    """Under a fixed split size, S for a call (static shapes only): `bound` (one CTA per split,
    merged) where the unsplit grid would leave SMs idle (few decodes, or a small step over few
    request rows), else 1 (one CTA folds every split of its rows). Either gives a token the same
    bits, so this is a question of speed only."""
    if bound <= 1 or bound > HANDLER_MAX_SPLITS:
        return 1
    if bound * num_tokens * num_heads * (head_dim + 1) * 4 > WORKSPACE_BUDGET_BYTES:
        return 1
    return bound if split_ctas(num_tokens, num_reqs, num_heads, num_kv_heads) < 2 * num_sms else 1


def workspace_elements(num_splits: int, num_tokens: int, num_heads: int, head_dim: int) -> int:
    """f32 elements of split-KV scratch: o [S, T, N, H] then lse [S, T, N] (1 when S == 1)."""
    return 1 if num_splits <= 1 else num_splits * num_tokens * num_heads * (head_dim + 1)


def paged_attention_call(
    q: jax.Array,  # [T, N, H]
    k_pages: jax.Array,  # [P, B, K, H], q's dtype or float8_e4m3fn
    v_pages: jax.Array,  # [P, B, K, H]
    block_tables: jax.Array,  # [R, M] int32
    seq_lens: jax.Array,  # [R] int32
    query_start_loc: jax.Array,  # [R+1] int32
    *,
    scale: float,
    num_splits: int | None = None,
    kernel: str = "auto",
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
    k_scale: jax.Array | None = None,  # [K] f32; fp8 pages only
    v_scale: jax.Array | None = None,  # [K] f32
    split_size: int = 0,
) -> jax.Array:
    """The custom call on local (unsharded) arrays; returns out [T, N, H] in q's dtype."""
    if kernel not in KERNELS:
        raise ValueError(f"paged_attention_ffi: unknown kernel {kernel!r} (expected one of {list(KERNELS)})")
    T, N, H = q.shape
    tensor_core = has_tensor_core_kernel(q.dtype, H, is_fp8(k_pages.dtype))
    if kernel == "tensor_core" and not tensor_core:
        # Checked here too (the handler refuses it as well), so the error comes at trace time on
        # every backend rather than from an asynchronous GPU execution.
        raise ValueError(f"paged_attention_ffi: no tensor-core kernel for {jnp.dtype(q.dtype).name} with "
                         f"head dim {H} (bf16/f16 with head dim in {TENSOR_CORE_HEAD_DIMS}); use kernel='auto'")
    if split_size:
        if kernel not in INVARIANT:
            raise ValueError(f"paged_attention_ffi: split_size is for the kernels {INVARIANT}, got {kernel!r}")
        if split_size < 0 or split_size % SPLIT_GRANULE:
            raise ValueError(f"paged_attention_ffi: split_size must be a positive multiple of {SPLIT_GRANULE}, "
                             f"got {split_size}")
        if not tensor_core:
            raise ValueError(f"paged_attention_ffi: split_size runs on the tensor-core kernels only (bf16/f16 "
                             f"with head dim in {TENSOR_CORE_HEAD_DIMS}), not {jnp.dtype(q.dtype).name} with "
                             f"head dim {H} over {jnp.dtype(k_pages.dtype).name} pages")
    elif kernel in INVARIANT:
        if num_splits not in (None, 1):
            raise ValueError(f"paged_attention_ffi: kernel {kernel!r} runs unsplit without a split_size, "
                             f"got num_splits={num_splits}")
        num_splits = 1
    backend = jax.default_backend()
    _ffi.require(TARGET, backend)
    R, M = block_tables.shape
    K = k_pages.shape[2]
    if split_size:
        bound = fixed_split_bound(split_size, M * k_pages.shape[1], T, sliding_window)
        if num_splits is None:
            num_splits = 1 if backend != "gpu" else choose_fixed_splits(T, R, N, K, H, bound, _num_sms())
        elif num_splits != 1 and not bound <= num_splits <= HANDLER_MAX_SPLITS:
            raise ValueError(f"paged_attention_ffi: split_size={split_size} needs num_splits 1 (one CTA folds a "
                             f"request's splits) or in [{bound}, {HANDLER_MAX_SPLITS}], got {num_splits}")
    if num_splits is None:
        # A split covers positions some token of its request sees: at most the window plus the
        # request's other query tokens (T - R bounds those), never more than the block table.
        context = M * k_pages.shape[1]
        if sliding_window is not None:
            context = min(context, sliding_window + max(T - R, 0))
        num_splits = 1 if backend != "gpu" else choose_num_splits(T, R, N, K, H, context, _num_sms())
    if k_scale is None:  # a pool in q's dtype: identity scales (the handler multiplies by 1.0)
        k_scale = v_scale = jnp.ones((K,), jnp.float32)
    out_type = jax.ShapeDtypeStruct((T, N, H), q.dtype)  # [T, N, H]
    ws_type = jax.ShapeDtypeStruct((workspace_elements(num_splits, T, N, H),), jnp.float32)
    out, _ = jax.ffi.ffi_call(TARGET, (out_type, ws_type))(
        q, k_pages, v_pages, block_tables, seq_lens, query_start_loc, k_scale, v_scale,
        **call_attributes(scale, num_splits, kernel, sliding_window, logit_softcap, split_size))
    return out


def call_attributes(scale: float, num_splits: int, kernel: str = "auto", sliding_window: int | None = None,
                    logit_softcap: float | None = None, split_size: int = 0) -> dict:
    """The custom call's static attributes, typed as the handlers bind them (0: no window / cap /
    fixed split size)."""
    return dict(scale=np.float32(scale), num_splits=np.int32(num_splits), split_size=np.int32(split_size),
                kernel=np.int32(KERNELS[kernel]), sliding_window=np.int32(sliding_window or 0),
                logit_softcap=np.float32(logit_softcap or 0.0))


def paged_attention_sharded(
    q: jax.Array,  # [T, N, H], N sharded over `axis`
    k_pages: jax.Array,  # [P, B, K, H], K sharded over `axis`
    v_pages: jax.Array,  # [P, B, K, H], K sharded over `axis`
    meta: AttentionMetadata,  # replicated
    *,
    scale: float,
    mesh: Mesh,
    axis: str = TP,
    num_splits: int | None = None,
    kernel: str = "auto",
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
    k_scale: jax.Array | None = None,  # [K] f32, K sharded over `axis`
    v_scale: jax.Array | None = None,  # [K] f32
    split_size: int = 0,
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
    if k_scale is None:
        k_scale = v_scale = jnp.ones((K,), jnp.float32)  # split with the pool like real scales
    k_scale, v_scale = (match_spec(s, mesh, P(axis)) for s in (k_scale, v_scale))  # [K]
    opts = dict(scale=scale, num_splits=num_splits, kernel=kernel, sliding_window=sliding_window,
                logit_softcap=logit_softcap, split_size=split_size)

    def body(q, k_pages, v_pages, block_tables, seq_lens, query_start_loc, k_scale, v_scale):
        return paged_attention_call(q, k_pages, v_pages, block_tables, seq_lens, query_start_loc,
                                    k_scale=k_scale, v_scale=v_scale, **opts)

    return jax.shard_map(
        body, mesh=mesh, in_specs=(heads, pool, pool, P(), P(), P(), P(axis), P(axis)), out_specs=heads,
        axis_names={axis}, check_vma=False,
    )(q, k_pages, v_pages, meta.block_tables, meta.seq_lens, meta.query_start_loc, k_scale, v_scale)


def paged_attention_ffi(
    q: jax.Array,  # [T, N, H]
    k_pages: jax.Array,  # [P, B, K, H]
    v_pages: jax.Array,  # [P, B, K, H]
    meta: AttentionMetadata,
    *,
    scale: float,
    mesh: Mesh | None = None,
    axis: str = TP,
    num_splits: int | None = None,
    kernel: str = "auto",
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
    k_scale: jax.Array | None = None,
    v_scale: jax.Array | None = None,
    split_size: int = 0,
) -> jax.Array:
    """Causal paged attention of the ragged batch `meta` describes; returns [T, N, H].

    Args:
      mesh / axis: when given, run under shard_map with heads split over `axis`.
      num_splits: split-KV partitions (CUDA); default chosen from static shapes.
      kernel: "auto", "simt" (CUDA cores), "tensor_core", or "invariant" / "invariant16" (what
        batch_invariant runs, unsplit unless split_size): which CUDA kernels run.
      split_size: with an invariant kernel (tensor-core only), a fixed split size: each context
        cut at multiples of this many positions whatever the batch, the splits' partials folded in
        order; num_splits 1 (one CTA folds them) or at least fixed_split_bound (one CTA per split),
        the same bits either way (default: chosen from static shapes). CUDA only; the CPU handler
        computes each token unsplit.
      sliding_window / logit_softcap: as pagedjax.attention.paged_attention (static).
      k_scale / v_scale: [K] f32 (or a scalar), the dequantization scales of fp8 pages.
    Padding tokens (index >= query_start_loc[R]) get zeros.
    """
    check_options(sliding_window, logit_softcap, "paged_attention_ffi")
    k_scale, v_scale = kv_dtype.check_scales(k_scale, v_scale, k_pages.dtype, k_pages.shape[2],
                                             "paged_attention_ffi")
    opts = dict(scale=scale, num_splits=num_splits, kernel=kernel, sliding_window=sliding_window,
                logit_softcap=logit_softcap, k_scale=k_scale, v_scale=v_scale, split_size=split_size)
    if mesh is not None:
        return paged_attention_sharded(q, k_pages, v_pages, meta, mesh=mesh, axis=axis, **opts)
    return paged_attention_call(q, k_pages, v_pages, jnp.asarray(meta.block_tables),
                                jnp.asarray(meta.seq_lens), jnp.asarray(meta.query_start_loc), **opts)


# The name pagedjax.attention.paged_attention dispatches to.
paged_attention = paged_attention_ffi
