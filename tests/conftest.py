"""Test set-up: hermetic caches, CPU by default, several fake devices for sharding tests, the `gpu` marker.

Set PAGEDJAX_TEST_GPU=1 to run on the GPU (tools/gpu_check.sh does); otherwise
JAX runs on the CPU with 8 fake devices and tests marked `gpu` are skipped.

Hermetic: nothing a test does writes outside its own temporary folder ($TEST_TMPDIR under
Bazel, a fresh one otherwise), and nothing it reads depends on what the main job or an earlier
run left under HOME: HOME, TMPDIR, the XDG/HF caches and pagedjax's persistent compile cache all point
inside that folder, for this process and the subprocesses it starts.
"""

import atexit
import gc
import os
import shutil
import tempfile

_TMP = os.environ.get("TEST_TMPDIR")
if not _TMP:  # outside Bazel: a folder of our own, removed at exit
    _TMP = tempfile.mkdtemp(prefix="pagedjax-test-")
    atexit.register(shutil.rmtree, _TMP, ignore_errors=True)
for _var, _sub in (("HOME", "home"), ("XDG_CACHE_HOME", "cache"), ("HF_HOME", "hf"),
                   ("PAGEDJAX_COMPILE_CACHE", "jax-compile"), ("TMPDIR", "tmp")):
    os.environ[_var] = os.path.join(_TMP, _sub)
    os.makedirs(os.environ[_var], exist_ok=True)
tempfile.tempdir = None  # tmp_path and tempfile's folders: under TMPDIR, read again from here on
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PAGEDJAX_TEST_GPU") != "1":
    os.environ["JAX_PLATFORMS"] = "cpu"

import chex  # noqa: E402
import jax  # noqa: E402
import pytest  # noqa: E402

if os.environ.get("PAGEDJAX_TEST_GPU") != "1" and "xla_force_host_platform_device_count" not in os.environ.get(
        "XLA_FLAGS", ""):
    chex.set_n_cpu_devices(8)  # before any backend starts

jax.config.update("jax_default_matmul_precision", "highest")


def _has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped with a reason elsewhere)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on the CPU machines")


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run tools/gpu_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _unfreeze_gc_heap():
    """Engines freeze the GC heap after start-up (EngineConfig.freeze_gc_heap); a test process
    builds many, so after each test the heap is thawed and dropped engines can be collected."""
    yield
    gc.unfreeze()
