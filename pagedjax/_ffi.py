"""Registers the XLA FFI handlers of the pagedjax._kernels extension with JAX.

Importing pagedjax does this once: the CPU handlers always, the CUDA handlers
when the extension was built with a CUDA toolkit.
"""

from __future__ import annotations

import functools

import jax


class KernelsUnavailableError(RuntimeError):
    """The compiled extension is missing (pagedjax was not built or installed)."""


@functools.cache
def _load():
    try:
        from pagedjax import _kernels  # the compiled extension module
    except ImportError as e:
        return None, e
    return _kernels, None


@functools.cache
def register() -> frozenset[tuple[str, str]]:
    """Registers every handler the extension has; returns {(target, platform)}."""
    kernels, _ = _load()
    if kernels is None:
        return frozenset()
    done = set()
    # Registering touches no backend (so jax.distributed.initialize may still come after
    # `import pagedjax`); a platform JAX does not run on is simply never used.
    for platform, targets in kernels.registrations().items():
        for name, capsule in targets.items():
            jax.ffi.register_ffi_target(name, capsule, platform=platform)
            done.add((name, platform.lower()))
    return frozenset(done)


def require(target: str, platform: str) -> None:
    """Raises a clear error unless `target` is registered for `platform`."""
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
