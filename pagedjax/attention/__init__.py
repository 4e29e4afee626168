"""The one attention entry point: paged attention over a ragged flat batch.

Dims: T tokens in the flat batch, N query heads, K kv heads, H head dim, P pages, B page size.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from pagedjax import _ffi
from pagedjax.attention.metadata import AttentionMetadata, build_metadata
from pagedjax.attention.options import check_options
from pagedjax.kv_cache import kv_dtype as _kv_dtype
from pagedjax.mesh import tp_mesh

__all__ = ["AttentionMetadata", "FFI_HEAD_DIMS", "build_metadata", "paged_attention", "resolve_impl", "tp_mesh"]

IMPLS = ("auto", "reference", "ffi")

# Head dims the custom call's handlers are compiled for: the extension's table
# (xla_kernels/paged_attention.h); empty when the extension is not built.
FFI_HEAD_DIMS = _ffi.head_dims()

# The custom call's kernel under batch_invariant, by PAGEDJAX_BATCH_INVARIANT_ATTENTION (DEFAULT_INVARIANT_ATTENTION
# unset): "tensor_core16" (the "invariant16" kernel: the decode kernel's 16-row tiles for every request, its
# four warps each taking fixed 16-position steps of every K/V tile; on an H100 W1 cost 9% under the mode
# where "tensor_core" cost 20%), "tensor_core" (the "invariant" kernel: the tensor-core kernel's 64-row
# tiles for every request, K/V steps at fixed positions) or "simt" (one CTA per token and kv head; about
# twice the W1 cost); SIMT wherever no tensor-core kernel applies. All three verified invariant in the
# engine on a GPU (`bash tools/gpu_stage.sh bi-tests`, `bi-tc`, `bi-tc16`). The CPU handler computes each
# token by itself either way.
INVARIANT_ATTENTION_ENV = "PAGEDJAX_BATCH_INVARIANT_ATTENTION"
INVARIANT_KERNELS = {"simt": "simt", "tensor_core": "invariant", "tensor_core16": "invariant16"}
DEFAULT_INVARIANT_ATTENTION = "tensor_core16"
# Its fixed split size along the KV length, by PAGEDJAX_BATCH_INVARIANT_SPLIT (positions, a multiple
# of 64; 0: unsplit): every context cut at multiples of it whatever the batch, the splits folded in
# order, so a long context at a small batch spreads over the GPU (the tensor-core kernels; SIMT runs
# unsplit). Its GPU tests pass on an H100 (`bash tools/gpu_stage.sh bi-split`). 512 by default: on an
# H100 (benchmarks/RESULTS.md, twenty-eighth session) a batch-1 decode at 8000 positions took 7.7 ms
# a step at 512 against 14.0 unsplit (6.9 without the mode), and W1 ran at bf16's rate (1.01x; 0.98x
# unsplit, 1.00x at 1024).
INVARIANT_SPLIT_ENV = "PAGEDJAX_BATCH_INVARIANT_SPLIT"
DEFAULT_INVARIANT_SPLIT = 512


def invariant_attention_method() -> str:
    """The batch-invariant attention PAGEDJAX_BATCH_INVARIANT_ATTENTION names (DEFAULT_INVARIANT_ATTENTION
    unset); the engine reads it once, into ModelConfig.invariant_attention."""
    name = os.environ.get(INVARIANT_ATTENTION_ENV, DEFAULT_INVARIANT_ATTENTION)
    if name not in INVARIANT_KERNELS:
        raise ValueError(f"{INVARIANT_ATTENTION_ENV}={name!r}: expected one of {', '.join(INVARIANT_KERNELS)}")
    return name


def invariant_split_size() -> int:
    """The batch-invariant attention's fixed split size PAGEDJAX_BATCH_INVARIANT_SPLIT names
    (DEFAULT_INVARIANT_SPLIT unset; 0: unsplit); the engine reads it once, into
    ModelConfig.invariant_split."""
    raw = os.environ.get(INVARIANT_SPLIT_ENV, str(DEFAULT_INVARIANT_SPLIT))
    try:
        size = int(raw)
    except ValueError:
        size = -1
    if size < 0 or size % 64:
        raise ValueError(f"{INVARIANT_SPLIT_ENV}={raw!r}: expected 0 (unsplit) or a positive multiple of 64 "
                         f"(positions per split)")
    return size


def invariant_kernel(method: str | None = None) -> str:
    """The custom call's `kernel` under batch_invariant for `method` (a key of INVARIANT_KERNELS;
    None: as PAGEDJAX_BATCH_INVARIANT_ATTENTION says)."""
    if method is None:
        method = invariant_attention_method()
    if method not in INVARIANT_KERNELS:
        raise ValueError(f"batch-invariant attention {method!r}: expected one of {', '.join(INVARIANT_KERNELS)}")
    return INVARIANT_KERNELS[method]


# Pool dtypes the handlers read: q's dtype (one of these) or the FP8 KV cache.
FFI_KV_DTYPES = tuple(jnp.dtype(d) for d in (jnp.float32, jnp.float16, jnp.bfloat16, jnp.float8_e4m3fn))


def resolve_impl(impl: str, head_dim: int | None = None, kv_dtype=None) -> str:
    """Maps "auto" to the custom call where its handler is built (GPU, and CPU with the
    extension) and supports `head_dim` and the pool's `kv_dtype`, else to the reference;
    "ffi" named where the custom call cannot run is a ValueError saying why. Checks the name.
    Registers the handlers (first use)."""
    if impl not in IMPLS:
        raise ValueError(f"paged_attention: unknown impl {impl!r} (expected one of {IMPLS})")
    if impl == "reference":
        return impl
    registered = _ffi.register()
    platform = "cuda" if jax.default_backend() == "gpu" else jax.default_backend()
    built = ("pagedjax_paged_attention", platform) in registered
    fits = head_dim is None or head_dim in FFI_HEAD_DIMS
    reads = kv_dtype is None or jnp.dtype(kv_dtype) in FFI_KV_DTYPES
    if impl == "auto":
        return "ffi" if built and fits and reads else "reference"
    # impl == "ffi", asked for by name: what it cannot run is said here, not by the custom call mid-step
    why = (f"its {platform} handler is not built here" if not built
           else f"head dim {head_dim} is not one of its head dims {tuple(FFI_HEAD_DIMS)}" if not fits
           else f"it does not read {jnp.dtype(kv_dtype).name} pages (it reads "
                f"{', '.join(d.name for d in FFI_KV_DTYPES)})" if not reads else None)
    if why:
        raise ValueError(f"attn_impl='ffi': the paged-attention custom call cannot run this model: {why}; "
                         "attn_impl='auto' uses the reference attention where the custom call cannot")
    return impl


def paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    meta: AttentionMetadata,
    *,
    scale: float,
    impl: str = "auto",
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
    k_scale: jax.Array | None = None,
    v_scale: jax.Array | None = None,
    batch_invariant: bool = False,
    invariant_attention: str | None = None,
    invariant_split: int | None = None,
) -> jax.Array:
    """Attention of q [T, N, H] over pools [P, B, K, H] as `meta` says; returns [T, N, H].

    GQA by N // K query heads per kv head; padding tokens' outputs are zeros.
    impl: "reference" (pure jnp, the oracle), "ffi" (the XLA custom call), "auto".
    sliding_window (static): a query at position p sees keys p - W < k <= p; None: all.
    logit_softcap (static): scores s = scale * q.k become c * tanh(s / c); None: no cap.
    k_scale / v_scale: [K] f32 (or a scalar), the dequantization scales of fp8 pages.
    batch_invariant (static): each token's output computed the same way whatever the batch, its
    chunk or its neighbours. The custom call runs unsplit (or at a fixed split size,
    invariant_split), as invariant_kernel() says, on its
    "invariant" kernel (the default: the tensor-core kernel's 64-row query tiles for every request,
    decodes included, K/V steps at multiples of 64 from 0 or below the window's start) or its SIMT
    kernel (one CTA per token and kv head walking the token's context in tiles at fixed positions
    from 0). Either way a token's sums run in the same order in a prefill chunk and as a decode,
    beside any batch (by default decodes get other tiles and the split-KV count follows the batch).
    The CPU call is per token already; the reference attends in blocks of a fixed number of tokens.
    invariant_attention (static): which of those kernels ("tensor_core", "tensor_core16", "simt");
    None: as PAGEDJAX_BATCH_INVARIANT_ATTENTION says.
    invariant_split (static): the tensor-core kernels' fixed split size under batch_invariant
    (positions; 0: unsplit; None: as PAGEDJAX_BATCH_INVARIANT_SPLIT says). Where SIMT runs (f32,
    head dims without a tensor-core kernel) the call stays unsplit.
    """
    check_options(sliding_window, logit_softcap, "paged_attention")
    k_scale, v_scale = _kv_dtype.check_scales(k_scale, v_scale, k_pages.dtype, k_pages.shape[2], "paged_attention")
    opts = dict(scale=scale, sliding_window=sliding_window, logit_softcap=logit_softcap, k_scale=k_scale,
                v_scale=v_scale)
    impl = resolve_impl(impl, head_dim=q.shape[-1], kv_dtype=k_pages.dtype)
    if impl == "ffi":
        from pagedjax.attention import ffi  # the custom call; imported only when asked for

        # Under tensor parallelism the call runs per device in shard_map (heads split): a custom
        # call on sharded operands outside it would be all-gathered.
        fixed = {}
        if batch_invariant:
            kernel = invariant_kernel(invariant_attention)
            split = invariant_split_size() if invariant_split is None else invariant_split
            if kernel == "simt" or not ffi.has_tensor_core_kernel(q.dtype, q.shape[-1], _kv_dtype.is_fp8(k_pages.dtype)):
                split = 0
            fixed = dict(kernel=kernel, num_splits=None if split else 1, split_size=split)
        return ffi.paged_attention_ffi(q, k_pages, v_pages, meta, mesh=tp_mesh(), **opts, **fixed)
    from pagedjax.attention import reference

    return reference.paged_attention(q, k_pages, v_pages, meta, **opts, batch_invariant=batch_invariant)
