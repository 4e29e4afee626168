"""Offline Bazel 4 setup: nothing here downloads anything.

offline_repositories() declares
  @rules_cc, @rules_java  tiny generated stand-ins whose defs.bzl forwards to the
                          native rules. Bazel 4's @bazel_tools BUILD files load
                          them, and its default WORKSPACE suffix would otherwise
                          download them from GitHub.
  @remote_coverage_tools stub: every Bazel 4 test depends on it implicitly.
  @local_python           (below): like pybind11_bazel's python_configure, tiny.

@local_python has:
  :python_headers   cc_library with the interpreter's Python.h
  :pybind11         cc_library with pip-installed pybind11 headers
  :xla_ffi_headers  cc_library with jaxlib's bundled XLA FFI headers
  :py_toolchain     Python toolchain whose interpreter is that same python
  :cuda_headers / :cudart  cc_library for the local CUDA toolkit (if found)
  defs.bzl          PYTHON_BIN, NVCC, CUDA_HOME, HAS_CUDA constants

Interpreter, first match wins:
  1. $PYTHON_BIN_PATH (tools/test.sh passes --repo_env=PYTHON_BIN_PATH=<venv>/bin/python)
  2. <workspace root>/.venv/bin/python
  3. python3 on PATH
"""

_QUERY = """
import importlib.metadata, sys, sysconfig
import pybind11
import jax, jax.ffi
dists = sorted(set("%s==%s" % (d.metadata["Name"], d.version)
                   for d in importlib.metadata.distributions()))
for k, v in [
    ("python", sys.executable),
    ("version", "%d.%d" % sys.version_info[:2]),
    ("python_include", sysconfig.get_paths()["include"]),
    ("ext_suffix", sysconfig.get_config_var("EXT_SUFFIX")),
    ("pybind11_include", pybind11.get_include()),
    ("xla_ffi_include", jax.ffi.include_dir()),
    ("jax_version", jax.__version__),
    ("venv_fingerprint", " ".join(dists)),
]:
    print("%s=%s" % (k, v))
"""

_BUILD = """
load("@bazel_tools//tools/python:toolchain.bzl", "py_runtime_pair")

package(default_visibility = ["//visibility:public"])

cc_library(
    name = "python_headers",
    hdrs = glob(["python_include/**/*.h"]),
    includes = ["python_include"],
)

cc_library(
    name = "pybind11",
    hdrs = glob(["pybind11_include/**/*.h"]),
    includes = ["pybind11_include"],
    deps = [":python_headers"],
)

cc_library(
    name = "xla_ffi_headers",
    hdrs = glob(["xla_ffi_include/xla/ffi/api/*.h"]),
    includes = ["xla_ffi_include"],
)

# Plain files, for genrules (nvcc) that need the headers as inputs.
filegroup(
    name = "xla_ffi_header_files",
    srcs = glob(["xla_ffi_include/xla/ffi/api/*.h"]),
)

cc_library(
    name = "cuda_headers",
    hdrs = glob(["cuda_include/**/*.h", "cuda_include/**/*.hpp"]),
    includes = ["cuda_include"],
)

cc_library(
    name = "cudart",
    linkopts = %{CUDART_LINKOPTS},
    deps = [":cuda_headers"],
)

# What is installed in the venv (name==version lines). Tests depend on it, so a
# cached test result is not reused after `pip install` changed the venv
# (once this repository is re-run: server restart or `bazel sync --configure`).
filegroup(
    name = "venv_fingerprint",
    srcs = ["venv_fingerprint.txt"],
)

py_runtime(
    name = "py3_runtime",
    interpreter_path = "%{PYTHON}",
    python_version = "PY3",
    # Bazel 4 stubs default to an "env python" shebang, which fails
    # where PATH has no `python` (e.g. --incompatible_strict_action_env).
    stub_shebang = "#!%{PYTHON}",
)

py_runtime_pair(
    name = "py_runtime_pair",
    py3_runtime = ":py3_runtime",
)

toolchain(
    name = "py_toolchain",
    toolchain = ":py_runtime_pair",
    toolchain_type = "@bazel_tools//tools/python:toolchain_type",
)
"""

def _fail(msg):
    fail("local_python_configure: " + msg)

def _find_python(rctx):
    env_python = rctx.os.environ.get("PYTHON_BIN_PATH", "")
    if env_python:
        return env_python
    ws_root = rctx.path(Label("//:WORKSPACE")).dirname
    venv_python = ws_root.get_child(".venv").get_child("bin").get_child("python")
    if venv_python.exists:
        # Do NOT realpath it: the venv's bin/python symlink is what makes
        # site-packages (jax, pybind11) visible.
        return str(venv_python)
    which = rctx.which("python3")
    if which == None:
        _fail("no python found; set --repo_env=PYTHON_BIN_PATH=/path/to/python")
    return str(which)

def _local_python_configure_impl(rctx):
    python = _find_python(rctx)
    res = rctx.execute([python, "-c", _QUERY])
    if res.return_code != 0:
        _fail("%s could not import pybind11 / jax:\n%s%s" % (python, res.stdout, res.stderr))
    info = {}
    for line in res.stdout.splitlines():
        k, sep, v = line.partition("=")
        if sep:
            info[k.strip()] = v.strip()

    rctx.file("venv_fingerprint.txt", "\n".join(info["venv_fingerprint"].split(" ")) + "\n")
    rctx.symlink(info["python_include"], "python_include")
    rctx.symlink(info["pybind11_include"], "pybind11_include")
    rctx.symlink(info["xla_ffi_include"], "xla_ffi_include")

    # Optional CUDA toolkit (compile-only is fine: no GPU needed).
    nvcc = rctx.os.environ.get("NVCC", "") or rctx.which("nvcc")
    cuda_home = rctx.os.environ.get("CUDA_HOME", "")
    if nvcc and not cuda_home:
        # nvcc may be a wrapper script; ask it where its toolkit is (_HERE_=<home>/bin).
        dry = rctx.execute([nvcc, "--dryrun", "-c", "-x", "cu", "/dev/null", "-o", "/dev/null"])
        for line in (dry.stdout + dry.stderr).splitlines():
            if line.startswith("#$ _HERE_="):
                cuda_home = line[len("#$ _HERE_="):].strip().rsplit("/bin", 1)[0]
    has_cuda = bool(nvcc) and bool(cuda_home) and rctx.path(cuda_home + "/include/cuda_runtime.h").exists
    if has_cuda:
        rctx.symlink(cuda_home + "/include", "cuda_include")
        # Static cudart: the .so then needs no libcudart.so at run time.
        cudart_linkopts = repr(["-L%s/lib64" % cuda_home, "-lcudart_static", "-ldl", "-lpthread", "-lrt"])
    else:
        rctx.file("cuda_include/.empty", "")
        cudart_linkopts = "[]"

    rctx.file("BUILD.bazel", _BUILD.replace("%{PYTHON}", python).replace(
        "%{CUDART_LINKOPTS}",
        cudart_linkopts,
    ))
    rctx.file("defs.bzl", "\n".join([
        "PYTHON_BIN = %r" % python,
        "PYTHON_VERSION = %r" % info["version"],
        "PY_EXT_SUFFIX = %r" % info["ext_suffix"],
        "JAX_VERSION = %r" % info["jax_version"],
        "HAS_CUDA = %r" % has_cuda,
        "NVCC = %r" % (str(nvcc) if has_cuda else ""),
        "CUDA_HOME = %r" % (cuda_home if has_cuda else ""),
        "",
    ]))

local_python_configure = repository_rule(
    implementation = _local_python_configure_impl,
    environ = ["PYTHON_BIN_PATH", "NVCC", "CUDA_HOME", "PATH"],
    local = True,  # re-run on every Bazel server start
    configure = True,  # and on `bazel sync --configure`
)

def _native_rules_stub_impl(rctx):
    rctx.file("WORKSPACE", "workspace(name = %r)\n" % rctx.name)
    rctx.file("BUILD.bazel", "")
    rctx.file(rctx.attr.package + "/BUILD.bazel", 'exports_files(["defs.bzl"])\n')
    rctx.file(rctx.attr.package + "/defs.bzl", "".join([
        "def %s(**attrs):\n    native.%s(**attrs)\n\n" % (r, r)
        for r in rctx.attr.rules
    ]))

native_rules_stub = repository_rule(
    implementation = _native_rules_stub_impl,
    attrs = {
        "package": attr.string(mandatory = True),
        "rules": attr.string_list(mandatory = True),
    },
)

def _coverage_tools_stub_impl(rctx):
    # Every test in Bazel 4 has an implicit dep on
    # @bazel_tools//tools/test:coverage_report_generator -> @remote_coverage_tools,
    # which Bazel would download. `bazel coverage` is not supported offline.
    rctx.file("WORKSPACE", "workspace(name = %r)\n" % rctx.name)
    rctx.file("no_coverage.sh", "#!/bin/sh\necho 'bazel coverage is not available offline' >&2\nexit 1\n", executable = True)
    rctx.file("BUILD.bazel", """package(default_visibility = ["//visibility:public"])

sh_binary(name = "coverage_report_generator", srcs = ["no_coverage.sh"])

sh_binary(name = "lcov_merger", srcs = ["no_coverage.sh"])
""")

coverage_tools_stub = repository_rule(implementation = _coverage_tools_stub_impl)

def offline_repositories():
    """Call from WORKSPACE before anything else (the suffix uses maybe())."""
    native_rules_stub(
        name = "rules_cc",
        package = "cc",
        rules = [
            "cc_binary",
            "cc_import",
            "cc_library",
            "cc_proto_library",
            "cc_test",
            "cc_toolchain",
            "cc_toolchain_suite",
            "fdo_prefetch_hints",
            "fdo_profile",
            "objc_import",
            "objc_library",
        ],
    )
    native_rules_stub(
        name = "rules_java",
        package = "java",
        rules = [
            "java_binary",
            "java_import",
            "java_library",
            "java_lite_proto_library",
            "java_package_configuration",
            "java_plugin",
            "java_proto_library",
            "java_runtime",
            "java_test",
            "java_toolchain",
        ],
    )
    coverage_tools_stub(name = "remote_coverage_tools")
    local_python_configure(name = "local_python")
