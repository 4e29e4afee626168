"""pytest targets for this repo.

Each test file under tests/ is one target (tests/BUILD.bazel); the targets run
under @local_python's interpreter (the venv, through the registered toolchain)
and depend on @local_python//:venv_fingerprint so that a cached result is not
reused after the venv's packages changed.
"""

def pagedjax_pytest(name, srcs, deps = [], data = [], args = [], **kwargs):
    """Runs pytest (installed in the venv) on srcs."""
    main = "//tools/bazel:pytest_main.py"
    kwargs.setdefault("python_version", "PY3")
    kwargs.setdefault("size", "medium")
    native.py_test(
        name = name,
        srcs = srcs + [main],
        main = main,
        args = args + ["$(location %s)" % s for s in srcs],
        deps = deps + ["//:pagedjax"],
        data = data + [
            "@local_python//:venv_fingerprint",
            "//:pyproject.toml",
            "//tests:conftest",
        ],
        **kwargs
    )
