"""batch_invariant=True is refused on the GPU, with a clear error.

On an H200 (2026-12-04, commit 1137093), the checks of tests/test_batch_invariance.py at
Llama-3-8B's widths (4 layers, random bf16 weights) failed with the mode running the jnp attention
in place of the custom call: the probe's logprobs moved beside 8, 64 and 255 strangers, with
chunks of 64 and 256, after prefix hits and with async scheduling off (7 of 7 checks;
benchmarks/results/2026-12-04-h200-batch-invariance-gpu-tests.log), and W1 ran at 0.65 req/s
against 33.1 without the mode. Until an attention with a fixed KV split size exists for the GPU,
the engine refuses the flag there rather than promise what it does not give. Marked `gpu`:
skipped without CUDA.
"""

from __future__ import annotations

import pytest

import pagedjax as pj

pytestmark = pytest.mark.gpu


def test_refused_on_the_gpu():
    import jax.numpy as jnp

    from pagedjax.dummy_weights import random_params
    from pagedjax.models.named import NAMED_CONFIGS

    params = random_params(NAMED_CONFIGS["tiny-llama"], dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="batch_invariant=True runs on the CPU only"):
        pj.LLM(params, batch_invariant=True, precompile=False)
    pj.LLM(params, batch_invariant=False, precompile=False)  # the default mode is unaffected
