"""quantized_matmul against float64 "dequantize, then matmul" (CPU: the XLA path; `gpu`: the custom calls).

W8A8: the activations' codes and scales are checked against the oracle (amax / 448, round to
nearest even), then y against float64 (x codes * x scales) @ (w codes * w scales).T. W4A16: y
against float64 x @ ((q - z) * s).T from the random codes, zeros and scales the weight was built
from. Shapes are non-square and blocks partial, so a scale on the wrong axis, a wrong packing
order or a missing zero point is far outside the tolerances (a few f32 ulps of sum |x||w|).

GPU tests poison the output: it is the donated buffer of a NaN array (the test checks the
pointer), so an element the kernel never writes stays NaN.
"""

import dataclasses

import ml_dtypes
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pagedjax.quantization import from_fp8, int4_weight, quantized_matmul
from pagedjax.quantization import kernels
from pagedjax.quantization.fp8 import quantize_activation
from pagedjax.quantization.int4 import int4_matmul_xla
from pagedjax.quantization.weight import QuantizedWeight
from tests.quant_oracle import check_e4m3_codes

SEED = 7_2026


def rng_for(*key):
    seed = hash((SEED, *key)) % 2**32
    return np.random.default_rng(seed), seed


def f64(a):
    return np.asarray(a).astype(np.float64)


# --- fp8 -----------------------------------------------------------------------------------


def random_fp8_weight(rng, N, K, strategy, activation, block=(128, 128)) -> QuantizedWeight:
    codes = rng.integers(0, 256, (N, K)).astype(np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x38  # no NaN codes
    weight = codes.view(ml_dtypes.float8_e4m3fn)
    shape = {"tensor": (), "channel": (N,), "block": (-(-N // block[0]), -(-K // block[1]))}[strategy]
    scale = rng.uniform(1e-3, 2e-2, shape).astype(np.float32)
    inp = np.float32(rng.uniform(0.01, 0.03)) if activation == "static" else None
    return from_fp8(weight, scale, inp, strategy=strategy, block_size=block if strategy == "block" else None,
                    activation=activation)


def fp8_oracle(x, w: QuantizedWeight, seed):
    """Checks quantize_activation against the oracle; returns (y float64 [M, N], sum |x||w| [M, N])."""
    M, K = x.shape
    x64 = f64(x)
    x_q, x_scale = quantize_activation(jnp.asarray(x), w)
    xs = f64(x_scale)
    if w.activation == "static":
        full = np.full((M, K), float(w.input_scale))
        np.testing.assert_array_equal(xs, float(w.input_scale))
    elif w.activation == "token":
        want = np.maximum(np.abs(x64).max(axis=1) / 448, 1e-12)
        np.testing.assert_allclose(xs, want, rtol=1e-6, err_msg=f"per-token scales (seed {seed})")
        full = np.repeat(xs[:, None], K, axis=1)
    else:
        bk = w.block_size[1]
        KB = -(-K // bk)
        amax = np.stack([np.abs(x64[:, j * bk:(j + 1) * bk]).max(axis=1) for j in range(KB)], axis=1)
        np.testing.assert_allclose(xs, np.maximum(amax / 448, 1e-12), rtol=1e-6, err_msg=f"group scales (seed {seed})")
        full = np.repeat(xs, bk, axis=1)[:, :K]
    check_e4m3_codes(np.asarray(x_q), x64 / full, f"activation codes (seed {seed})")
    xd = f64(x_q) * full  # [M, K]
    N = w.out_features
    s = f64(w.scale)
    if w.weight_strategy == "block":
        bn, bk = w.block_size
        s = s[np.arange(N)[:, None] // bn, np.arange(K)[None, :] // bk]
    elif w.weight_strategy == "channel":
        s = s[:, None]
    wd = f64(w.qvalue) * s  # [N, K]
    return xd @ wd.T, np.abs(xd) @ np.abs(wd).T


FP8_CASES = [("tensor", "token"), ("channel", "token"), ("channel", "static"), ("tensor", "static"),
             ("block", "group")]


@pytest.mark.parametrize("strategy,activation", FP8_CASES)
@pytest.mark.parametrize("x_dtype", [np.float32, ml_dtypes.bfloat16])
def test_fp8_xla_path_matches_float64(strategy, activation, x_dtype):
    rng, seed = rng_for("fp8", strategy, activation, np.dtype(x_dtype).name)
    M, N, K = 5, 48, 320
    w = random_fp8_weight(rng, N, K, strategy, activation, block=(32, 128))  # partial K-block
    x = (rng.standard_normal((M, K)) * rng.uniform(0.1, 4, (M, 1))).astype(x_dtype)
    want, mag = fp8_oracle(x, w, seed)
    got = f64(jax.jit(lambda x, w: quantized_matmul(x, w, impl="xla", out_dtype=jnp.float32))(jnp.asarray(x), w))
    err = np.abs(got - want)
    # a GPU's f8 GEMMs accumulate with fewer than f32's bits
    rel = 4e-6 if jax.default_backend() == "cpu" else 1e-4
    assert (err <= rel * mag).all(), f"max err / sum|x||w| {(err / mag).max():.3g} (seed {seed})"
    assert got.shape == (M, N)
    y = quantized_matmul(jnp.asarray(x), w, impl="xla")
    assert y.dtype == jnp.dtype(x_dtype)


@pytest.mark.parametrize("strategy,activation", [("tensor", "token"), ("channel", "token"), ("channel", "static")])
@pytest.mark.parametrize("x_dtype", [np.float32, ml_dtypes.bfloat16])
def test_fp8_weight_only_path_matches_float64(strategy, activation, x_dtype, monkeypatch):
    """impl="w8a16": y against float64 x @ (w codes * w scales).T, x as given (no activation
    quantization, a static input scale ignored); "auto" takes it on a GPU up to
    $PAGEDJAX_FP8_WEIGHT_ONLY_ROWS rows only (64 when unset, 0: never), and it refuses block weights."""
    from pagedjax.quantization.linear import resolve_impl

    rng, seed = rng_for("w8a16", strategy, activation, np.dtype(x_dtype).name)
    M, N, K = 5, 48, 320
    w = random_fp8_weight(rng, N, K, strategy, activation)
    x = (rng.standard_normal((M, K)) * rng.uniform(0.1, 4, (M, 1))).astype(x_dtype)
    s = f64(w.scale)[:, None] if strategy == "channel" else f64(w.scale)
    wd = f64(w.qvalue) * s  # [N, K]
    want, mag = f64(x) @ wd.T, np.abs(f64(x)) @ np.abs(wd).T
    got = f64(jax.jit(lambda x, w: quantized_matmul(x, w, impl="w8a16", out_dtype=jnp.float32))(jnp.asarray(x), w))
    err = np.abs(got - want)
    rel = 4e-6 if jax.default_backend() == "cpu" else 1e-4  # f32 accumulation (a GPU's: fewer bits)
    assert (err <= rel * mag).all(), f"max err / sum|x||w| {(err / mag).max():.3g} (seed {seed})"
    assert quantized_matmul(jnp.asarray(x), w, impl="w8a16").dtype == jnp.dtype(x_dtype)

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.delenv("PAGEDJAX_FP8_WEIGHT_ONLY_ROWS", raising=False)
    assert [resolve_impl("auto", w, x.dtype, m) == "w8a16" for m in (1, 64, 65, 256)] == [True, True, False, False]
    monkeypatch.setenv("PAGEDJAX_FP8_WEIGHT_ONLY_ROWS", "0")
    assert resolve_impl("auto", w, x.dtype, 1) != "w8a16"
    monkeypatch.setenv("PAGEDJAX_FP8_WEIGHT_ONLY_ROWS", "16")
    assert [resolve_impl("auto", w, x.dtype, m) == "w8a16" for m in (1, 16, 17)] == [True, True, False]
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    monkeypatch.delenv("PAGEDJAX_FP8_WEIGHT_ONLY_ROWS", raising=False)
    assert resolve_impl("auto", w, x.dtype, 1) == "xla"  # CPU: the W8A8 XLA dot (checked above)
    block = random_fp8_weight(rng, N, K, "block", "group", block=(32, 128))
    assert resolve_impl("auto", block, x.dtype, 1) != "w8a16"
    with pytest.raises(ValueError, match="w8a16"):
        quantized_matmul(jnp.asarray(x), block, impl="w8a16")


@pytest.mark.parametrize("strategy", ["tensor", "channel"])
def test_weight_only_checkpoint_weights_run_w8a16_at_every_size(strategy, monkeypatch):
    """A weight-only fp8 weight (activation "none", compressed-tensors W8A16) has no activation
    scheme: "auto" runs w8a16 on every backend and at any M, even with the weight-only bound at 0,
    and the W8A8 impls refuse it by name."""
    from pagedjax.quantization.linear import resolve_impl

    rng, seed = rng_for("w8a16-only", strategy)
    M, N, K = 300, 32, 256
    w = random_fp8_weight(rng, N, K, strategy, "none")
    x = rng.standard_normal((M, K)).astype(np.float32)
    s = f64(w.scale)[:, None] if strategy == "channel" else f64(w.scale)
    wd = f64(w.qvalue) * s
    want, mag = f64(x) @ wd.T, np.abs(f64(x)) @ np.abs(wd).T
    got = f64(jax.jit(quantized_matmul)(jnp.asarray(x), w))
    assert (np.abs(got - want) <= 4e-6 * mag).all(), f"seed {seed}"
    monkeypatch.setenv("PAGEDJAX_FP8_WEIGHT_ONLY_ROWS", "0")
    for backend in ("cpu", "gpu"):
        monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
        assert [resolve_impl("auto", w, x.dtype, m) for m in (1, 4096)] == ["w8a16", "w8a16"]
    for impl in ("xla", "ffi"):
        with pytest.raises(ValueError, match="weight-only"):
            resolve_impl(impl, w, x.dtype, 1)
    block = random_fp8_weight(rng, N, K, "block", "group", block=(32, 128))
    with pytest.raises(ValueError, match="weight-only"):
        QuantizedWeight(block.qvalue, block.scale, None, None, "fp8", K, N, block_size=(32, 128),
                        activation="none").check()


# --- int4 ----------------------------------------------------------------------------------


def random_int4_weight(rng, K, N, gs, scale_dtype=np.float16, act_order=False):
    """act_order: row k in group g_idx[k], a random permutation's rank // gs (GPTQ desc_act)."""
    gsz = K if gs == -1 else gs
    G = K // gsz
    q = rng.integers(0, 16, (K, N)).astype(np.uint8)
    z = rng.integers(0, 17, (G, N)).astype(np.uint8)  # 16 occurs in GPTQ v1 checkpoints
    s = rng.uniform(0.002, 0.05, (G, N)).astype(scale_dtype)
    g_idx = np.arange(K) // gsz
    if act_order:
        g_idx[rng.permutation(K)] = np.arange(K) // gsz
    w64 = (q.astype(np.float64) - z[g_idx]) * f64(s)[g_idx]  # [K, N]
    return int4_weight(q, z, s, gs, g_idx=g_idx.astype(np.int32) if act_order else None), w64


@pytest.mark.parametrize("K,N,gs,act_order", [(256, 48, 64, False), (384, 32, 128, False), (192, 80, -1, False),
                                              (256, 32, 64, True)])
@pytest.mark.parametrize("M", [1, 7])
def test_int4_xla_path_matches_float64(K, N, gs, act_order, M):
    rng, seed = rng_for("int4", K, N, gs, M, act_order)
    w, w64 = random_int4_weight(rng, K, N, gs, act_order=act_order)
    x = rng.standard_normal((M, K)).astype(np.float32)
    want, mag = f64(x) @ w64, np.abs(f64(x)) @ np.abs(w64)
    got = f64(jax.jit(lambda x, w: quantized_matmul(x, w, impl="xla"))(jnp.asarray(x), jax.device_put(w)))
    err = np.abs(got - want)
    assert (err <= 4e-6 * mag).all(), f"f32: max err / sum|x||w| {(err / mag).max():.3g} (seed {seed})"
    xb = x.astype(ml_dtypes.bfloat16)
    want = f64(xb) @ w64
    got = f64(quantized_matmul(jnp.asarray(xb), jax.device_put(w), impl="xla"))
    # bf16: the dequantized weight and the output round to bf16 (2^-9 each)
    err = np.abs(got - want)
    assert (err <= 2**-8 * (np.abs(f64(xb)) @ np.abs(w64)) + 2**-8 * np.abs(want)).all(), f"bf16 (seed {seed})"


def test_bad_inputs_raise():
    rng, _ = rng_for("bad")
    w, _ = random_int4_weight(rng, 128, 16, 64)
    with pytest.raises(ValueError, match=r"x must be \[M, 128\]"):
        quantized_matmul(jnp.zeros((2, 64)), w)
    with pytest.raises(ValueError, match="unknown impl"):
        quantized_matmul(jnp.zeros((2, 128)), w, impl="fast")
    with pytest.raises(ValueError, match="bf16, f16 or f32"):
        quantized_matmul(jnp.zeros((2, 128), jnp.int32), w)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="auto picks the custom calls on a GPU")
def test_auto_is_xla_on_cpu():
    rng, _ = rng_for("auto")
    w = random_fp8_weight(rng, 32, 64, "channel", "token")
    x = jnp.asarray(rng.standard_normal((3, 64)), jnp.float32)
    text = jax.jit(lambda x, w: quantized_matmul(x, w)).lower(x, w).as_text()
    assert "pagedjax_fp8_gemm" not in text
    np.testing.assert_array_equal(np.asarray(quantized_matmul(x, w)), np.asarray(quantized_matmul(x, w, impl="xla")))


# --- GPU: the custom calls -------------------------------------------------------------------


def run_poisoned(fn, out_shape, out_dtype, *args, target=None):
    """fn(*args) jitted with its output in the donated buffer of a NaN array -> (out, why_not).

    Checked, not assumed: the output must come back in the poisoned buffer, the compiled program
    must not copy the result into it, and (with `target`) the program's ROOT must be that custom
    call's output, so the kernel itself writes the poisoned buffer. why_not says what failed
    (None when the poisoning held); tests check their results first, then it.
    """
    jitted = jax.jit(lambda p, *a: fn(*a), donate_argnums=0, keep_unused=True)
    poison = jnp.full(out_shape, jnp.nan, out_dtype)
    hlo = jitted.lower(poison, *args).compile().as_text()
    shape = f"{jnp.dtype(out_dtype).name.replace('bfloat16', 'bf16').replace('float', 'f')}[{','.join(map(str, out_shape))}]"
    copies = [line.strip() for line in hlo.splitlines() if " copy(" in line and "=" in line
              and shape in line.split("=", 1)[1].split()[0]]
    entry = hlo[hlo.index("\nENTRY"):]
    root = next(line.strip() for line in entry.splitlines() if line.strip().startswith("ROOT"))
    ptr = poison.unsafe_buffer_pointer()
    out = jitted(poison, *args)
    why_not = None
    if copies:
        why_not = f"the result is copied into the poisoned buffer: {copies[:2]}"
    elif target is not None and not ("custom-call" in root or "get-tuple-element" in root):
        why_not = f"{target} does not write the program's output itself (ROOT: {root[:200]})"
    elif target is not None and target not in hlo:
        why_not = f"no {target} custom call in the program"
    elif out.unsafe_buffer_pointer() != ptr:
        why_not = "the output did not land in the poisoned buffer"
    return out, why_not


def test_run_poisoned_on_the_xla_path():
    """run_poisoned itself, on the XLA path of whatever backend runs the tests."""
    rng, _ = rng_for("poison")
    w, w64 = random_int4_weight(rng, 128, 32, 64)
    x = jnp.asarray(rng.standard_normal((4, 128)), jnp.float32)
    got, why_not = run_poisoned(lambda x, w: quantized_matmul(x, w, impl="xla"), (4, 32), jnp.float32, x,
                                jax.device_put(w))
    assert not np.isnan(np.asarray(got)).any()
    np.testing.assert_allclose(f64(got), f64(x) @ w64, rtol=1e-5, atol=1e-5)
    assert why_not is None, why_not


@pytest.mark.gpu
@pytest.mark.parametrize("strategy,activation", FP8_CASES)
@pytest.mark.parametrize("M", [1, 7, 64, 300])
@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float32])
def test_fp8_cublaslt_matches_float64(strategy, activation, M, out_dtype):
    assert kernels.has_handler(kernels.FP8_TARGET), "the extension was built without the FP8 GEMM handler"
    rng, seed = rng_for("fp8-gpu", strategy, activation, M)
    N, K = 256, 384  # K / 128 = 3 K-blocks: exercises the padding of cuBLASLt's block scales
    w = jax.device_put(random_fp8_weight(rng, N, K, strategy, activation))
    assert kernels.fp8_scale_mode(w) is not None
    x = (rng.standard_normal((M, K)) * rng.uniform(0.1, 4, (M, 1))).astype(ml_dtypes.bfloat16)
    want, mag = fp8_oracle(x, w, seed)
    got, why_not = run_poisoned(lambda x, w: quantized_matmul(x, w, impl="ffi", out_dtype=out_dtype), (M, N),
                                out_dtype, jnp.asarray(x), w, target=kernels.FP8_TARGET)
    got = f64(got.astype(jnp.float32))
    assert not np.isnan(got).any(), "unwritten output elements"
    # Hopper's FP8 tensor cores accumulate with fewer bits than f32 (~2^-14 of the running sum:
    # DeepSeek-V3's report, §3.3.2); measured on the H200 (2026-12-04) up to 1.5e-3 of sum|x||w| at
    # K = 384. A wrong scale axis, packing or missing scale is off by a good fraction of the output.
    tol = 4e-3 * mag + (2**-8 * np.abs(want) if out_dtype == jnp.bfloat16 else 0)
    err = np.abs(got - want)
    assert (err <= tol).all(), f"max err / sum|x||w| {(err / mag).max():.3g} (seed {seed})"
    if strategy == "block" and M % kernels.BLOCK_ROW_MULTIPLE:
        return  # rows padded to 16 and sliced after the call: the slice, not the kernel, writes y
    assert why_not is None, why_not


@pytest.mark.gpu
def test_fp8_auto_runs_cublaslt_on_gpu(monkeypatch):
    """"auto" by M (quantization/linear.py): weight-only up to the weight-only bound (x not quantized),
    XLA's e4m3 dot above it and up to FP8_XLA_MAX_ROWS, our cuBLASLt call above."""
    from pagedjax.quantization.linear import FP8_XLA_MAX_ROWS

    rng, _ = rng_for("fp8-hlo")
    w = jax.device_put(random_fp8_weight(rng, 256, 512, "channel", "token"))
    for M, rows, want in ((16, "", "w8a16"), (16, "0", "xla"), (2 * FP8_XLA_MAX_ROWS, "", "ffi")):
        monkeypatch.setenv("PAGEDJAX_FP8_WEIGHT_ONLY_ROWS", rows)
        x = jnp.asarray(rng.standard_normal((M, 512)), jnp.bfloat16)
        text = jax.jit(lambda x, w: quantized_matmul(x, w)).lower(x, w).compile().as_text()
        assert ("pagedjax_fp8_gemm" in text) == (want == "ffi"), (M, rows)
        # W8A8 quantizes x into an e4m3 [M, K]; weight-only has none (only the [N, K] weight is fp8)
        assert (f"f8e4m3fn[{M},512]" in text) == (want != "w8a16"), (M, rows)
        assert "f8e4m3fn[256,512]" in text, (M, rows)  # the weights stay fp8 in memory every way


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 3, 16, 17, 64, 100])
@pytest.mark.parametrize("K,N,gs,splits", [(4096, 256, 128, None), (1024, 384, -1, 3), (512, 4096, 64, 1),
                                           (2048, 128, 128, 7)])
@pytest.mark.parametrize("x_dtype,scale_dtype", [(jnp.bfloat16, np.float16), (jnp.float16, np.float32),
                                                 (jnp.bfloat16, ml_dtypes.bfloat16)])
def test_int4_kernel_matches_float64(M, K, N, gs, splits, x_dtype, scale_dtype):
    assert kernels.has_handler(kernels.INT4_TARGET), "the extension was built without CUDA handlers"
    rng, seed = rng_for("int4-gpu", M, K, N, gs, np.dtype(x_dtype).name)
    w, w64 = random_int4_weight(rng, K, N, gs, scale_dtype)
    w = jax.device_put(w)
    x = jnp.asarray(rng.standard_normal((M, K)), x_dtype)
    want = f64(x.astype(jnp.float32)) @ w64
    mag = np.abs(f64(x.astype(jnp.float32))) @ np.abs(w64)
    got, why_not = run_poisoned(lambda x, w: kernels.int4_gemm(x, w, num_splits=splits), (M, N), x_dtype, x, w,
                                target=kernels.INT4_TARGET)
    got = f64(got.astype(jnp.float32))
    assert not np.isnan(got).any(), "unwritten output elements"
    err = np.abs(got - want)
    # (q - z) and x are exact in the mma, f32 accumulation, one rounding of y to bf16 / f16
    assert (err <= 2**-8 * np.abs(want) + 1e-5 * mag).all(), f"max err / |y| {(err / np.abs(want)).max():.3g} (seed {seed})"
    again = kernels.int4_gemm(x, w, num_splits=splits)
    np.testing.assert_array_equal(np.asarray(again.astype(jnp.float32)), got.astype(np.float32))
    assert why_not is None, why_not


def test_int4_act_order_is_a_grouped_weight_of_permuted_inputs():
    """An act-order weight holds its rows sorted by group: without its perm it is an ordinary
    grouped weight, which the kernel serves, applied to x's columns in perm's order (what
    quantized_matmul does); the kernel itself refuses the weight with its perm."""
    rng, seed = rng_for("int4-act-order")
    w, w64 = random_int4_weight(rng, 256, 32, 64, act_order=True)
    plain = dataclasses.replace(w, perm=None)
    assert w.act_order and not kernels.int4_supported(w, jnp.bfloat16) and kernels.int4_supported(plain, jnp.bfloat16)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    perm = np.asarray(w.perm)
    got = np.asarray(int4_matmul_xla(jnp.asarray(x[:, perm]), plain), np.float64)
    ref = x.astype(np.float64) @ w64
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-5, seed
    with pytest.raises(ValueError, match="act-order"):
        kernels.int4_gemm(jnp.zeros((1, 256), jnp.bfloat16), w)


@pytest.mark.gpu
def test_int4_act_order_runs_the_kernel_for_decode():
    rng, seed = rng_for("int4-act-order-gpu")
    w, w64 = random_int4_weight(rng, 1024, 256, 128, act_order=True)
    w = jax.device_put(w)
    x = jnp.asarray(rng.standard_normal((8, 1024)), jnp.bfloat16)
    f = jax.jit(lambda x, w: quantized_matmul(x, w))
    assert "pagedjax_int4_gemm" in f.lower(x, w).compile().as_text()
    ref = np.asarray(x, np.float64) @ w64
    err = np.abs(np.asarray(f(x, w), np.float64) - ref).max() / np.abs(ref).max()
    assert err < 1e-2, (seed, err)


@pytest.mark.gpu
def test_int4_auto_runs_the_kernel_for_decode():
    rng, _ = rng_for("int4-hlo")
    w, _ = random_int4_weight(rng, 1024, 256, 128)
    w = jax.device_put(w)
    x = jnp.asarray(rng.standard_normal((8, 1024)), jnp.bfloat16)
    assert "pagedjax_int4_gemm" in jax.jit(lambda x, w: quantized_matmul(x, w)).lower(x, w).compile().as_text()
