"""Host-only modules import without jax (DESIGN 3.6): the scheduler, requests, sampling params and
the block allocator run where jax is not even installed, and `import pagedjax` registers nothing.

Each check runs in a fresh interpreter whose sys.meta_path refuses jax and jaxlib.
"""

import os
import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parent.parent

REFUSE_JAX = textwrap.dedent('''
    import importlib.abc, sys

    class RefuseJax(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("jax", "jaxlib"):
                raise ImportError(f"host-only code imported {name}")
            return None

    sys.meta_path.insert(0, RefuseJax())
''')


def run_without_jax(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))  # this test's pagedjax
    return subprocess.run([sys.executable, "-c", REFUSE_JAX + textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_host_modules_import_without_jax():
    out = run_without_jax('''
        import pagedjax
        import pagedjax.config
        import pagedjax.kv_cache.block_allocator
        import pagedjax.kv_cache.manager
        import pagedjax.request
        import pagedjax.sampling_params
        import pagedjax.scheduler
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "jaxlib", "flax", "numpy"))
        assert not heavy, f"host-only modules imported {heavy}"
        print("ok")
    ''')
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_the_finder_refuses_jax():
    """The check above can fail: a module that imports jax is refused."""
    out = run_without_jax("import pagedjax.mesh")
    assert out.returncode != 0 and "host-only code imported jax" in out.stderr, out.stderr
