"""Every test file under tests/ must have a Bazel target, so none is silently skipped."""

import ast
import pathlib


def _targets(build_file: pathlib.Path) -> set[str]:
    """srcs of every pagedjax_pytest(...) call in a BUILD file."""
    tree = ast.parse(build_file.read_text())
    srcs = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "pagedjax_pytest":
            for kw in node.keywords:
                if kw.arg == "srcs" and isinstance(kw.value, ast.List):
                    srcs |= {elt.value for elt in kw.value.elts}
    return srcs


def test_every_test_file_has_a_target():
    here = pathlib.Path(__file__).parent
    files = {p.name for p in here.glob("test_*.py")}
    assert "test_bazel_targets.py" in files
    missing = sorted(files - _targets(here / "BUILD.bazel"))
    assert not missing, f"test files without a Bazel target in tests/BUILD.bazel: {missing}"
