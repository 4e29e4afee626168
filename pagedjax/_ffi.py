"""Registers the XLA FFI handlers of the pagedjax._kernels extension with JAX, at first use.

Nothing happens at `import pagedjax`: the custom-call wrappers (attention.resolve_impl, the
attention and KV-write call sites) call `register()` before they trace a call, so host-only
code never imports jax, and registration (which touches no backend) can follow
`jax.distributed.initialize`. The CPU handlers are always there, the CUDA handlers when the
extension was built with a CUDA toolkit. The extension also owns the head-dim tables.
"""

from __future__ import annotations

import functools


class KernelsUnavailableError(RuntimeError):
    """The compiled extension is missing (pagedjax was not built or installed)."""


@functools.cache
def _load():
    try:
        from pagedjax import _kernels  # the compiled extension module (no jax inside)
    except ImportError as e:
        return None, e
    return _kernels, None


@functools.cache
def register() -> frozenset[tuple[str, str]]:
    """Registers every handler the extension has, once; returns {(target, platform)}."""
    kernels, _ = _load()
    if kernels is None:
        return frozenset()
    import jax

    done = set()
    # Registering touches no backend; a platform JAX does not run on is simply never used.
    for platform, targets in kernels.registrations().items():
        for name, capsule in targets.items():
            jax.ffi.register_ffi_target(name, capsule, platform=platform)
            done.add((name, platform.lower()))
    return frozenset(done)


def require(target: str, platform: str) -> None:
    """Registers the handlers; raises a clear error unless `target` has one for `platform`."""
    kernels, err = _load()
    if kernels is None:
        raise KernelsUnavailableError(
            "the pagedjax._kernels extension is not built; install pagedjax with "
            f"`pip install -e .` (or build it with Bazel): {err}"
        )
    platform = {"gpu": "cuda"}.get(platform, platform)
    if (target, platform) not in register():
        built = "with" if kernels.with_cuda else "without"
        raise KernelsUnavailableError(
            f"no {platform} handler for {target!r}: the extension was built {built} CUDA"
        )


def with_cuda() -> bool:
    """True when the extension carries CUDA handlers."""
    kernels, _ = _load()
    return bool(kernels is not None and kernels.with_cuda)


def head_dims() -> tuple[int, ...]:
    """Head dims every handler is compiled for (paged_attention.h); () without the extension."""
    kernels, _ = _load()
    return tuple(kernels.head_dims()) if kernels is not None else ()


def tensor_core_head_dims() -> tuple[int, ...]:
    """Head dims of the CUDA tensor-core kernels (bf16/f16 queries); the header's table, so a
    CPU-only build answers too. () without the extension."""
    kernels, _ = _load()
    return tuple(kernels.tensor_core_head_dims()) if kernels is not None else ()
