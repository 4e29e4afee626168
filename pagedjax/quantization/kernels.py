"""The quantized-matmul custom calls (xla_kernels/quant_*.cu; CUDA only, the XLA path runs elsewhere).

Dims: M rows of x (tokens), K in_features, N out_features, KB = K / 128 K-blocks, S K-splits.

  pagedjax_fp8_gemm   cuBLASLt's FP8 GEMM: e4m3 x e4m3, f32 accumulation, bf16/f16/f32 out, the
                      scales applied by cuBLASLt (scalar, outer-vector, or 1x128 x 128x128 block
                      modes). Its 32 MiB workspace is the call's second output.
  pagedjax_int4_gemm  W4A16 tensor-core kernel: packed int4 tiles read once from HBM and turned
                      into bf16/f16 mma fragments in registers; K split over S CTAs when N alone
                      leaves SMs idle (f32 partials in the second output, reduced by a second
                      launch). Rows of x go through in chunks of 64.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import pagedjax._ffi as _ffi
from pagedjax.quantization.weight import QuantizedWeight

FP8_TARGET = "pagedjax_fp8_gemm"
INT4_TARGET = "pagedjax_int4_gemm"
FP8_WORKSPACE_BYTES = 32 << 20  # what cuBLAS asks for on Hopper
FP8_SCALE_MODES = {"scalar": 0, "outer": 1, "block128": 2}  # the handler's scale_mode attribute
BLOCK_ROW_MULTIPLE = 16  # block128 mode pads the rows of x to this
INT4_MAX_ROWS_PER_LAUNCH = 64  # the kernel's largest row tile (8 mma n8 tiles)
INT4_TILE_K = 64
OUT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


@functools.cache
def _num_sms() -> int:
    return int(getattr(jax.devices()[0], "core_count", 0) or 132)


def has_handler(target: str) -> bool:
    """Whether the extension carries the CUDA handler for `target` (it is CUDA only)."""
    try:
        _ffi.require(target, "cuda")
    except _ffi.KernelsUnavailableError:
        return False
    return True


# --- fp8 -----------------------------------------------------------------------------------


@functools.cache
def preload_cublaslt() -> None:
    """Loads libcublasLt.so.13 from the NVIDIA wheel JAX's CUDA plugin installed, if there is one.

    The handler dlopens the library by name when first called; XLA has normally loaded it by
    then. This covers a process where it has not and the wheel's directory is not on the
    loader's path.
    """
    try:  # already in the process (XLA's copy): the handler's dlopen will find it by name
        ctypes.CDLL("libcublasLt.so.13", mode=os.RTLD_NOLOAD | ctypes.RTLD_GLOBAL)
        return
    except OSError:
        pass
    for pkg in ("nvidia.cu13", "nvidia.cublas"):
        try:
            spec = importlib.util.find_spec(pkg)
        except ModuleNotFoundError:
            continue
        for root in (spec.submodule_search_locations or []) if spec else []:
            lib = Path(root) / "lib" / "libcublasLt.so.13"
            if lib.exists():
                ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
                return


def fp8_scale_mode(w: QuantizedWeight) -> str | None:
    """The cuBLASLt scale mode that serves w, or None when the custom call cannot (XLA path)."""
    K, N = w.in_features, w.out_features
    if K % 16 or N % 16:  # FP8 tensor-core GEMMs want 16-byte aligned rows of A, B and D
        return None
    if w.weight_strategy == "block":  # whole 128x128 blocks only: partial ones are not tried with cuBLASLt
        ok = w.block_size == (128, 128) and w.activation == "group" and K % 128 == 0 and N % 128 == 0
        return "block128" if ok else None
    if w.weight_strategy == "tensor" and w.activation == "static":
        return "scalar"
    return "outer"


def fp8_gemm(x_q: jax.Array, x_scale: jax.Array, w: QuantizedWeight, out_dtype) -> jax.Array:
    """y [M, N] (out_dtype) = (x_q * x_scale) @ (w.qvalue * w.scale).T through cuBLASLt.

    x_q [M, K] e4m3; x_scale [] (static), [M] (per token) or [M, KB] (per 128-group).
    """
    mode = fp8_scale_mode(w)
    if mode is None:
        raise ValueError(f"pagedjax_fp8_gemm: no cuBLASLt mode for this fp8 weight ({w.weight_strategy}, "
                         f"block {w.block_size}, activation {w.activation}, [out={w.out_features}, in={w.in_features}])")
    if jnp.dtype(out_dtype) not in [jnp.dtype(d) for d in OUT_DTYPES]:
        raise ValueError(f"pagedjax_fp8_gemm: output dtype {jnp.dtype(out_dtype).name} (bf16, f16 or f32)")
    _ffi.require(FP8_TARGET, jax.default_backend())
    preload_cublaslt()
    M, N = x_q.shape[0], w.out_features
    xs, ws = x_scale.astype(jnp.float32), w.scale.astype(jnp.float32)
    rows = M
    if mode == "block128" and M % BLOCK_ROW_MULTIPLE:
        # Rows padded (zero codes, unit scales) so the [KB, M] scale rows stay 16-byte aligned;
        # the GEMM's cost at small M is the weights', not the padding's.
        rows = -(-M // BLOCK_ROW_MULTIPLE) * BLOCK_ROW_MULTIPLE
        x_q = jnp.pad(x_q, ((0, rows - M), (0, 0)))
        xs = jnp.pad(xs, ((0, rows - M), (0, 0)), constant_values=1.0)
    if mode == "outer":  # one scale per row of x and per row of w (a scalar broadcast to its vector)
        xs = jnp.broadcast_to(xs, (M,))
        ws = jnp.broadcast_to(ws, (N,))
    elif mode == "scalar":
        xs, ws = xs.reshape(1), ws.reshape(1)
    else:
        # cuBLASLt's 1x128 scales run M-fastest ([KB, M]); its 128x128 scales run K-blocks
        # fastest with KB padded to a multiple of 4 ([NB, round_up(KB, 4)]).
        xs = xs.T  # [KB, M]
        kb = ws.shape[1]
        ws = jnp.pad(ws, ((0, 0), (0, -kb % 4)))  # [NB, KBp]
    out_type = jax.ShapeDtypeStruct((rows, N), out_dtype)  # [M, N]
    ws_type = jax.ShapeDtypeStruct((FP8_WORKSPACE_BYTES,), jnp.uint8)
    y, _ = jax.ffi.ffi_call(FP8_TARGET, (out_type, ws_type))(
        x_q, xs, w.qvalue, ws, scale_mode=np.int32(FP8_SCALE_MODES[mode]))
    return y if rows == M else y[:M]


# --- int4 ----------------------------------------------------------------------------------


def int4_supported(w: QuantizedWeight, x_dtype) -> bool:
    """Whether the int4 kernel serves w for inputs of x_dtype (else: the XLA path). An act-order
    weight is served once quantized_matmul has taken x's columns in its rows' order (and dropped
    its perm): the kernel reads a group's scales once per K-tile, in the rows' order."""
    return (not w.act_order and jnp.dtype(x_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
            and (w.group_size % INT4_TILE_K == 0 or w.group_size == w.in_features))


def int4_num_splits(M: int, N: int, K: int, num_sms: int) -> int:
    """K-splits S: enough CTAs (128 output columns each) for about two per SM, each split >= 4 K-tiles."""
    strips = -(-N // 128)
    k_tiles = K // INT4_TILE_K
    return max(1, min(math.ceil(2 * num_sms / strips), k_tiles // 4, 16))


def int4_gemm(x: jax.Array, w: QuantizedWeight, num_splits: int | None = None) -> jax.Array:
    """y [M, N] in x's dtype = x [M, K] @ dequantized w.T, with the CUDA kernel (bf16/f16 x)."""
    if not int4_supported(w, x.dtype):
        raise ValueError(f"pagedjax_int4_gemm: needs bf16/f16 x and a group size that is a multiple of "
                         f"{INT4_TILE_K} (or the whole K), without act-order; got {jnp.dtype(x.dtype).name}, "
                         f"group {w.group_size}{', act-order' if w.act_order else ''}")
    _ffi.require(INT4_TARGET, jax.default_backend())
    M, K = x.shape
    N = w.out_features
    if num_splits is None:
        num_splits = int4_num_splits(M, N, K, _num_sms())
    rows = min(max(M, 1), INT4_MAX_ROWS_PER_LAUNCH)
    ws_elems = 1 if num_splits == 1 else num_splits * rows * N
    out_type = jax.ShapeDtypeStruct((M, N), x.dtype)  # [M, N]
    ws_type = jax.ShapeDtypeStruct((ws_elems,), jnp.float32)  # [S, rows, N] partials
    y, _ = jax.ffi.ffi_call(INT4_TARGET, (out_type, ws_type))(
        x, w.qvalue, w.scale, w.zero, group_size=np.int32(w.group_size), num_splits=np.int32(num_splits))
    return y
