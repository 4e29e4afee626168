"""Checkpoint tensors of one linear layer -> QuantizedWeight, for each published layout (or, for
int4 MoE experts, which are stacked rather than tiled, the unpacked codes, zeros and scales, and
an act-order permutation: checkpoint_int4).

Dims: K in_features, N out_features, G = K / group_size groups, NB x KB fp8 blocks.
Everything here runs on the host (numpy) at load time; the results hold numpy arrays, to be put
on devices or straight into their shards by the loader.

Layouts read (the sources they are taken from):
  AutoAWQ GEMM (awq/modules/linear/gemm.py, WQLinear_GEMM.from_linear; vLLM's AWQ_REVERSE_ORDER):
    qweight [K, N/8] int32  nibble i (bits 4i..4i+3) of column c holds out-column 8c + [0,2,4,6,1,3,5,7][i]
    qzeros  [G, N/8] int32  packed the same way;  scales [G, N] f16;  w = (q - z) * s
  GPTQ (AutoGPTQ nn_modules/qlinear/qlinear_cuda_old.py QuantLinear.pack; GPTQModel for v2):
    qweight [K/8, N] int32  nibble j of row r holds in-row 8r + j (packed along K)
    qzeros  [G, N/8] int32  nibble j of column c holds out-column 8c + j; the v1 format ("gptq")
                            stores zero - 1 (pack does `zeros -= 1`, the kernels add 1 back),
                            "gptq_v2" stores the zero itself
    scales  [G, N] f16;  g_idx [K] int32, the group of each input row: k // group_size, or with
                            act-order (desc_act) the row's rank in GPTQ's quantization order
                            (columns by descending Hessian diagonal) // group_size;  w = (q - z[g_idx]) * s[g_idx]
  HF fine-grained FP8 (transformers integrations/finegrained_fp8.py, DeepSeek-V3's layout):
    weight [N, K] float8_e4m3fn;  weight_scale_inv [ceil(N/bn), ceil(K/bk)] f32, a multiplier:
    w = weight * weight_scale_inv[n // bn, k // bk]
  FP8 without blocks (quant_method "fp8", AutoFP8 / vLLM serialized): weight [N, K] e4m3,
    weight_scale [] or [1] f32, input_scale [] or [1] f32 when activations are static
  compressed-tensors float-quantized (llm-compressor; compressed_tensors/quantization):
    weight [N, K] e4m3;  weight_scale [1] (tensor) | [N, 1] (channel) | [NB, KB] (block) f32/bf16/f16;
    input_scale [1] when activations are static;  w = weight * weight_scale
"""

from __future__ import annotations

from collections.abc import Mapping

import ml_dtypes
import numpy as np

from pagedjax.quantization.config import QuantConfig
from pagedjax.quantization.int4 import group_order, int4_weight
from pagedjax.quantization.weight import QuantizedWeight

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i holds column 8c + AWQ_ORDER[i]


def convert_checkpoint_linear(config: QuantConfig, tensors: Mapping[str, np.ndarray]) -> QuantizedWeight:
    """One linear's checkpoint tensors {suffix: array} (suffixes from config.tensor_names()) -> ours."""
    fmt = config.checkpoint_format
    missing = [n for n in config.tensor_names() if n not in tensors and n not in ("g_idx",)]
    if missing:
        raise ValueError(f"{config.method} linear: checkpoint lacks {missing} (has {sorted(tensors)})")
    extra = sorted(set(tensors) - set(config.tensor_names()))
    if extra:
        raise ValueError(f"{config.method} linear: unexpected tensors {extra} for {fmt} checkpoints")
    if fmt == "awq":
        return from_awq(tensors["qweight"], tensors["qzeros"], tensors["scales"], config.group_size)
    if fmt in ("gptq", "gptq_v2"):
        return from_gptq(tensors["qweight"], tensors["qzeros"], tensors["scales"], config.group_size,
                         g_idx=tensors.get("g_idx"), zero_offset=1 if fmt == "gptq" else 0,
                         act_order=config.act_order)
    if fmt == "online":
        from pagedjax.quantization.fp8 import quantize_fp8  # jnp: runs on the default device

        w = quantize_fp8(np.asarray(tensors["weight"]), strategy=config.weight_strategy, block_size=config.block_size,
                         activation=config.activation)
        return QuantizedWeight(*(np.asarray(a) if a is not None else None
                                 for a in (w.qvalue, w.scale, w.zero, w.input_scale)),
                               "fp8", w.in_features, w.out_features, w.block_size, w.group_size, w.activation)
    scale = tensors["weight_scale_inv" if "weight_scale_inv" in tensors else "weight_scale"]
    return from_fp8(tensors["weight"], scale, tensors.get("input_scale"), strategy=config.weight_strategy,
                    block_size=config.block_size, activation=config.activation)


# --- int4 ----------------------------------------------------------------------------------


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """int32 [..., C] -> the 8 nibbles of each word [..., C, 8], nibble i = bits 4i..4i+3."""
    words = np.ascontiguousarray(packed).view(np.uint32)
    return ((words[..., None] >> (4 * np.arange(8, dtype=np.uint32))) & 0xF).astype(np.uint8)


def _check(name: str, a: np.ndarray, shape: tuple[int, ...], dtypes: tuple) -> np.ndarray:
    a = np.asarray(a)
    if a.shape != shape or a.dtype not in [np.dtype(d) for d in dtypes]:
        raise ValueError(f"{name} is {a.dtype}{list(a.shape)}, expected {'/'.join(np.dtype(d).name for d in dtypes)}"
                         f"{list(shape)}")
    return a


def _groups(K: int, group_size: int) -> tuple[int, int]:
    gs = K if group_size == -1 else group_size
    if gs <= 0 or K % gs:
        raise ValueError(f"group_size {group_size} does not divide in_features {K}")
    return gs, K // gs


_SCALES = (np.float16, ml_dtypes.bfloat16, np.float32)


def from_awq(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, group_size: int) -> QuantizedWeight:
    """AutoAWQ GEMM tensors (qweight [K, N/8], qzeros [G, N/8], scales [G, N]) -> QuantizedWeight."""
    return int4_weight(*unpack_awq(qweight, qzeros, scales, group_size))


def unpack_awq(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray,
               group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """AutoAWQ GEMM tensors -> (codes [K, N] uint8, zeros [G, N] uint8, scales [G, N], group size)."""
    qweight = np.asarray(qweight)
    if qweight.ndim != 2:
        raise ValueError(f"awq qweight must be [in, out/8], got shape {qweight.shape}")
    K, N = qweight.shape[0], qweight.shape[1] * 8
    gs, G = _groups(K, group_size)
    _check("awq qweight", qweight, (K, N // 8), (np.int32,))
    qzeros = _check("awq qzeros", qzeros, (G, N // 8), (np.int32,))
    scales = _check("awq scales", scales, (G, N), _SCALES)
    inverse = np.argsort(AWQ_ORDER)  # column 8c + j sits in nibble inverse[j]
    q = _nibbles(qweight)[..., inverse].reshape(K, N)  # [K, N]
    z = _nibbles(qzeros)[..., inverse].reshape(G, N)  # [G, N]
    return q, z, scales, gs


def from_gptq(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, group_size: int, *,
              g_idx: np.ndarray | None = None, zero_offset: int = 1, act_order: bool = False) -> QuantizedWeight:
    """GPTQ tensors (qweight [K/8, N], qzeros [G, N/8], scales [G, N], g_idx [K]) -> QuantizedWeight.

    zero_offset: 1 for the v1 "gptq" format (stored zero = zero - 1), 0 for "gptq_v2".
    act_order (desc_act checkpoints): g_idx is required; the weight's rows are sorted by it (int4_weight).
    """
    q, z, s, gs = unpack_gptq(qweight, qzeros, scales, group_size, g_idx=g_idx, zero_offset=zero_offset,
                              act_order=act_order)
    return int4_weight(q, z, s, gs, g_idx=g_idx if act_order else None)


def unpack_gptq(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, group_size: int, *,
                g_idx: np.ndarray | None = None, zero_offset: int = 1,
                act_order: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """GPTQ tensors -> (codes [K, N] uint8, zeros [G, N] uint8 in [0, 16], scales [G, N], group size);
    g_idx is checked (k // group_size unless act_order) and not applied."""
    qweight = np.asarray(qweight)
    if qweight.ndim != 2:
        raise ValueError(f"gptq qweight must be [in/8, out], got shape {qweight.shape}")
    K, N = qweight.shape[0] * 8, qweight.shape[1]
    gs, G = _groups(K, group_size)
    _check("gptq qweight", qweight, (K // 8, N), (np.int32,))
    qzeros = _check("gptq qzeros", qzeros, (G, N // 8), (np.int32,))
    scales = _check("gptq scales", scales, (G, N), _SCALES)
    if g_idx is not None:
        g_idx = _check("gptq g_idx", g_idx, (K,), (np.int32, np.int64))
        if not act_order and not np.array_equal(g_idx, np.arange(K) // gs):
            raise ValueError("gptq g_idx is not k // group_size, and the quantization_config does not say desc_act")
    elif act_order:
        raise ValueError("gptq act-order (desc_act) linear: checkpoint lacks g_idx")
    q = _nibbles(qweight.T).reshape(N, K).T  # [K, N]: word row r, nibble j -> in-row 8r + j
    z = _nibbles(qzeros).reshape(G, N) + np.uint8(zero_offset)  # [G, N]
    return q, z, scales, gs


def checkpoint_int4(config: QuantConfig, tensors: Mapping[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    """One int4 linear's AWQ / GPTQ tensors {suffix: array} -> its own codes [K, N], zeros [G, N]
    (uint8; GPTQ v1's stored zero - 1 put back) and scales [G, N], unpacked and otherwise as saved;
    with act order (GPTQ desc_act) the codes' rows sorted by group and, fourth, perm [K] int32
    (group_order: stored row j is input row perm[j]), as int4_weight stores a dense linear."""
    if config.weight_dtype != "int4":
        raise ValueError(f"{config.method}: unpacked int4 codes need an int4 checkpoint")
    missing = [n for n in config.tensor_names() if n not in tensors and n != "g_idx"]
    if missing:
        raise ValueError(f"{config.method} linear: checkpoint lacks {missing} (has {sorted(tensors)})")
    args = tensors["qweight"], tensors["qzeros"], tensors["scales"], config.group_size
    if config.checkpoint_format == "awq":
        q, z, s, _ = unpack_awq(*args)
    else:
        q, z, s, gs = unpack_gptq(*args, g_idx=tensors.get("g_idx"), act_order=config.act_order,
                                  zero_offset=1 if config.checkpoint_format == "gptq" else 0)
        if config.act_order:
            perm = group_order(tensors["g_idx"], q.shape[0], gs)
            return q[perm], z, s, perm
    return q, z, s


# --- fp8 -----------------------------------------------------------------------------------


def from_fp8(weight: np.ndarray, scale: np.ndarray, input_scale: np.ndarray | None = None, *, strategy: str,
             block_size: tuple[int, int] | None = None, activation: str = "token") -> QuantizedWeight:
    """e4m3 weight [N, K] with its scale (per tensor, per channel [N] or [N, 1], or blocks [NB, KB])."""
    weight = np.asarray(weight)
    if weight.ndim != 2 or weight.dtype != ml_dtypes.float8_e4m3fn:
        raise ValueError(f"fp8 weight must be float8_e4m3fn [out, in], got {weight.dtype}{list(weight.shape)}")
    N, K = weight.shape
    scale = np.asarray(scale)
    if scale.dtype not in [np.dtype(d) for d in _SCALES]:
        raise ValueError(f"fp8 weight_scale must be f32/bf16/f16, got {scale.dtype}")
    if strategy == "tensor":
        if scale.size != 1:
            raise ValueError(f"per-tensor fp8 weight_scale must hold one value, got shape {scale.shape}")
        scale = scale.reshape(())
    elif strategy == "channel":
        if scale.shape not in ((N,), (N, 1)):
            raise ValueError(f"per-channel fp8 weight_scale must be [{N}] or [{N}, 1], got {list(scale.shape)}")
        scale = scale.reshape(N)
    elif strategy == "block":
        bn, bk = block_size
        _check("fp8 block weight_scale", scale, (-(-N // bn), -(-K // bk)), _SCALES)
    else:
        raise ValueError(f"unknown fp8 weight strategy {strategy!r}")
    if input_scale is not None:
        input_scale = np.asarray(input_scale)
        if input_scale.size != 1:
            raise ValueError(f"fp8 input_scale must hold one value (static per-tensor), got shape {input_scale.shape}")
        input_scale = input_scale.astype(np.float32).reshape(())
    if (activation == "static") != (input_scale is not None):
        raise ValueError(f"fp8 activation scheme {activation!r}: input_scale "
                         f"{'missing' if input_scale is None else 'given but not used'}")
    return QuantizedWeight(weight, scale.astype(np.float32), None, input_scale, "fp8", K, N,
                           block_size=tuple(block_size) if strategy == "block" else None, activation=activation).check()
