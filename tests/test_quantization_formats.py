"""Checkpoint converters and quantizers against float64 numpy oracles (CPU).

Each published layout is written by an independent packer (tests/quant_oracle.py, from the
tools' own descriptions) from random codes, zeros and scales; the converter's QuantizedWeight
must dequantize to exactly (q - z) * s (int4) or to codes * scales (fp8), and hold exactly those
scales and zeros. Online FP8 quantization is checked code by code against round-to-nearest-even
on the e4m3 grid, with the scales against amax / 448 in float64.
"""

import ml_dtypes
import numpy as np
import pytest

import jax.numpy as jnp

from pagedjax.quantization import (QuantConfig, convert_checkpoint_linear, dequantize, from_awq, from_fp8, from_gptq,
                                   quantize_fp8)
from pagedjax.quantization.weight import pack_int4_tiles, unpack_int4_tiles
from tests.quant_oracle import awq_pack, check_e4m3_codes, gptq_pack_qweight, gptq_pack_qzeros

SEED = 20261204


def rng_for(*key):
    seed = hash((SEED, *key)) % 2**32
    return np.random.default_rng(seed), seed


def int4_truth(rng, K, N, gs, zlo=0, zhi=15):
    G = K // gs
    q = rng.integers(0, 16, (K, N)).astype(np.uint8)  # [K, N]
    z = rng.integers(zlo, zhi + 1, (G, N)).astype(np.uint8)  # [G, N]
    s = (rng.uniform(0.002, 0.05, (G, N)) * rng.choice([1, 3, 7], (G, N))).astype(np.float16)  # [G, N]
    w = (q.astype(np.float64) - np.repeat(z, gs, axis=0)) * np.repeat(s.astype(np.float64), gs, axis=0)  # [K, N]
    return q, z, s, w


def check_int4(w, q_truth, z, s, w_truth, seed):
    """Codes, zeros and scales as stored (q_truth [K, N] in the weight's row order), and the
    dequantized weight against w_truth [K, N] (in the input channels' order)."""
    np.testing.assert_array_equal(np.asarray(w.zero), z, err_msg=f"zeros (seed {seed})")
    np.testing.assert_array_equal(np.asarray(w.scale), s, err_msg=f"scales (seed {seed})")
    np.testing.assert_array_equal(np.asarray(unpack_int4_tiles(jnp.asarray(w.qvalue))), q_truth.T,
                                  err_msg=f"codes (seed {seed})")
    # (q - z) * s is exact in float32 for f16 scales
    np.testing.assert_array_equal(np.asarray(dequantize(w), np.float64), w_truth.T, err_msg=f"dequantized (seed {seed})")


@pytest.mark.parametrize("K,N,gs", [(128, 64, 64), (256, 48, 128), (192, 32, -1)])
def test_awq_gemm_layout(K, N, gs):
    rng, seed = rng_for("awq", K, N, gs)
    q, z, s, w_truth = int4_truth(rng, K, N, K if gs == -1 else gs)
    w = from_awq(awq_pack(q), awq_pack(z), s, gs)
    assert (w.kind, w.in_features, w.out_features, w.group_size) == ("int4", K, N, K if gs == -1 else gs)
    check_int4(w, q, z, s, w_truth, seed)


@pytest.mark.parametrize("K,N,gs,v1", [(128, 64, 64, True), (256, 48, 128, True), (256, 32, 128, False),
                                       (192, 16, -1, True)])
def test_gptq_layout_and_zero_offset(K, N, gs, v1):
    rng, seed = rng_for("gptq", K, N, gs, v1)
    gsz = K if gs == -1 else gs
    # v1 stores zero - 1: true zeros 1..16 (16 does occur: stored 15); v2 stores 0..15 as is
    q, z, s, w_truth = int4_truth(rng, K, N, gsz, *((1, 16) if v1 else (0, 15)))
    g_idx = (np.arange(K) // gsz).astype(np.int32)
    w = from_gptq(gptq_pack_qweight(q), gptq_pack_qzeros(z, v1), s, gs, g_idx=g_idx, zero_offset=1 if v1 else 0)
    check_int4(w, q, z, s, w_truth, seed)
    cfg = QuantConfig.from_hf({"quantization_config": {
        "quant_method": "gptq", "bits": 4, "group_size": gs, "desc_act": False, "sym": False,
        "checkpoint_format": "gptq" if v1 else "gptq_v2"}})
    w2 = convert_checkpoint_linear(cfg, {"qweight": gptq_pack_qweight(q), "qzeros": gptq_pack_qzeros(z, v1),
                                         "scales": s, "g_idx": g_idx})
    np.testing.assert_array_equal(np.asarray(w2.zero), z)


def test_gptq_symmetric_zero_is_eight():
    """sym=True v1 checkpoints store 7 in every zero nibble (0x77777777): the zero point is 8."""
    K, N, gs = 128, 32, 64
    qzeros = np.full((K // gs, N // 8), 0x77777777, np.int32)
    rng, _ = rng_for("sym")
    q = rng.integers(0, 16, (K, N)).astype(np.uint8)
    w = from_gptq(gptq_pack_qweight(q), qzeros, np.ones((K // gs, N), np.float16), gs)
    assert (np.asarray(w.zero) == 8).all()
    np.testing.assert_array_equal(np.asarray(dequantize(w)), (q.astype(np.float32) - 8).T)


def test_gptq_act_order_g_idx_raises_without_desc_act():
    K, N, gs = 128, 16, 64
    g_idx = np.random.default_rng(0).permutation(np.arange(K) // gs).astype(np.int32)
    with pytest.raises(ValueError, match="desc_act"):
        from_gptq(np.zeros((K // 8, N), np.int32), np.zeros((2, N // 8), np.int32), np.ones((2, N), np.float16),
                  gs, g_idx=g_idx)


@pytest.mark.parametrize("K,N,gs", [(128, 32, 64), (256, 48, 32)])
def test_gptq_act_order(K, N, gs):
    """desc_act: row k's group is g_idx[k] (a permutation's rank // gs): the weight holds its rows
    sorted by group (perm: each row's input channel, g_idx[perm] ascending, each group's channels
    in their own order) and dequantizes each input channel with its own group's zero and scale; an
    out-of-range g_idx, groups of unequal sizes and a missing g_idx are errors."""
    rng, seed = rng_for("gptq-act-order", K, N, gs)
    G = K // gs
    g_idx = np.empty(K, np.int32)
    g_idx[rng.permutation(K)] = np.arange(K) // gs  # GPTQ: g_idx[perm[j]] = j // gs
    q = rng.integers(0, 16, (K, N)).astype(np.uint8)
    z = rng.integers(1, 17, (G, N)).astype(np.uint8)
    s = rng.uniform(0.002, 0.05, (G, N)).astype(np.float16)
    w_truth = (q.astype(np.float64) - z[g_idx].astype(np.float64)) * s[g_idx].astype(np.float64)  # [K, N]
    cfg = QuantConfig.from_hf({"quantization_config": {
        "quant_method": "gptq", "bits": 4, "group_size": gs, "desc_act": True, "sym": False}})
    assert cfg.act_order
    tensors = {"qweight": gptq_pack_qweight(q), "qzeros": gptq_pack_qzeros(z, True), "scales": s, "g_idx": g_idx}
    w = convert_checkpoint_linear(cfg, tensors)
    perm = np.asarray(w.perm)
    assert w.act_order and perm.dtype == np.int32
    want_perm = np.concatenate([np.flatnonzero(g_idx == g) for g in range(G)])  # by group, then channel
    np.testing.assert_array_equal(perm, want_perm)
    assert not np.array_equal(perm, np.arange(K))
    check_int4(w, q[perm], z, s, w_truth, seed)
    with pytest.raises(ValueError, match="g_idx"):
        convert_checkpoint_linear(cfg, {**tensors, "g_idx": np.where(g_idx == 0, G, g_idx).astype(np.int32)})
    with pytest.raises(ValueError, match="input channels"):
        convert_checkpoint_linear(cfg, {**tensors, "g_idx": np.where(g_idx == 1, 0, g_idx).astype(np.int32)})
    with pytest.raises(ValueError, match="lacks g_idx"):
        convert_checkpoint_linear(cfg, {k: v for k, v in tensors.items() if k != "g_idx"})
def test_int4_tile_layout_matches_its_documented_formula():
    """qvalue[nt, kt, lane, s] nibble b = 4h + 2c + r holds q[n, k], n = 16 nt + 8 r + lane // 4,
    k = 64 kt + 16 (lane % 4) + 4 s + 2 c + h (weight.py): checked element by element."""
    rng, seed = rng_for("tiles")
    N, K = 32, 128
    q = rng.integers(0, 16, (N, K))
    packed = pack_int4_tiles(q).view(np.uint32)
    assert packed.shape == (2, 2, 32, 4)
    for nt, kt, lane, s, b in np.ndindex(2, 2, 32, 4, 8):
        h, c, r = b // 4, (b // 2) % 2, b % 2
        n, k = 16 * nt + 8 * r + lane // 4, 64 * kt + 16 * (lane % 4) + 4 * s + 2 * c + h
        assert (packed[nt, kt, lane, s] >> (4 * b)) & 0xF == q[n, k], (nt, kt, lane, s, b, seed)


def test_int4_bad_shapes_raise():
    with pytest.raises(ValueError, match="in_features % 64"):
        from_awq(np.zeros((96, 4), np.int32), np.zeros((3, 4), np.int32), np.ones((3, 32), np.float16), 32)
    with pytest.raises(ValueError, match="awq scales"):
        from_awq(np.zeros((128, 4), np.int32), np.zeros((1, 4), np.int32), np.ones((1, 16), np.float16), 128)


# --- fp8 -----------------------------------------------------------------------------------


def random_e4m3(rng, shape):
    codes = rng.integers(0, 256, shape).astype(np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x3C  # no NaN codes
    return codes.view(ml_dtypes.float8_e4m3fn)


@pytest.mark.parametrize("scale_shape", ["tensor", "tensor_1", "channel_n1", "channel_n"])
def test_compressed_tensors_fp8(scale_shape):
    """llm-compressor's float-quantized layout (compressed_tensors.quantization): `weight` e4m3
    [out, in], `weight_scale` [1] per tensor or [out, 1] per channel; w = weight * weight_scale."""
    rng, seed = rng_for("ct", scale_shape)
    N, K = 48, 96
    weight = random_e4m3(rng, (N, K))
    shape = {"tensor": (), "tensor_1": (1,), "channel_n1": (N, 1), "channel_n": (N,)}[scale_shape]
    scale = rng.uniform(1e-3, 1e-1, shape).astype(np.float32)
    strategy = "tensor" if scale_shape.startswith("tensor") else "channel"
    w = from_fp8(weight, scale, strategy=strategy)
    want = weight.astype(np.float64) * (scale.reshape(-1, 1) if strategy == "channel" else scale.reshape(()))
    np.testing.assert_allclose(np.asarray(dequantize(w), np.float64), want, rtol=2**-23, err_msg=f"seed {seed}")
    assert w.scale.shape == ({"tensor": (), "channel": (N,)}[strategy])


def test_hf_fine_grained_fp8_blocks_and_static_input_scale():
    """transformers' fine-grained FP8 (integrations/finegrained_fp8.py, DeepSeek-V3's layout):
    `weight_scale_inv` [ceil(out/128), ceil(in/128)] multiplies its block, despite the name; the
    serialized per-tensor format (AutoFP8 / vLLM) has `weight_scale` and a static `input_scale`."""
    rng, seed = rng_for("hf-fp8")
    N, K, (bn, bk) = 200, 320, (128, 128)  # partial blocks on both axes
    weight = random_e4m3(rng, (N, K))
    scale_inv = rng.uniform(1e-3, 1e-1, (2, 3)).astype(np.float32)
    cfg = QuantConfig.from_hf({"quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic",
                                                       "weight_block_size": [bn, bk]}})
    w = convert_checkpoint_linear(cfg, {"weight": weight, "weight_scale_inv": scale_inv})
    n, k = np.arange(N)[:, None], np.arange(K)[None, :]
    want = weight.astype(np.float64) * scale_inv[n // bn, k // bk]  # weight_scale_inv multiplies
    np.testing.assert_allclose(np.asarray(dequantize(w), np.float64), want, rtol=2**-23, err_msg=f"seed {seed}")
    np.testing.assert_array_equal(np.asarray(w.scale), scale_inv)
    assert (w.block_size, w.activation) == ((128, 128), "group")
    static = QuantConfig.from_hf({"quantization_config": {"quant_method": "fp8", "activation_scheme": "static"}})
    w = convert_checkpoint_linear(static, {"weight": weight, "weight_scale": np.float32([0.5]),
                                           "input_scale": np.float32([0.25])})
    assert float(w.input_scale) == 0.25 and w.activation == "static"
    with pytest.raises(ValueError, match="lacks"):
        convert_checkpoint_linear(static, {"weight": weight, "weight_scale": np.float32([0.5])})


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16])
@pytest.mark.parametrize("strategy,block", [("channel", None), ("tensor", None), ("block", (16, 32))])
def test_online_fp8_quantization_rounds_to_nearest_even(dtype, strategy, block):
    rng, seed = rng_for("online", np.dtype(dtype).name, strategy)
    N, K = 40, 72
    w = (rng.standard_normal((N, K)) * rng.uniform(0.01, 3, (N, 1))).astype(dtype)
    w[3] = 0  # an all-zero channel stays finite
    qw = quantize_fp8(w, strategy=strategy, block_size=block)
    w64 = w.astype(np.float64)
    a = np.abs(w64)
    if strategy == "channel":
        amax = a.max(axis=1)
    elif strategy == "tensor":
        amax = a.max()
    else:
        NB, KB = -(-N // block[0]), -(-K // block[1])
        amax = np.zeros((NB, KB))
        for i, j in np.ndindex(NB, KB):
            amax[i, j] = a[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]].max()
    want_scale = np.maximum(amax / 448.0, 1e-12)
    np.testing.assert_allclose(np.asarray(qw.scale, np.float64), want_scale, rtol=1e-6, err_msg=f"scales, seed {seed}")
    ours = np.asarray(qw.scale, np.float64)
    ours_full = ours if strategy == "tensor" else (ours[:, None] if strategy == "channel" else
                                                  np.repeat(np.repeat(ours, block[0], 0)[:N], block[1], 1)[:, :K])
    check_e4m3_codes(np.asarray(qw.qvalue), w64 / ours_full, f"weight codes (seed {seed})")
    assert np.abs(np.asarray(qw.qvalue, np.float64)).max() <= 448
    assert np.isfinite(np.asarray(dequantize(qw))).all()


def test_fp8_saturates_instead_of_nan():
    """A static input scale smaller than amax / 448 clips to +-448 (a plain cast gives NaN)."""
    from pagedjax.quantization.fp8 import to_e4m3

    x = jnp.asarray([[1000.0, -1000.0, 449.0, 464.0, 0.3]], jnp.float32)
    got = np.asarray(to_e4m3(x, jnp.float32(1.0)), np.float64)
    np.testing.assert_array_equal(got, [[448, -448, 448, 448, 0.3125]])
