#!/usr/bin/env bash
# The whole test suite: `bash tools/test.sh` runs `bazel test //...` under the
# test venv (created on first use under ~/.cache/pagedjax/), installing Bazel
# from Debian's bazel-bootstrap when it is missing. Extra arguments go to Bazel.
# Ends with a line "N passed, N failed, N skipped" counted from the results.
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
pagedjax_venv test

if ! command -v bazel >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "pagedjax: installing Bazel (Debian's bazel-bootstrap)" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bazel-bootstrap >/dev/null
  else
    echo "error: bazel is missing; install it (Debian: apt-get install bazel-bootstrap)" >&2
    exit 1
  fi
fi

cd "$PAGEDJAX_ROOT"
# Bazel reads the interpreter from here (so a plain `bazel test //...` works afterwards too).
for cmd in build query sync fetch; do
  echo "$cmd --repo_env=PYTHON_BIN_PATH=$PY"
done > user.bazelrc
echo "test --test_env=PAGEDJAX_LLAMA_CPP_VOCABS=$PAGEDJAX_LLAMA_CPP_VOCABS" >> user.bazelrc  # pagedjax_venv test fetched them
rc=0
started="$(date +%s)"
bep="$(mktemp "${TMPDIR:-/tmp}/pagedjax-bep.XXXXXX")"
bazel test //... --build_event_json_file="$bep" "$@" || rc=$?
# Counts only the results this run wrote (a target whose XML is older did not run: a failure), and
# a target Bazel failed though its cases passed (a crash at exit) as a failure.
"$PY" tools/test_summary.py --since "$started" --bep "$bep" || rc=$((rc ? rc : 1))
rm -f "$bep"
exit $rc
