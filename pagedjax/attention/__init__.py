"""The one attention entry point: paged attention over a ragged flat batch.

Dims: T tokens in the flat batch, N query heads, K kv heads, H head dim, P pages, B page size.
"""

from __future__ import annotations

import jax

from pagedjax.attention.metadata import AttentionMetadata, build_metadata

__all__ = ["AttentionMetadata", "build_metadata", "paged_attention", "resolve_impl"]

IMPLS = ("auto", "reference", "ffi")


def resolve_impl(impl: str) -> str:
    """Maps "auto" to the custom call where its handler is built (GPU, and CPU with the
    extension), else to the reference; checks the name."""
    if impl not in IMPLS:
        raise ValueError(f"paged_attention: unknown impl {impl!r} (expected one of {IMPLS})")
    if impl == "auto":
        from pagedjax import _ffi

        platform = "cuda" if jax.default_backend() == "gpu" else jax.default_backend()
        return "ffi" if ("pagedjax_paged_attention", platform) in _ffi.register() else "reference"
    return impl


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

        return ffi.paged_attention(q, k_pages, v_pages, meta, scale=scale)
    from pagedjax.attention import reference

    return reference.paged_attention(q, k_pages, v_pages, meta, scale=scale)
