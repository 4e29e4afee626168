"""What a quantized layer uses: param specs, weights from params, kv-head replicas, tensor-parallel matmul.

Tensor parallelism runs on the 8 fake CPU devices of conftest, with the XLA path inside
shard_map; each result is compared with the unsharded matmul (or, where dynamic activation
scales become per shard, with a float64 sum over shards).
"""

import ml_dtypes
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from pagedjax import parallel
from pagedjax.quantization import QuantConfig, dequantize, from_fp8, int4_weight, quantized_matmul
from pagedjax.quantization.layer import param_specs, quantized_matmul_tp, repeat_out_heads, weight_from_params

SEED = 31


def rng_for(*key):
    seed = hash((SEED, *key)) % 2**32
    return np.random.default_rng(seed), seed


def int4(rng, K, N, gs):
    return int4_weight(rng.integers(0, 16, (K, N)).astype(np.uint8), rng.integers(0, 17, (K // gs, N)).astype(np.uint8),
                       rng.uniform(0.01, 0.05, (K // gs, N)).astype(np.float16), gs)


def fp8(rng, N, K, strategy, activation="token", block=None):
    codes = rng.integers(0, 0x7F, (N, K)).astype(np.uint8) | (rng.integers(0, 2, (N, K)).astype(np.uint8) << 7)
    shape = {"tensor": (), "channel": (N,), "block": (-(-N // block[0]), -(-K // block[1])) if block else None}[strategy]
    return from_fp8(codes.view(ml_dtypes.float8_e4m3fn), rng.uniform(0.01, 0.05, shape).astype(np.float32),
                    np.float32(0.02) if activation == "static" else None, strategy=strategy, block_size=block,
                    activation=activation)


AWQ = QuantConfig.from_hf({"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128,
                                                   "zero_point": True, "version": "gemm"}})
FP8_BLOCK = QuantConfig.from_hf({"quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic",
                                                         "weight_block_size": [128, 128]}})
FP8_STATIC = QuantConfig.from_hf({"quantization_config": {"quant_method": "fp8", "activation_scheme": "static"}})


def test_param_specs_and_weight_from_params():
    specs = param_specs(AWQ, 4096, 1024, in_axis="embed", out_axis="kv_heads")
    assert {k: (v.shape, v.dtype.name, v.axes) for k, v in specs.items()} == {
        "qvalue": ((64, 64, 32, 4), "int32", ("kv_heads", "embed", None, None)),
        "scale": ((32, 1024), "float16", ("embed", "kv_heads")),
        "zero": ((32, 1024), "uint8", ("embed", "kv_heads"))}
    specs = param_specs(FP8_BLOCK, 14336, 4096, in_axis="mlp", out_axis="embed")
    assert {k: (v.shape, v.axes) for k, v in specs.items()} == {
        "qvalue": ((4096, 14336), ("embed", "mlp")), "scale": ((32, 112), ("embed", "mlp"))}
    specs = param_specs(FP8_STATIC, 64, 32, in_axis="embed", out_axis="heads")
    assert specs["input_scale"].shape == () and specs["scale"].shape == ()
    params = {k: jnp.zeros(v.shape, v.dtype) for k, v in specs.items()}
    w = weight_from_params(FP8_STATIC, params, 64, 32).check()
    assert (w.kind, w.activation, w.in_features, w.out_features) == ("fp8", "static", 64, 32)
    # the logical axes map to mesh axes by pagedjax.parallel's one table
    mesh = Mesh(np.array(jax.devices()[:2]).reshape(1, 2), ("dp", "tp"))
    spec = param_specs(AWQ, 4096, 1024, in_axis="embed", out_axis="kv_heads")["qvalue"]
    assert parallel.logical_spec(spec.axes, spec.shape, mesh) == jax.sharding.PartitionSpec("tp", None, None, None)


@pytest.mark.parametrize("kind", ["int4", "fp8-channel", "fp8-tensor", "fp8-block"])
def test_repeat_out_heads(kind):
    rng, seed = rng_for("repeat", kind)
    heads, H, K, r = 3, 32, 128, 2
    if kind == "int4":
        w = int4(rng, K, heads * H, 64)
    else:
        strategy = kind.split("-")[1]
        w = fp8(rng, heads * H, K, strategy, block=(16, 64) if strategy == "block" else None)
    got = repeat_out_heads(w, heads, r)
    assert got.out_features == heads * H * r
    want = np.repeat(np.asarray(dequantize(w)).reshape(heads, H, K), r, axis=0).reshape(heads * H * r, K)
    np.testing.assert_array_equal(np.asarray(dequantize(got.check())), want, err_msg=f"seed {seed}")


@pytest.mark.parametrize("case", ["int4-out", "int4-in", "fp8-channel-out", "fp8-static-in", "fp8-block-out"])
def test_tensor_parallel_matches_unsharded(case):
    rng, seed = rng_for("tp", case)
    tp = 4
    mesh = Mesh(np.array(jax.devices()[:tp]).reshape(1, tp), ("dp", "tp"))
    K, N = 512, 256
    if case.startswith("int4"):
        w = int4(rng, K, N, 64)
    elif case == "fp8-channel-out":
        w = fp8(rng, N, K, "channel")
    elif case == "fp8-static-in":
        w = fp8(rng, N, K, "tensor", activation="static")
    else:
        w = fp8(rng, N, K, "block", activation="group", block=(32, 128))
    split = case.rsplit("-", 1)[1]
    x = jnp.asarray(rng.standard_normal((6, K)), jnp.float32)
    w = jax.device_put(w)
    got = jax.jit(lambda x, w: quantized_matmul_tp(x, w, mesh, split=split, impl="xla"))(x, w)
    want = quantized_matmul(x, w, impl="xla")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5 * np.abs(want).max(),
                               err_msg=f"seed {seed}")
    if split == "out":
        assert got.sharding.spec == jax.sharding.PartitionSpec(None, "tp")


def test_tensor_parallel_refuses_split_tiles():
    rng, _ = rng_for("tp-bad")
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(1, 8), ("dp", "tp"))
    w = int4(rng, 256, 64, 64)  # 64 / 8 = 8 columns per shard: not a whole 16-column tile
    with pytest.raises(ValueError, match="out_features % 16"):
        quantized_matmul_tp(jnp.zeros((2, 256)), w, mesh, split="out")
