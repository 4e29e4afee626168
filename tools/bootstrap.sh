# Sourced by tools/run.sh and tools/test.sh: finds Python >= 3.12 and makes the
# virtual environment for one purpose ("run" or "test"), kept outside the clone
# under ~/.cache/pagedjax/ and keyed by the Python version and the pins, so a
# second run on the same machine downloads nothing.
#
#   pagedjax_venv run|test      -> sets VENV and PY (and, for "test",
#                                  PAGEDJAX_LLAMA_CPP_VOCABS: see pagedjax_llama_cpp_vocabs)
#
# Besides pyproject's dependencies (tools/deps.py), the venvs get the pinned packages
# of tools/requirements-nodeps.txt (run) or tools/requirements-test-nodeps.txt (test),
# installed with --no-deps, again whenever those pins change.
#
# PAGEDJAX_PYTHON=/path/to/python overrides the interpreter search;
# PAGEDJAX_CACHE (default ~/.cache/pagedjax) moves the cache.

set -euo pipefail

PAGEDJAX_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PAGEDJAX_CACHE="${PAGEDJAX_CACHE:-$HOME/.cache/pagedjax}"

_py_ok() {  # true when $1 runs and is Python >= 3.12 with venv and pip
  "$1" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1
}

find_python() {
  local cand
  if [ -n "${PAGEDJAX_PYTHON:-}" ]; then
    _py_ok "$PAGEDJAX_PYTHON" && { echo "$PAGEDJAX_PYTHON"; return; }
    echo "error: PAGEDJAX_PYTHON=$PAGEDJAX_PYTHON is not a Python >= 3.12 with venv" >&2
    return 1
  fi
  # 3.12 first: it matches the GPU machines (jax 0.11.2 needs Python >= 3.12).
  for cand in python3.12 python3.13 python3.14 python3; do
    if command -v "$cand" >/dev/null && _py_ok "$(command -v "$cand")"; then
      command -v "$cand"; return
    fi
  done
  # pyenv installs that are not the global version (their shims refuse to run).
  local roots=("${PYENV_ROOT:-$HOME/.pyenv}")
  for cand in $(ls -d "${roots[0]}"/versions/3.1[2-9]*/bin/python3 2>/dev/null | sort -V); do
    _py_ok "$cand" && { echo "$cand"; return; }
  done
  echo "error: pagedjax needs Python >= 3.12 (jax 0.11.2 does), and none was found." >&2
  echo "       Install one (e.g. 'pyenv install 3.12', or your distribution's python3.12 with venv)" >&2
  echo "       or point PAGEDJAX_PYTHON at it." >&2
  return 1
}

pagedjax_venv() {
  local purpose="$1" base_py key extras nodeps mark
  base_py="$(find_python)"
  case "$purpose" in
    run) extras="serve"; nodeps="requirements-nodeps.txt" ;;
    test) extras="serve test"; nodeps="requirements-test-nodeps.txt" ;;
    *) echo "pagedjax_venv: unknown purpose $purpose" >&2; return 1 ;;
  esac
  key="$( { "$base_py" -c 'import sys; print(sys.version)'; echo "$extras";
            "$base_py" "$PAGEDJAX_ROOT/tools/deps.py" $extras; } | sha256sum | cut -c1-12)"
  VENV="${PAGEDJAX_VENV:-$PAGEDJAX_CACHE/venv-$purpose-$key}"
  PY="$VENV/bin/python"
  if [ ! -f "$VENV/.complete" ]; then
    echo "pagedjax: creating $VENV with $base_py (first run only; downloads packages)" >&2
    rm -rf "$VENV"
    mkdir -p "$PAGEDJAX_CACHE"
    "$base_py" -m venv "$VENV"
    "$PY" -m pip install -q --upgrade pip >&2
    "$PY" "$PAGEDJAX_ROOT/tools/deps.py" $extras > "$VENV/requirements.txt"
    # Build tools for the extension (the run venv builds it with pip; the test
    # venv needs pybind11's headers for Bazel).
    echo "scikit-build-core>=0.10" >> "$VENV/requirements.txt"
    echo "pybind11>=2.13" >> "$VENV/requirements.txt"
    echo "cmake>=3.26" >> "$VENV/requirements.txt"
    echo "ninja" >> "$VENV/requirements.txt"
    "$PY" -m pip install -q -r "$VENV/requirements.txt" >&2
    touch "$VENV/.complete"
  fi
  # The bundled model (and GPT-2's BPE files for the tests): packages whose declared
  # dependencies pagedjax does not need. Keyed by their pins, not part of the venv's key.
  mark="$VENV/.nodeps-$(cat "$PAGEDJAX_ROOT"/tools/requirements*-nodeps.txt | sha256sum | cut -c1-12)"
  if [ ! -f "$mark" ]; then
    "$PY" -m pip install -q --no-deps -r "$PAGEDJAX_ROOT/tools/$nodeps" >&2
    rm -f "$VENV"/.nodeps-*
    touch "$mark"
  fi
  if [ "$purpose" = test ]; then
    pagedjax_llama_cpp_vocabs
  fi
}

# llama.cpp's vocab-only GGUFs with their expected token ids (ggml-vocab-*.gguf, .gguf.inp,
# .gguf.out), for tests/test_tokenizer.py: taken from the llama-cpp-python sdist pinned (with
# its hash) in tools/requirements-test-data.txt, once per pinned version, into
# $PAGEDJAX_CACHE/llama-cpp-vocabs-<version>. Sets PAGEDJAX_LLAMA_CPP_VOCABS to that folder.
# Needs PY (pagedjax_venv). Fails (set -e) when the files cannot be had: the tests need them.
pagedjax_llama_cpp_vocabs() {
  local pins="$PAGEDJAX_ROOT/tools/requirements-test-data.txt" version dir tmp
  version="$(sed -n 's/^llama-cpp-python==\([^ ]*\).*/\1/p' "$pins")"
  [ -n "$version" ] || { echo "error: no llama-cpp-python==VERSION line in $pins" >&2; return 1; }
  dir="$PAGEDJAX_CACHE/llama-cpp-vocabs-$version"
  if [ ! -f "$dir/.complete" ]; then
    echo "pagedjax: fetching llama.cpp's vocab test files (llama-cpp-python $version sdist, ~77 MB; once)" >&2
    mkdir -p "$PAGEDJAX_CACHE"
    tmp="$(mktemp -d "$PAGEDJAX_CACHE/.llama-cpp-vocabs.XXXXXX")"
    "$PY" -m pip download -q --no-deps --no-binary :all: --require-hashes -r "$pins" -d "$tmp" >&2
    tar xzf "$tmp/llama_cpp_python-$version.tar.gz" -C "$tmp" --wildcards '*/vendor/llama.cpp/models/ggml-vocab-*'
    rm -rf "$dir"
    mv "$tmp/llama_cpp_python-$version/vendor/llama.cpp/models" "$dir"
    rm -rf "$tmp"
    touch "$dir/.complete"
  fi
  PAGEDJAX_LLAMA_CPP_VOCABS="$dir"
}
