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

def _xla_defaults() -> None:
    """XLA options the engine wants, added to XLA_FLAGS before JAX starts its GPU client (a client
    already started keeps its own). `--xla_gpu_command_buffer_update_mode=SKIP_TEMP`: the decode
    step is one CUDA graph, which XLA re-records before each launch when any buffer it uses moved;
    in this mode (XLA's VMM allocator keeps the temp buffer's address) it skips that when only the
    step's temporaries moved. On an H200, Llama-3-8B: W3 671 -> 601 ms, W1 32.8 -> 33.9 req/s, the
    engine's gpu tests unchanged (benchmarks/RESULTS.md). Left alone where XLA_FLAGS already sets
    the mode; PAGEDJAX_XLA_DEFAULTS=0 turns this off."""
    import os

    if os.environ.get("PAGEDJAX_XLA_DEFAULTS", "1") == "0":
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_gpu_command_buffer_update_mode" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_gpu_command_buffer_update_mode=SKIP_TEMP".strip()
    # JAX's client takes 75% of a GPU unless told otherwise, and the KV pool is sized within it
    # (gpu_memory_utilization of that share): 0.92, as every benchmark in benchmarks/RESULTS.md
    # ran, unless the variable is set or a client already started with JAX's default.
    if "XLA_PYTHON_CLIENT_MEM_FRACTION" not in os.environ and not _jax_backends_started():
        os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = DEFAULT_CLIENT_MEM_FRACTION


DEFAULT_CLIENT_MEM_FRACTION = "0.92"


def _jax_backends_started() -> bool:
    """Whether JAX has started its clients in this process (then their memory share is fixed)."""
    import sys

    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except Exception:  # no way to tell: leave JAX's own default alone
        return True


_xla_defaults()

# No jax here and nothing registered: host-only modules (scheduler, requests, sampling params)
# import without jax, and the FFI handlers register at first use (pagedjax._ffi).


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pagedjax' has no attribute {name!r}")
