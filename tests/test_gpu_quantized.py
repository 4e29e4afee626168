"""Quantized models on the GPU: the engine's compiled step runs the FP8 GEMM (cuBLASLt custom call,
or at least an e4m3 dot) and, for decode, the int4 kernel; their logits agree with the XLA path's.

Random weights of a named tiny config quantized at load, bf16 activations. Marked `gpu`: skipped
without CUDA.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagedjax.attention import build_metadata
from pagedjax.dummy_weights import random_params
from pagedjax.kv_cache.page_pool import init_pages
from pagedjax.model_runner import ModelRunner, _step, pack
from pagedjax.models import get_config, get_model
from pagedjax.quantization import kernels
from pagedjax.quantization import linear as quant_linear

pytestmark = pytest.mark.gpu
CFG = get_config("tiny-llama").replace(num_heads=8, hidden_size=256, intermediate_size=512, vocab_size=512)


def step_hlo(params, T: int, kv_cache_dtype: str = "auto") -> str:
    """The compiled engine step of bucket T, as text."""
    runner = ModelRunner(params, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=16, num_pages=16,
                         precompile=False, kv_cache_dtype=kv_cache_dtype)
    buf, layout = pack(runner._dummy_inputs(T)[0])
    return _step.lower(params.config, runner.attn_impl, params.variables, runner.pages, jax.device_put(buf),
                       runner._no_prev, layout=layout).compile().as_text()


def _fp8_dots(hlo: str) -> int:
    """XLA's own FP8 GEMMs in compiled HLO: cuBLASLt calls (or dots) with e4m3 operands."""
    return len(re.findall(r"(custom-call|\bdot)\([^\n]*f8e4m3fn", hlo))


def test_fp8_step_runs_the_fp8_gemm(monkeypatch):
    """Decode-sized steps run XLA's e4m3 dot (faster there), large ones cuBLASLt's FP8 GEMM call
    (quantization/linear.py's measured choice): 7 FP8 GEMMs per layer either way, none in bf16."""
    params = random_params(CFG, dtype=jnp.bfloat16, quantization="fp8")
    hlo = step_hlo(params, 16, kv_cache_dtype="fp8")
    assert _fp8_dots(hlo) >= 7 * CFG.num_layers, hlo[:3000]
    assert "f8e4m3fn[16,16,2,16]" in hlo  # the fp8 pool: [P, page, K, H]
    assert kernels.has_handler(kernels.FP8_TARGET), "the extension was built without the cuBLASLt FP8 handler"
    monkeypatch.setattr(quant_linear, "FP8_XLA_MAX_ROWS", 8)  # as for a step of more rows
    hlo = step_hlo(params, 16, kv_cache_dtype="fp8")
    calls = hlo.count(f'custom_call_target="{kernels.FP8_TARGET}"')
    assert calls == 7 * CFG.num_layers, f"{calls} cuBLASLt FP8 GEMM calls, want q/k/v/o/gate/up/down per layer"


def test_int4_decode_step_runs_the_int4_kernel():
    assert kernels.has_handler(kernels.INT4_TARGET), "the extension was built without CUDA handlers"
    params = random_params(CFG, dtype=jnp.bfloat16, quantization="awq")
    assert f'custom_call_target="{kernels.INT4_TARGET}"' in step_hlo(params, 1)


@pytest.mark.parametrize("method", ["fp8", "awq"])
def test_custom_call_logits_match_the_xla_path(method, monkeypatch):
    params = random_params(CFG, dtype=jnp.bfloat16, quantization=method, seed=3)
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, 12).astype(np.int32)

    def logits():  # one prefill of 12 tokens and one decode step (M = 1: the int4 kernel's case)
        pages = init_pages(CFG.num_layers, 4, 16, CFG.num_kv_heads, CFG.head_dim, jnp.bfloat16)
        model = get_model(params.config)
        apply = jax.jit(lambda *args: model.apply(*args))  # a fresh trace: resolve_impl as patched now
        out = []
        for q, n in ((tokens[:11], 11), (tokens[11:], 12)):
            meta = build_metadata([len(q)], [n], [[1]], page_size=16, num_pages=4, logits_indices=range(len(q)))
            lg, pages = apply(params.variables, q, pages, meta)
            out.append(np.asarray(lg, np.float32))
        return np.concatenate(out)

    ffi = logits()
    resolve = quant_linear.resolve_impl
    monkeypatch.setattr(quant_linear, "resolve_impl", lambda impl, *a: resolve("xla", *a))
    xla = logits()
    err = float(np.abs(ffi - xla).max() / np.abs(xla).max())
    # bf16 activations, different accumulation orders: ~1e-2; a wrong layout or scale: ~1
    assert err < 0.05, f"{method}: custom calls vs XLA path, {err:.3g} of the logit scale"
