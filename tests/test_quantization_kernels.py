"""The CUDA custom calls' contracts, checked on the CPU (the kernels themselves run in `gpu` tests).

1. The int4 tile layout is what the kernel's mma fragments need: an emulation of the kernel's
   data flow, with mma.m16n8k16's fragment tables written from the PTX ISA (section "Matrix
   Fragments for mma.m16n8k16 with floating point type"), the per-group scale applied to f32
   sums and split-K partials added last, must reproduce float64 x @ ((q - z) * s).T.
2. The magic-number dequantization is exact: the nibble q OR'd into 128.0 (bf16) / 1024.0 (f16)
   is 128 + q / 1024 + q, and (128 + q) - (128 + z) is q - z, for every q in [0, 15], z in [0, 16].
3. The Python wrappers lower to the custom calls with the operand shapes, dtypes and attributes
   the handlers check (cross-platform lowering for "cuda", no GPU needed), for every scale mode.
"""

import ml_dtypes
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pagedjax.quantization import from_fp8, int4_weight, kernels
from pagedjax.quantization.fp8 import quantize_activation

SEED = 1204


# --- 1. the tile layout feeds the mma fragments --------------------------------------------


def mma_m16n8k16(a, b):
    """PTX mma.m16n8k16.row.col, f32 accumulation: per-lane fragments in, per-lane C out.

    a [32, 8] (a0..a7: registers 0..3 hold (a0,a1), (a2,a3), (a4,a5), (a6,a7)), b [32, 4],
    returns c [32, 4]; groupID = lane / 4, threadID_in_group = lane % 4.
    """
    A, B = np.zeros((16, 16)), np.zeros((16, 8))
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for i in range(8):
            row = g if (i < 2 or 4 <= i < 6) else g + 8
            col = 2 * t + (i & 1) + (8 if i >= 4 else 0)
            A[row, col] = a[lane, i]
        for i in range(4):
            B[2 * t + (i & 1) + (8 if i >= 2 else 0), g] = b[lane, i]
    D = A @ B
    c = np.zeros((32, 4))
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for i in range(4):
            c[lane, i] = D[g + (8 if i >= 2 else 0), 2 * t + (i & 1)]
    return c


def emulate_int4_kernel(x, qvalue, zero, scale, group_size, splits):
    """The kernel's algorithm (xla_kernels/quant_int4_gemm.cu) lane by lane, in float64."""
    M, K = x.shape
    NT, KT = qvalue.shape[:2]
    N = NT * 16
    words = qvalue.view(np.uint32)
    per = -(-KT // splits)
    partial = np.zeros((splits, M, N))
    lanes = np.arange(32)
    g, t = lanes // 4, lanes % 4
    for s_idx in range(splits):
        for nt in range(NT):
            n_lo, n_hi = 16 * nt + g, 16 * nt + g + 8  # columns of registers 0, 2 / 1, 3
            for mt in range(-(-M // 8)):
                total, acc, group = np.zeros((32, 4)), np.zeros((32, 4)), -1
                s_lo = s_hi = None
                for kt in range(s_idx * per, min(KT, (s_idx + 1) * per)):
                    gi = kt * 64 // group_size
                    if gi != group:
                        if group >= 0:
                            total += acc * np.stack([s_lo, s_lo, s_hi, s_hi], 1)
                            acc[:] = 0
                        group = gi
                        s_lo, s_hi = scale[gi, n_lo].astype(np.float64), scale[gi, n_hi].astype(np.float64)
                        z_lo, z_hi = zero[gi, n_lo].astype(np.float64), zero[gi, n_hi].astype(np.float64)
                    m = mt * 8 + g  # B fragments' row of x, per lane
                    xrow = np.where((m < M)[:, None], x[np.minimum(m, M - 1)], 0)  # [32, K]
                    chunk = xrow[lanes[:, None], kt * 64 + 16 * t[:, None] + np.arange(16)]  # [32, 16]
                    for s in range(4):
                        w = words[nt, kt, :, s]
                        a = np.zeros((32, 8))
                        for r in range(4):
                            z = z_hi if r & 1 else z_lo
                            a[:, 2 * r] = ((w >> (4 * r)) & 0xF) - z
                            a[:, 2 * r + 1] = ((w >> (16 + 4 * r)) & 0xF) - z
                        b = chunk[:, 4 * s:4 * s + 4]  # (b0, b1) = word 2s, (b2, b3) = word 2s + 1
                        acc += mma_m16n8k16(a, b)
                if group >= 0:
                    total += acc * np.stack([s_lo, s_lo, s_hi, s_hi], 1)
                for j in range(4):
                    rows = mt * 8 + 2 * t + (j & 1)
                    cols = 16 * nt + g + (8 if j >= 2 else 0)
                    ok = rows < M
                    partial[s_idx, rows[ok], cols[ok]] = total[ok, j]
    return partial.sum(axis=0)


@pytest.mark.parametrize("M,K,N,gs,splits", [(3, 256, 32, 128, 1), (9, 128, 16, 64, 2), (5, 192, 16, 192, 3)])
def test_int4_tiles_feed_the_mma_fragments(M, K, N, gs, splits):
    rng = np.random.default_rng(hash((SEED, M, K, N)) % 2**32)
    q = rng.integers(0, 16, (K, N)).astype(np.uint8)
    z = rng.integers(0, 17, (K // gs, N)).astype(np.uint8)
    s = rng.uniform(0.01, 0.1, (K // gs, N)).astype(np.float16)
    w = int4_weight(q, z, s, gs)
    x = rng.standard_normal((M, K))
    got = emulate_int4_kernel(x, np.asarray(w.qvalue), z, s, gs, splits)
    want = x @ ((q - np.repeat(z, gs, 0).astype(np.float64)) * np.repeat(s.astype(np.float64), gs, 0))
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


# --- 2. the magic-number dequantization is exact --------------------------------------------


@pytest.mark.parametrize("dtype,magic", [(ml_dtypes.bfloat16, 0x4300), (np.float16, 0x6400)])
def test_magic_number_dequantization_is_exact(dtype, magic):
    base = 128.0 if magic == 0x4300 else 1024.0
    q = np.arange(16, dtype=np.uint16)
    z = np.arange(17, dtype=np.uint16)
    qv = (q | magic).view(dtype)
    zv = (z | magic).view(dtype)
    np.testing.assert_array_equal(qv.astype(np.float64), base + q)
    diff = (qv[:, None] - zv[None, :]).astype(np.float64)  # computed in `dtype`
    np.testing.assert_array_equal(diff, q[:, None].astype(np.float64) - z[None, :])


# --- 3. the wrappers lower to what the handlers check ---------------------------------------


@pytest.fixture
def lowering(monkeypatch):
    """Lowers fn(*args) for "cuda" on this CPU machine; returns the custom_call lines."""
    monkeypatch.setattr(kernels._ffi, "require", lambda *a: None)  # CI builds carry no CUDA handlers
    monkeypatch.setattr(kernels, "_num_sms", lambda: 132)

    def lower(fn, *args):
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        return [line for line in text.splitlines() if "stablehlo.custom_call @pagedjax" in line]

    return lower


def random_fp8(rng, N, K, strategy, activation):
    codes = rng.integers(0, 0x7F, (N, K)).astype(np.uint8).view(ml_dtypes.float8_e4m3fn)
    shape = {"tensor": (), "channel": (N,), "block": (-(-N // 128), -(-K // 128))}[strategy]
    return from_fp8(codes, rng.uniform(0.01, 0.1, shape).astype(np.float32),
                    np.float32(0.02) if activation == "static" else None, strategy=strategy,
                    block_size=(128, 128) if strategy == "block" else None, activation=activation)


@pytest.mark.parametrize("strategy,activation,mode,x_scale,w_scale", [
    ("channel", "token", 1, "tensor<5xf32>", "tensor<256xf32>"),
    ("tensor", "token", 1, "tensor<5xf32>", "tensor<256xf32>"),
    ("channel", "static", 1, "tensor<5xf32>", "tensor<256xf32>"),
    ("tensor", "static", 0, "tensor<1xf32>", "tensor<1xf32>"),
    ("block", "group", 2, "tensor<3x16xf32>", "tensor<2x4xf32>"),  # KB = 3 padded to 4, rows to 16
])
def test_fp8_gemm_lowering(lowering, strategy, activation, mode, x_scale, w_scale):
    rng = np.random.default_rng(SEED)
    w = jax.device_put(random_fp8(rng, 256, 384, strategy, activation))
    x = jnp.asarray(rng.standard_normal((5, 384)), jnp.bfloat16)

    def fn(x, w):
        return kernels.fp8_gemm(*quantize_activation(x, w), w, jnp.bfloat16)

    (call,) = lowering(fn, x, w)
    assert "@pagedjax_fp8_gemm" in call and f"scale_mode = {mode} : i32" in call, call
    rows = 16 if mode == 2 else 5  # block mode pads the rows of x to 16
    operands = call.split(" : (")[1].split(") -> (")[0]
    assert operands == f"tensor<{rows}x384xf8E4M3FN>, {x_scale}, tensor<256x384xf8E4M3FN>, {w_scale}", operands
    results = call.split(") -> (")[1]
    assert results.startswith(f"tensor<{rows}x256xbf16>, tensor<{kernels.FP8_WORKSPACE_BYTES}xui8>"), results
    assert jax.eval_shape(fn, x, w).shape == (5, 256)


def test_fp8_gemm_refuses_what_cublaslt_cannot_do():
    rng = np.random.default_rng(SEED)
    odd = random_fp8(rng, 40, 72, "channel", "token")  # N, K not multiples of 16
    assert kernels.fp8_scale_mode(odd) is None
    with pytest.raises(ValueError, match="no cuBLASLt mode"):
        kernels.fp8_gemm(jnp.zeros((1, 72), jnp.float8_e4m3fn), jnp.ones((1,)), odd, jnp.bfloat16)


@pytest.mark.parametrize("M,splits,ws", [(1, None, 2 * 1 * 256), (70, 3, 3 * 64 * 256), (16, 1, 1)])
def test_int4_gemm_lowering(lowering, M, splits, ws):
    rng = np.random.default_rng(SEED)
    K, N = 512, 256
    w = jax.device_put(int4_weight(rng.integers(0, 16, (K, N)).astype(np.uint8),
                                   rng.integers(0, 16, (4, N)).astype(np.uint8),
                                   rng.uniform(0.01, 0.1, (4, N)).astype(np.float16), 128))
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
    (call,) = lowering(lambda x, w: kernels.int4_gemm(x, w, num_splits=splits), x, w)
    want_splits = splits or kernels.int4_num_splits(M, N, K, 132)
    assert f"group_size = 128 : i32, num_splits = {want_splits} : i32" in call, call
    assert (f"(tensor<{M}x512xbf16>, tensor<16x8x32x4xi32>, tensor<4x256xf16>, tensor<4x256xui8>) -> "
            f"(tensor<{M}x256xbf16>, tensor<{ws}xf32>)") in call, call
    with pytest.raises(ValueError, match="bf16/f16 x"):
        kernels.int4_gemm(x.astype(jnp.float32), w)
