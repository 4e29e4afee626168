"""QuantizedWeight: one linear layer's quantized weight as a pytree of (values, scales[, zeros]).

Dims: K in_features (contracted), N out_features, G = K / group_size groups (int4),
NB = ceil(N / block_n), KB = ceil(K / block_k) (fp8 blocks).

The arrays are plain pytree leaves (jit, donate, shard them like any param); the layout
description (kind, K, N, block, group size, activation scheme) is static aux data.

fp8 (e4m3fn, W8A8; W8A16 with activation "none"), dequantized w[n, k] = qvalue[n, k] * scale[...]:
  qvalue       [N, K] float8_e4m3fn  K contiguous: HF's nn.Linear [out, in] as stored, and the
                                      K-major ("TN") operand cuBLASLt's FP8 GEMM wants
  scale        [] f32 ("tensor") | [N] f32 ("channel") | [NB, KB] f32 ("block": 128x128 in HF's
               fine-grained FP8, whose `weight_scale_inv` is this multiplier despite its name)
  input_scale  [] f32 for static activations, else None (dynamic: computed per call)
int4 (W4A16, asymmetric, group-wise), dequantized w[n, k] = (q[n, k] - zero[g, n]) * scale[g, n]
with g = k // group_size (act-order GPTQ checkpoints, desc_act: k counts the rows in `perm`'s order):
  qvalue  [N/16, K/64, 32, 4] int32: the codes q in [0, 15], tiled for the CUDA kernel's mma
          fragments (vLLM repacks to Marlin's tiles at load time for the same reason). The int32
          qvalue[nt, kt, lane, s] holds at bits 4b..4b+3, b = 4h + 2c + r, the code of
              n = 16 nt + 8 r + lane // 4,   k = 64 kt + 16 (lane % 4) + 4 s + 2 c + h
          so one 16-byte load per lane feeds four m16n8k16 steps (see xla_kernels/quant_int4_gemm.cu).
          Tiles are whole in N and K: a shard of N (multiple of 16) or of K (multiple of 64) is a
          contiguous slice of this array.
  scale   [G, N] f16 | bf16 | f32 (the checkpoint's dtype)
  zero    [G, N] uint8, 0..16 (GPTQ v1 checkpoints store zero - 1, so 16 can occur)
  perm    [K] int32, act-order only (else None): the input channel of each of the weight's K rows.
          GPTQ's g_idx scatters a group's channels over K; the rows are stored sorted by group
          (perm = argsort(g_idx), as vLLM's Marlin path sorts them), so every group is contiguous
          as without act order, the int4 kernel applies, and the matmul reads x's columns in
          perm's order: y = x[:, perm] @ w.T. A shard along K takes its slice of perm, and x whole.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

INT4_TILE_N, INT4_TILE_K = 16, 64


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["qvalue", "scale", "zero", "input_scale", "perm"],
                   meta_fields=["kind", "in_features", "out_features", "block_size", "group_size", "activation"])
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A quantized linear weight (layouts in the module docstring); y = x @ dequantize(w).T."""

    qvalue: jax.Array
    scale: jax.Array
    zero: jax.Array | None
    input_scale: jax.Array | None
    kind: str  # "fp8" | "int4"
    in_features: int  # K
    out_features: int  # N
    block_size: tuple[int, int] | None = None  # fp8 block weights: (block_n, block_k)
    group_size: int = 0  # int4: K per group (the whole K for one group)
    activation: str = "none"  # fp8: "token" | "group" | "static" | "none" (weight-only); int4: "none"
    perm: jax.Array | None = None  # int4 act-order: [K] int32, the input channel of each row

    @property
    def act_order(self) -> bool:
        return self.perm is not None

    @property
    def weight_strategy(self) -> str:
        """"tensor", "channel" or "block" for fp8, "group" for int4."""
        if self.kind == "int4":
            return "group"
        if self.block_size is not None:
            return "block"
        return "tensor" if self.scale.ndim == 0 else "channel"

    def check(self) -> QuantizedWeight:
        """Raises ValueError unless every array has the shape and dtype its layout says."""
        K, N = self.in_features, self.out_features
        want = expected_shapes(self.kind, K, N, block_size=self.block_size, group_size=self.group_size,
                               weight_strategy=self.weight_strategy, static_input=self.input_scale is not None,
                               act_order=self.act_order)
        got = {"qvalue": self.qvalue, "scale": self.scale, "zero": self.zero, "input_scale": self.input_scale,
               "perm": self.perm}
        for name, (shape, dtypes) in want.items():
            a = got[name]
            if a is None:
                raise ValueError(f"{self.kind} weight [{N}, {K}]: missing {name}")
            if tuple(a.shape) != shape or jnp.dtype(a.dtype) not in [jnp.dtype(d) for d in dtypes]:
                raise ValueError(f"{self.kind} weight [{N}, {K}]: {name} is {jnp.dtype(a.dtype).name}{list(a.shape)}, "
                                 f"expected {'/'.join(jnp.dtype(d).name for d in dtypes)}{list(shape)}")
        extra = [n for n, a in got.items() if a is not None and n not in want]
        if extra:
            raise ValueError(f"{self.kind} weight [{N}, {K}]: unexpected {extra}")
        if self.kind == "fp8" and self.activation not in ("token", "group", "static", "none"):
            raise ValueError(f"fp8 weight: unknown activation scheme {self.activation!r}")
        if self.kind == "fp8" and self.activation == "none" and self.block_size is not None:
            raise ValueError("fp8 weight: weight-only (activation 'none') takes per-tensor or per-channel scales")
        if (self.activation == "static") != (self.input_scale is not None):
            raise ValueError("fp8 weight: a static activation scheme needs input_scale, and only it")
        if self.activation == "group" and self.block_size is None:
            raise ValueError("fp8 weight: per-group activation scales go with block weights")
        return self

    def params(self) -> dict[str, jax.Array]:
        """The arrays as a flat dict of params ({"qvalue", "scale"[, "zero"][, "input_scale"][, "perm"]})."""
        d = {"qvalue": self.qvalue, "scale": self.scale, "zero": self.zero, "input_scale": self.input_scale,
             "perm": self.perm}
        return {k: v for k, v in d.items() if v is not None}

    @property
    def nbytes(self) -> int:
        """Bytes of all arrays (what a matmul reads from memory)."""
        return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in self.params().values())


def expected_shapes(kind: str, in_features: int, out_features: int, *, weight_strategy: str,
                    block_size: tuple[int, int] | None = None, group_size: int = 0,
                    static_input: bool = False,
                    act_order: bool = False) -> dict[str, tuple[tuple[int, ...], tuple[Any, ...]]]:
    """{param name: (shape, allowed dtypes)} of a quantized linear: what a layer declares as params.

    int4 act_order adds perm [K] (its rows sorted by group: the groups as without act order).
    """
    K, N = in_features, out_features
    if kind == "fp8":
        if weight_strategy == "block":
            bn, bk = block_size
            scale_shape = (-(-N // bn), -(-K // bk))
        else:
            scale_shape = {"tensor": (), "channel": (N,)}[weight_strategy]
        out = {"qvalue": ((N, K), (jnp.float8_e4m3fn,)), "scale": (scale_shape, (jnp.float32,))}
        if static_input:
            out["input_scale"] = ((), (jnp.float32,))
        return out
    if kind == "int4":
        check_int4_shape(K, N, group_size)
        G = K // group_size
        out = {"qvalue": ((N // INT4_TILE_N, K // INT4_TILE_K, 32, 4), (jnp.int32,)),
               "scale": ((G, N), (jnp.float16, jnp.bfloat16, jnp.float32)),
               "zero": ((G, N), (jnp.uint8,))}
        if act_order:
            out["perm"] = ((K,), (jnp.int32,))
        return out
    raise ValueError(f"unknown quantized weight kind {kind!r}")


def logical_axes(kind: str, out_axis: str | None, in_axis: str | None, *,
                 weight_strategy: str = "channel", static_input: bool = False,
                 act_order: bool = False) -> dict[str, tuple[str | None, ...]]:
    """{param name: logical axis names} for sharding a quantized linear by pagedjax.parallel's rules.

    out_axis / in_axis name the linear's N and K as its bf16 kernel does (q_proj: out "heads", in
    "embed"; o_proj: out "embed", in "heads"; gate/up: "mlp" / "embed"; down: "embed" / "mlp").
    A shard must hold whole int4 tiles (N % 16, K % 64), whole groups, and whole fp8 blocks; an
    act-order int4 weight's shard of K takes its slice of perm (its rows' input channels).
    """
    if kind == "fp8":
        scale = {"tensor": (), "channel": (out_axis,), "block": (out_axis, in_axis)}[weight_strategy]
        out = {"qvalue": (out_axis, in_axis), "scale": scale}
        if static_input:
            out["input_scale"] = ()
        return out
    if kind == "int4":
        out = {"qvalue": (out_axis, in_axis, None, None), "scale": (in_axis, out_axis), "zero": (in_axis, out_axis)}
        if act_order:
            out["perm"] = (in_axis,)
        return out
    raise ValueError(f"unknown quantized weight kind {kind!r}")


def linear_features(kind: str, qvalue_shape: tuple[int, ...]) -> tuple[int, int]:
    """(in_features K, out_features N) of a linear from the shape of its qvalue."""
    if kind == "fp8":
        N, K = qvalue_shape
        return K, N
    if kind == "int4":
        return qvalue_shape[1] * INT4_TILE_K, qvalue_shape[0] * INT4_TILE_N
    raise ValueError(f"unknown quantized weight kind {kind!r}")


# --- int4: the tiled layout -----------------------------------------------------------------


def check_int4_shape(in_features: int, out_features: int, group_size: int) -> None:
    """Raises unless [N, K] tiles into 16 x 64 tiles and K splits into whole groups."""
    K, N = in_features, out_features
    if N % INT4_TILE_N or K % INT4_TILE_K:
        raise ValueError(f"int4 weights need out_features % {INT4_TILE_N} == 0 and in_features % {INT4_TILE_K} == 0, "
                         f"got [out={N}, in={K}]")
    if group_size <= 0 or K % group_size:
        raise ValueError(f"int4 group_size {group_size} does not divide in_features {K}")


# nibble b = 4h + 2c + r of qvalue[nt, kt, lane = 4g + t, s] holds q[n, k] with
# n = 16 nt + 8 r + g and k = 64 kt + 16 t + 4 s + 2 c + h; as axes of a [NT, KT, g, t, s, h, c, r]
# array, N gathers (nt, r, g) and K gathers (kt, t, s, c, h).
_TILED_TO_NK = (0, 7, 2, 1, 3, 4, 6, 5)  # [NT, KT, g, t, s, h, c, r] -> [NT, r, g, KT, t, s, c, h]
_NK_TO_TILED = tuple(int(i) for i in np.argsort(_TILED_TO_NK))


def pack_int4_tiles(q: np.ndarray) -> np.ndarray:
    """Codes q [N, K] (ints in [0, 15]) -> qvalue [N/16, K/64, 32, 4] int32 (host, load time)."""
    q = np.asarray(q)
    N, K = q.shape
    check_int4_shape(K, N, K)
    if q.size and (q.min() < 0 or q.max() > 15):
        raise ValueError(f"int4 codes must lie in [0, 15], got [{q.min()}, {q.max()}]")
    t = q.astype(np.uint32).reshape(N // 16, 2, 8, K // 64, 4, 4, 2, 2)  # [NT, r, g, KT, t, s, c, h]
    t = t.transpose(_NK_TO_TILED).reshape(N // 16, K // 64, 32, 4, 8)  # [NT, KT, lane, s, b]
    words = np.bitwise_or.reduce(t << (4 * np.arange(8, dtype=np.uint32)), axis=-1)  # [NT, KT, 32, 4]
    return np.ascontiguousarray(words).view(np.int32)


def pack_int4_tiles_jax(q: jax.Array) -> jax.Array:
    """pack_int4_tiles in jnp, inside jit on any device: codes q [N, K] in [0, 15] -> [N/16, K/64, 32, 4] int32."""
    N, K = q.shape
    check_int4_shape(K, N, K)
    t = q.astype(jnp.uint32).reshape(N // 16, 2, 8, K // 64, 4, 4, 2, 2)  # [NT, r, g, KT, t, s, c, h]
    t = t.transpose(_NK_TO_TILED).reshape(N // 16, K // 64, 32, 4, 8)  # [NT, KT, lane, s, b]
    words = jnp.sum(t << (4 * jnp.arange(8, dtype=jnp.uint32)), axis=-1, dtype=jnp.uint32)  # disjoint bits: sum = or
    return jax.lax.bitcast_convert_type(words, jnp.int32)  # [NT, KT, 32, 4]


def unpack_int4_tiles(qvalue: jax.Array) -> jax.Array:
    """qvalue [N/16, K/64, 32, 4] int32 -> codes [N, K] uint8 (jnp: runs inside jit, on any backend)."""
    NT, KT = qvalue.shape[:2]
    words = jax.lax.bitcast_convert_type(qvalue, jnp.uint32)
    nib = (words[..., None] >> (4 * jnp.arange(8, dtype=jnp.uint32))) & 0xF  # [NT, KT, 32, 4, 8]
    nib = nib.astype(jnp.uint8).reshape(NT, KT, 8, 4, 4, 2, 2, 2)  # [NT, KT, g, t, s, h, c, r]
    return nib.transpose(_TILED_TO_NK).reshape(NT * 16, KT * 64)  # [N, K]
