"""The one attention entry point: paged attention over a ragged flat batch.

Dims: T tokens in the flat batch, N query heads, K kv heads, H head dim, P pages, B page size.
"""

from __future__ import annotations

import jax

from pagedjax.attention.metadata import AttentionMetadata, build_metadata

__all__ = ["AttentionMetadata", "FFI_HEAD_DIMS", "build_metadata", "paged_attention", "resolve_impl", "tp_mesh"]

IMPLS = ("auto", "reference", "ffi")


# Head dims the custom call's handlers are compiled for (xla_kernels/paged_attention.h).
FFI_HEAD_DIMS = (16, 32, 64, 80, 96, 128, 256)


def resolve_impl(impl: str, head_dim: int | None = None) -> str:
    """Maps "auto" to the custom call where its handler is built (GPU, and CPU with the
    extension) and compiled for `head_dim`, else to the reference; checks the name."""
    if impl not in IMPLS:
        raise ValueError(f"paged_attention: unknown impl {impl!r} (expected one of {IMPLS})")
    if impl == "auto":
        from pagedjax import _ffi

        platform = "cuda" if jax.default_backend() == "gpu" else jax.default_backend()
        built = ("pagedjax_paged_attention", platform) in _ffi.register()
        fits = head_dim is None or head_dim in FFI_HEAD_DIMS
        return "ffi" if built and fits else "reference"
    return impl


def tp_mesh(axis: str = "tp"):
    """The mesh the step is being traced under, when it splits `axis` over several devices."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.shape.get(axis, 1) <= 1:
        return None
    return mesh


def paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    meta: AttentionMetadata,
    *,
    scale: float,
    impl: str = "auto",
) -> jax.Array:
    """Attention of q [T, N, H] over pools [P, B, K, H] as `meta` says; returns [T, N, H].

    GQA by N // K query heads per kv head; padding tokens' outputs are zeros.
    impl: "reference" (pure jnp, the oracle), "ffi" (the XLA custom call), "auto".
    """
    impl = resolve_impl(impl)
    if impl == "ffi":
        from pagedjax.attention import ffi  # the custom call; imported only when asked for

        # Under tensor parallelism the call runs per device in shard_map (heads split): a custom
        # call on sharded operands outside it would be all-gathered.
        return ffi.paged_attention_ffi(q, k_pages, v_pages, meta, scale=scale, mesh=tp_mesh())
    from pagedjax.attention import reference

    return reference.paged_attention(q, k_pages, v_pages, meta, scale=scale)
