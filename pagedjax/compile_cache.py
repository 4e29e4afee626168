"""Compiled steps (and other traced results) kept across processes: a warm start skips tracing,
lowering and compiling.

JAX's persistent compilation cache (turned on too) skips only XLA's compile; tracing and
lowering a 32-layer step still take seconds per bucket. Here a compiled executable is stored
serialized (`jax.experimental.serialize_executable`) under a key made of everything that
decides the program: the function, its static arguments, the shapes, dtypes and shardings of
its inputs, the jax/jaxlib versions, the backend and its devices, XLA_FLAGS (and PROGRAM_ENV's
other variables), and a hash of
pagedjax's own source and compiled extension (a code change is a different program even when
every shape is the same). A load that fails for any reason recompiles and rewrites the entry.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pathlib
import pickle
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import jax

logger = logging.getLogger("pagedjax")

_FORMAT = 2  # bump when the stored payload changes
# Environment variables that change a traced program (beside its code, shapes and options)
PROGRAM_ENV = ("XLA_FLAGS", "PAGEDJAX_BATCH_INVARIANT_MATMUL", "PAGEDJAX_BATCH_INVARIANT_ATTENTION",
               "PAGEDJAX_BATCH_INVARIANT_NORM", "PAGEDJAX_BATCH_INVARIANT_SPLIT", "PAGEDJAX_FP8_WEIGHT_ONLY_ROWS")


@functools.cache
def source_fingerprint() -> str:
    """sha256 of pagedjax's Python sources and its compiled extension (what a program embeds)."""
    root = pathlib.Path(__file__).parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")) + sorted(root.glob("_kernels*")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _aval(x: Any) -> str:
    """Shape, dtype and placement (the devices, in order, and the partitioning) of an argument.
    One without a placement (a numpy array, a ShapeDtypeStruct without a sharding) runs on the
    default device, so it keys as an array there does: else a program compiled from abstract
    arguments would be compiled again for the arrays a run passes."""
    sharding = getattr(x, "sharding", None)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    spec = getattr(sharding, "spec", None)
    mesh = getattr(sharding, "mesh", None)
    devices = [d.id for d in (mesh.devices.flat if mesh is not None else getattr(sharding, "device_set", ()))]
    return f"{tuple(x.shape)}:{x.dtype}:{spec}:{dict(mesh.shape) if mesh is not None else ''}:{devices}"


class ExecutableCache:
    """Compiled executables by key, in memory and (when `directory` is set) on disk."""

    def __init__(self, directory: str | os.PathLike | None):
        self.directory = pathlib.Path(directory) / "executables" if directory else None
        self._memory: dict[str, Any] = {}
        self.hits = self.misses = self.disk_hits = 0
        self.seconds = 0.0  # spent getting executables (compiling or loading), summed over threads
        self._lock = threading.Lock()  # the counters: precompile gets several programs at once

    def get(self, name: str, jitted: Callable, args: tuple, *, static_args: tuple = (),
            static_kwargs: dict[str, Any] | None = None, compiler_options: dict[str, Any] | None = None,
            copy: int = 0) -> Any:
        """The compiled `jitted(*static_args, *args, **static_kwargs)`, to be called as
        `compiled(*args)`: from memory, from disk, or compiled (and stored). `compiler_options`:
        XLA options of this compile only (e.g. {"xla_gpu_autotune_level": 0}). `copy` > 0: a
        separately loaded instance of the same program (one per copy number), compiled once."""
        static_kwargs = static_kwargs or {}
        key = self.key(name, args, (static_args, sorted(static_kwargs.items()), sorted((compiler_options or {}).items())))
        memory_key = f"{key}#{copy}" if copy else key
        compiled = self._memory.get(memory_key)
        if compiled is not None:
            self._count("hits")
            return compiled
        if copy:  # another loaded instance of the same program: its own runtime state (its CUDA graph)
            original = self.get(name, jitted, args, static_args=static_args, static_kwargs=static_kwargs,
                                compiler_options=compiler_options)
            t0 = time.perf_counter()
            twin = self._memory[memory_key] = self._load(name, key) or self._reload(original)
            self._count("seconds", time.perf_counter() - t0)
            return twin
        t0 = time.perf_counter()
        compiled = self._load(name, key)
        if compiled is None:
            self._count("misses")
            compiled = jitted.lower(*static_args, *args, **static_kwargs).compile(compiler_options)
            self._store(name, key, compiled)
        else:
            self._count("disk_hits")
        self._count("seconds", time.perf_counter() - t0)
        self._memory[key] = compiled
        return compiled

    def _count(self, name: str, amount: float = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + amount)

    def key(self, name: str, args: tuple, static: Any) -> str:
        """The entry's name for program `name` of `args` (their shapes, dtypes and placement) and
        `static` (its repr): with the versions, the devices, PROGRAM_ENV and pagedjax's source."""
        import jaxlib

        leaves, treedef = jax.tree.flatten(args)
        device = jax.devices()[0]
        parts = [str(_FORMAT), name, jax.__version__, jaxlib.__version__, device.platform,
                 getattr(device, "device_kind", ""), str(jax.device_count()), device.client.platform_version,
                 *(os.environ.get(v, "") for v in PROGRAM_ENV), source_fingerprint(), str(treedef),
                 ";".join(_aval(x) for x in leaves), repr(static)]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]

    def _path(self, name: str, key: str) -> pathlib.Path:
        return self.directory / f"{name}-{key}.bin"

    def _load(self, name: str, key: str) -> Any:
        if self.directory is None:
            return None
        path = self._path(name, key)
        if not path.exists():
            return None
        from jax.experimental.serialize_executable import deserialize_and_load

        from pagedjax import _ffi

        _ffi.register()  # a stored program may call our custom calls: their handlers must be known first
        try:
            payload, in_tree, out_tree, device_ids = pickle.loads(path.read_bytes())
            by_id = {d.id: d for d in jax.devices()}
            # The devices it was compiled for, in their order (else it would run on all of them).
            devices = [by_id[i] for i in device_ids]
            return deserialize_and_load(payload, in_tree, out_tree, execution_devices=devices)
        except Exception as e:  # a stale or broken entry: compile again
            logger.warning("compiled-step cache entry %s unusable (%s): recompiling", path.name, e)
            return None

    @staticmethod
    def _reload(compiled: Any) -> Any:
        """A second loaded instance of a freshly compiled executable (serialized and loaded again)."""
        from jax.experimental.serialize_executable import deserialize_and_load, serialize

        devices = list(compiled.runtime_executable().local_devices())
        return deserialize_and_load(*serialize(compiled), execution_devices=devices)

    def _store(self, name: str, key: str, compiled: Any) -> None:
        if self.directory is None:
            return
        from jax.experimental.serialize_executable import serialize

        try:
            device_ids = [d.id for d in compiled.runtime_executable().local_devices()]
            blob = pickle.dumps((*serialize(compiled), device_ids))
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{name}-")
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, self._path(name, key))  # atomic: a reader sees all of it or nothing
        except Exception as e:  # a read-only or full disk costs the next start a compile, nothing else
            logger.warning("could not store compiled step %s: %s", name, e)


def compile_cache_dir() -> str | None:
    """Where compiled steps persist across processes (PAGEDJAX_COMPILE_CACHE; empty = off)."""
    d = os.environ.get("PAGEDJAX_COMPILE_CACHE")
    if d is None:
        d = os.path.join(os.path.expanduser("~"), ".cache", "pagedjax", "jax-compile")
    return d or None


def traced(name: str, key: str, compute: Callable[[], Any]) -> Any:
    """compute()'s result, pickled under the compile cache (`traced/`), so that a later process
    skips the tracing it took. `key` must name everything the result depends on besides
    pagedjax's code and the jax version, which the file's name covers; an unreadable entry is
    computed again and rewritten."""
    d = compile_cache_dir()
    if not d:
        return compute()
    import jaxlib

    digest = hashlib.sha256("\n".join([str(_FORMAT), name, key, jax.__version__, jaxlib.__version__,
                                       source_fingerprint()]).encode()).hexdigest()[:32]
    path = pathlib.Path(d) / "traced" / f"{name}-{digest}.pkl"
    if path.exists():
        try:
            return pickle.loads(path.read_bytes())
        except Exception as e:  # a stale or broken entry: compute it again
            logger.warning("cache entry %s unusable (%s): recomputing", path.name, e)
    value = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{name}-")
        with os.fdopen(fd, "wb") as f:
            f.write(pickle.dumps(value))
        os.replace(tmp, path)  # atomic: a reader sees all of it or nothing
    except Exception as e:  # a read-only or full disk costs the next start the tracing, nothing else
        logger.warning("could not store %s: %s", path.name, e)
    return value


_CACHES: dict[str | None, ExecutableCache] = {}


def executable_cache(directory: str | None) -> ExecutableCache:
    """The process's cache for `directory` (runners of the same model share compiled steps)."""
    if directory not in _CACHES:
        _CACHES[directory] = ExecutableCache(directory)
    return _CACHES[directory]
