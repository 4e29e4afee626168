#!/usr/bin/env bash
# What a new user sees: clones the repository's main branch (or the ref given) into a temporary
# folder and runs the README's two commands there, in the README's order, with an empty cache
# root (a fresh HOME: no venv, no pip or Bazel cache, no compile cache), then prints the time of
# each and the test summary. Logs stay in the temporary folder, whose path is printed.
#
#   bash tools/fresh_check.sh [REF]
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ref="${1:-main}"
tmp="$(mktemp -d "${TMPDIR:-/tmp}/pagedjax-fresh.XXXXXX")"
git clone -q --branch "$ref" "$repo" "$tmp/pagedjax" || exit 1
# The machine's Python installs stay visible (pyenv finds them through PYENV_ROOT); nothing else of
# the old HOME does.
export PYENV_ROOT="${PYENV_ROOT:-$HOME/.pyenv}"
export HOME="$tmp/home"
mkdir -p "$HOME"
unset PAGEDJAX_CACHE PAGEDJAX_VENV PAGEDJAX_COMPILE_CACHE
cd "$tmp/pagedjax"
echo "fresh clone of $ref at $(git rev-parse --short HEAD) in $tmp (HOME=$HOME)"

run() {  # run NAME CMD...: runs CMD, logs to $tmp/NAME.log, prints its wall time and exit code
  local name="$1" t0 rc
  shift
  t0=$(date +%s)
  "$@" >"$tmp/$name.log" 2>&1
  rc=$?
  printf '%-5s %4d s  exit %d  (%s)\n' "$name" "$(( $(date +%s) - t0 ))" "$rc" "$*"
  return $rc
}

run run bash tools/run.sh generate "What is the capital of France?"; rc_run=$?
grep -v '^WARNING' "$tmp/run.log" | grep -v 'loading ' | tail -n 3 | sed 's/^/      | /'
run test bash tools/test.sh; rc_test=$?
grep -E '^[0-9]+ passed, [0-9]+ failed, [0-9]+ skipped$' "$tmp/test.log" | tail -n 1 | sed 's/^/      | /'
(bazel shutdown >/dev/null 2>&1 || true)
echo "logs: $tmp/run.log $tmp/test.log"
exit $(( rc_run || rc_test ))
