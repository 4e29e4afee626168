"""pagedjax: a fast, easy-to-use LLM inference and serving engine in JAX."""

from __future__ import annotations

__version__ = "0.1.0"

# Public surface, imported lazily so `import pagedjax` stays cheap.
_PUBLIC = {
    "load_params": "pagedjax.weights",
    "generate": "pagedjax.api",
    "LLM": "pagedjax.api",
    "SamplingParams": "pagedjax.sampling_params",
    "BeamSearchParams": "pagedjax.sampling_params",
    "StructuredOutputsParams": "pagedjax.structured_outputs.params",
    "RequestOutput": "pagedjax.request",
    "CompletionOutput": "pagedjax.request",
}

__all__ = sorted(_PUBLIC)

# No jax here and nothing registered: host-only modules (scheduler, requests, sampling params)
# import without jax, and the FFI handlers register at first use (pagedjax._ffi).


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pagedjax' has no attribute {name!r}")
