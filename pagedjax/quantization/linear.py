"""quantized_matmul: the one entry point a linear layer calls with a QuantizedWeight.

Dims: M rows of x (tokens), K in_features, N out_features.

impl:
  "w8a16" fp8 weights only (per-tensor or per-channel scales): bf16 activations, the e4m3 weights
          converted in the dot's operand, the scales on the f32 result; no activation quantization.
          The only impl of weight-only checkpoints (activation "none": compressed-tensors W8A16).
          For decode (a step at small M reads the weights' bytes and runs few kernels per linear):
          "auto" picks it on a GPU up to $PAGEDJAX_FP8_WEIGHT_ONLY_ROWS rows (default
          WEIGHT_ONLY_MAX_ROWS; 0 turns it off), elsewhere only where the variable is set. On
          the H100 (2026-12-05, quant_matmul.py on Llama-3-8B's qkv, gate_up and down) it ran 1.4-1.8x bf16 at M 1-32, ahead of the W8A8
          dot (1.0-1.7x), 6% ahead of it over the three at M 64 and behind at M >= 128; the
          engine's batch-1 step fell from 1.33x bf16's (W8A8) to 0.66x with it (RESULTS.md).
  "xla"   XLA ops only, any backend (CPU tests check it against float64). fp8: activations
          quantized, then an e4m3 x e4m3 dot with f32 accumulation (both operands dequantized to
          f32 for block weights); int4: dequantize to x's dtype, then one dot.
  "ffi"   the CUDA custom calls (kernels.py): cuBLASLt's FP8 GEMM; the int4 tensor-core kernel.
  "auto"  by M, from benchmarks/kernels/quant_matmul.py on the H200 (2026-12-04, Llama-3-8B's
          gate_up and down shapes, results/2026-12-04-h200-quant_matmul.json): fp8 runs "w8a16"
          up to the weight-only rows (above), XLA's own e4m3 dot up to FP8_XLA_MAX_ROWS rows
          (1.3-1.5x bf16 at M = 1 and 16, where cuBLASLt's call was 0.8-1.1x) and cuBLASLt's
          GEMM above (1.3-1.8x bf16 at M = 2048, XLA 1.3-1.5x);
          int4 runs the kernel up to INT4_KERNEL_MAX_ROWS rows (1.3-1.4x bf16 at M = 1, 0.8x at
          16) and dequantize + one GEMM above (the kernel falls to 0.1x at M >= 256).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp

from pagedjax.quantization import kernels
from pagedjax.quantization.fp8 import dequantize_fp8, fp8_matmul_xla, fp8_weight_only_matmul, quantize_activation
from pagedjax.quantization.int4 import dequantize_int4, int4_matmul_xla
from pagedjax.quantization.weight import QuantizedWeight

IMPLS = ("auto", "xla", "ffi", "w8a16")
WEIGHT_ONLY_ENV = "PAGEDJAX_FP8_WEIGHT_ONLY_ROWS"  # listed in compile_cache.PROGRAM_ENV
WEIGHT_ONLY_MAX_ROWS = 64  # "auto": fp8 weight-only (w8a16) up to this M on a GPU, unless the variable says
INT4_KERNEL_MAX_ROWS = 16  # "auto": the int4 kernel up to this M, dequantize + XLA's GEMM above
FP8_XLA_MAX_ROWS = 256  # "auto": XLA's e4m3 dot up to this M, cuBLASLt's FP8 GEMM above


def resolve_impl(impl: str, w: QuantizedWeight, x_dtype, num_rows: int) -> str:
    """"xla", "ffi" or "w8a16" for this call ("auto" decided from the backend, the weight and M)."""
    if impl not in IMPLS:
        raise ValueError(f"quantized_matmul: unknown impl {impl!r} (expected one of {IMPLS})")
    if impl == "w8a16" and not weight_only_supported(w):
        raise ValueError(f"quantized_matmul: impl 'w8a16' needs fp8 weights with per-tensor or per-channel "
                         f"scales, got {w.kind} ({w.weight_strategy})")
    if w.kind == "fp8" and w.activation == "none":  # a weight-only checkpoint: no activation scheme to run W8A8
        if impl not in ("auto", "w8a16"):
            raise ValueError(f"quantized_matmul: a weight-only fp8 weight (W8A16) runs impl 'w8a16' or 'auto', "
                             f"not {impl!r}")
        return "w8a16"
    if impl != "auto":
        return impl
    gpu = jax.default_backend() == "gpu"
    if (gpu or os.environ.get(WEIGHT_ONLY_ENV, "").strip()) and weight_only_supported(w) \
            and num_rows <= _weight_only_rows():
        return "w8a16"  # a GPU by default; elsewhere only where the variable is set
    if not gpu:
        return "xla"
    if w.kind == "fp8":
        ok = (num_rows > FP8_XLA_MAX_ROWS and kernels.has_handler(kernels.FP8_TARGET)
              and kernels.fp8_scale_mode(w) is not None)
    else:
        ok = (kernels.has_handler(kernels.INT4_TARGET) and kernels.int4_supported(w, x_dtype)
              and num_rows <= INT4_KERNEL_MAX_ROWS)
    return "ffi" if ok else "xla"


def quantized_matmul(x: jax.Array, w: QuantizedWeight, *, impl: str = "auto", out_dtype=None) -> jax.Array:
    """y [M, N] = x [M, K] @ w.T, w dequantized (fp8: x quantized too, W8A8); y in out_dtype (x's).

    x is bf16, f16 or f32. Activation scales of dynamic fp8 schemes are computed here, per call.
    An act-order int4 weight (rows sorted by group) takes x's columns in its rows' order, then runs
    as any int4 weight: the kernel included.
    """
    if x.ndim != 2 or x.shape[1] != w.in_features:
        raise ValueError(f"quantized_matmul: x must be [M, {w.in_features}], got {list(x.shape)}")
    if jnp.dtype(x.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)):
        raise ValueError(f"quantized_matmul: x must be bf16, f16 or f32, got {jnp.dtype(x.dtype).name}")
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if w.kind == "int4" and w.act_order:
        x, w = jnp.take(x, w.perm, axis=1), dataclasses.replace(w, perm=None)
    impl = resolve_impl(impl, w, x.dtype, x.shape[0])
    with jax.named_scope(f"quant_matmul_{w.kind}"):
        if impl == "w8a16":
            return fp8_weight_only_matmul(x, w).astype(out_dtype)
        if w.kind == "fp8":
            x_q, x_scale = quantize_activation(x, w)
            if impl == "ffi":
                return kernels.fp8_gemm(x_q, x_scale, w, out_dtype)
            return fp8_matmul_xla(x_q, x_scale, w).astype(out_dtype)
        if w.kind == "int4":
            if impl == "ffi":
                return kernels.int4_gemm(x, w).astype(out_dtype)
            return int4_matmul_xla(x, w).astype(out_dtype)
    raise ValueError(f"quantized_matmul: unknown weight kind {w.kind!r}")


def weight_only_supported(w: QuantizedWeight) -> bool:
    return w.kind == "fp8" and w.weight_strategy in ("tensor", "channel")


def _weight_only_rows() -> int:
    text = os.environ.get(WEIGHT_ONLY_ENV, "").strip()
    if not text:
        return WEIGHT_ONLY_MAX_ROWS
    if not text.isdigit():
        raise ValueError(f"{WEIGHT_ONLY_ENV} must be a number of rows (0: off), got {text!r}")
    return int(text)


def dequantize(w: QuantizedWeight, dtype=jnp.float32) -> jax.Array:
    """The weight [N, K] (HF's [out, in]) that w stands for, in `dtype`."""
    return dequantize_fp8(w).astype(dtype) if w.kind == "fp8" else dequantize_int4(w, dtype)
