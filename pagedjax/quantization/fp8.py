"""FP8 (e4m3fn) W8A8: quantizing weights and activations, and the portable XLA matmul.

Dims: M rows of x (tokens), K in_features, N out_features, KB = ceil(K / block_k) K-blocks,
NB = ceil(N / block_n) N-blocks.

e4m3fn: max 448, no infinities. Values are divided by their scale, clipped to [-448, 448]
(saturating: a plain cast would turn them into NaN) and rounded to nearest even by the cast.
A scale is amax / 448, floored at MIN_SCALE so that an all-zero row or channel stays finite.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pagedjax.quantization.weight import QuantizedWeight

FP8_MAX = 448.0
MIN_SCALE = 1e-12  # vLLM floors dynamic scales too; smaller amax just makes the codes larger
HIGHEST = jax.lax.Precision.HIGHEST


def to_e4m3(x: jax.Array, scale: jax.Array) -> jax.Array:
    """x / scale, saturated to +-448 and rounded to nearest even into float8_e4m3fn."""
    return jnp.clip(x.astype(jnp.float32) / scale, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)


def _amax_scale(amax: jax.Array) -> jax.Array:
    return jnp.maximum(amax.astype(jnp.float32) / FP8_MAX, MIN_SCALE)


@functools.partial(jax.jit, static_argnames=("strategy", "block_size", "activation"))
def quantize_fp8(w: jax.Array, strategy: str = "channel", block_size: tuple[int, int] | None = None,
                 activation: str | None = None, input_scale: jax.Array | None = None) -> QuantizedWeight:
    """A float weight w [N, K] (HF's [out, in]) -> e4m3 QuantizedWeight with amax / 448 scales.

    strategy: "channel" (one scale per output row; online quantization), "tensor", or "block"
    (block_size (bn, bk)). activation defaults to "group" for blocks, "token" otherwise;
    "static" takes `input_scale`.
    """
    N, K = w.shape
    wf = jnp.abs(w.astype(jnp.float32))
    if strategy == "tensor":
        scale = _amax_scale(jnp.max(wf))  # []
        q = to_e4m3(w, scale)
    elif strategy == "channel":
        scale = _amax_scale(jnp.max(wf, axis=1))  # [N]
        q = to_e4m3(w, scale[:, None])
    elif strategy == "block":
        scale = _amax_scale(_block_amax(wf, block_size))  # [NB, KB]
        q = to_e4m3(w, expand_block_scale(scale, N, K, block_size))
    else:
        raise ValueError(f"unknown fp8 weight strategy {strategy!r} (tensor, channel or block)")
    if activation is None:
        activation = "group" if strategy == "block" else "token"
    if (activation == "static") != (input_scale is not None):
        raise ValueError("quantize_fp8: activation 'static' takes input_scale, and only it does")
    if input_scale is not None:
        input_scale = jnp.asarray(input_scale, jnp.float32).reshape(())
    return QuantizedWeight(q, scale, None, input_scale, "fp8", K, N,
                           block_size=tuple(block_size) if strategy == "block" else None, activation=activation)


@functools.partial(jax.jit, static_argnames=("block_size",))
def quantize_experts_fp8(w: jax.Array, block_size: tuple[int, int] | None = None) -> tuple[jax.Array, jax.Array]:
    """Stacked expert weights w [E, K, N] (our kernels' [experts, in, out]) -> (e4m3 codes [E, K, N],
    f32 scales): one amax / 448 scale per expert and output channel ([E, N]), as online FP8
    linears, or with block_size (block_n, block_k) per expert and block ([E, KB, NB])."""
    wf = jnp.abs(w.astype(jnp.float32))
    if block_size is None:
        scale = _amax_scale(jnp.max(wf, axis=1))  # [E, N]
        return to_e4m3(w, scale[:, None, :]), scale
    _, K, N = w.shape
    bn, bk = block_size
    scale = _amax_scale(_block_amax(wf, (bk, bn)))  # [E, KB, NB]
    return to_e4m3(w, expand_block_scale(scale, K, N, (bk, bn))), scale


def _block_amax(wf: jax.Array, block_size: tuple[int, int]) -> jax.Array:
    """|w| [..., R, C] -> the max of each block [..., RB, CB] (block_size (rows, cols); edge blocks
    partial: the padding's zeros never raise an amax)."""
    R, C = wf.shape[-2:]
    br, bc = block_size
    RB, CB = -(-R // br), -(-C // bc)
    padded = jnp.pad(wf, ((0, 0),) * (wf.ndim - 2) + ((0, RB * br - R), (0, CB * bc - C)))
    return padded.reshape(*wf.shape[:-2], RB, br, CB, bc).max(axis=(-3, -1))


def expand_block_scale(scale: jax.Array, rows: int, cols: int, block_size: tuple[int, int]) -> jax.Array:
    """Block scales [..., RB, CB] -> one scale per element [..., rows, cols] (block_size (rows,
    cols) of a block): a linear's [NB, KB] with (bn, bk), an expert stack's [E, KB, NB] with (bk, bn)."""
    br, bc = block_size
    return jnp.repeat(jnp.repeat(scale, br, axis=-2)[..., :rows, :], bc, axis=-1)[..., :cols]


def quantize_activation(x: jax.Array, w: QuantizedWeight) -> tuple[jax.Array, jax.Array]:
    """x [M, K] -> (x_q [M, K] e4m3, x_scale) as w's activation scheme says.

    x_scale: [] for "static" (the checkpoint's input_scale), [M] for "token" (amax of each row / 448),
    [M, KB] for "group" (amax of each row's block_k-wide K-blocks / 448).
    """
    M, K = x.shape
    if w.activation == "static":
        return to_e4m3(x, w.input_scale), w.input_scale
    xf = jnp.abs(x.astype(jnp.float32))
    if w.activation == "token":
        scale = _amax_scale(jnp.max(xf, axis=1))  # [M]
        return to_e4m3(x, scale[:, None]), scale
    if w.activation == "group":
        bk = w.block_size[1]
        KB = -(-K // bk)
        scale = _amax_scale(jnp.pad(xf, ((0, 0), (0, KB * bk - K))).reshape(M, KB, bk).max(axis=2))  # [M, KB]
        return to_e4m3(x, jnp.repeat(scale, bk, axis=1)[:, :K]), scale
    raise ValueError(f"unknown fp8 activation scheme {w.activation!r}")


def dequantize_fp8(w: QuantizedWeight) -> jax.Array:
    """The f32 weight [N, K] that w stands for."""
    s = w.scale
    if w.weight_strategy == "block":
        s = expand_block_scale(s, w.out_features, w.in_features, w.block_size)
    elif w.weight_strategy == "channel":
        s = s[:, None]
    return w.qvalue.astype(jnp.float32) * s


def fp8_weight_only_matmul(x: jax.Array, w: QuantizedWeight) -> jax.Array:
    """f32 y [M, N] = x [M, K] @ (w.qvalue * w.scale).T for per-tensor / per-channel fp8 weights,
    x unquantized: the e4m3 weights converted to x's dtype (exactly: e4m3 fits in bf16, f16 and
    f32) inside the dot, f32 accumulation, the scale on the result."""
    if w.weight_strategy not in ("tensor", "channel"):
        raise ValueError(f"fp8_weight_only_matmul: per-tensor or per-channel weights, got {w.weight_strategy!r}")
    acc = jax.lax.dot_general(x, w.qvalue.astype(x.dtype), (((1,), (1,)), ((), ())),
                              preferred_element_type=jnp.float32)  # [M, N]
    return acc * w.scale  # scale: [] or [N]


def fp8_matmul_xla(x_q: jax.Array, x_scale: jax.Array, w: QuantizedWeight) -> jax.Array:
    """f32 y [M, N] from quantized activations and weights, with XLA ops only (any backend).

    Per-tensor / per-channel weights: one e4m3 x e4m3 dot with f32 accumulation (exact products),
    then both scales; on a GPU this is XLA's own FP8 GEMM. Block weights: both operands
    dequantized to f32 and one f32 dot (the scales vary along K, inside the sum).
    """
    if w.weight_strategy == "block":
        bk = w.block_size[1]
        xd = x_q.astype(jnp.float32) * jnp.repeat(x_scale, bk, axis=1)[:, : w.in_features]  # [M, K]
        return jax.lax.dot_general(xd, dequantize_fp8(w), (((1,), (1,)), ((), ())), precision=HIGHEST,
                                   preferred_element_type=jnp.float32)  # [M, N]
    acc = jax.lax.dot_general(x_q, w.qvalue, (((1,), (1,)), ((), ())),
                              preferred_element_type=jnp.float32)  # [M, N]
    xs = x_scale[:, None] if x_scale.ndim == 1 else x_scale
    return acc * xs * w.scale  # scale: [] or [N]
