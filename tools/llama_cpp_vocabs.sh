#!/usr/bin/env bash
# Prints the folder of llama.cpp's vocab test files, fetching them first if needed (once per
# pinned version; see pagedjax_llama_cpp_vocabs in tools/bootstrap.sh). tools/test.sh passes the
# folder to the tests itself; to run tests/test_tokenizer.py directly:
#
#   export PAGEDJAX_LLAMA_CPP_VOCABS="$(bash tools/llama_cpp_vocabs.sh)"
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
pagedjax_venv test
echo "$PAGEDJAX_LLAMA_CPP_VOCABS"
