"""Quantized linear layers: FP8 W8A8 and INT4 W4A16 (AWQ, GPTQ) weights, their checkpoint formats, matmuls.

  QuantConfig.from_hf(config_json) / QuantConfig.online("fp8")   what a checkpoint holds (config.py)
  convert_checkpoint_linear(cfg, {suffix: array})                one linear's tensors -> QuantizedWeight
  quantize_fp8(w), quantize_int4(w)                              float weight -> QuantizedWeight
  quantized_matmul(x, w, impl="auto")                            y = x @ w.T (XLA path or CUDA custom calls)
  param_specs(cfg, K, N, in_axis=, out_axis=)                    what a layer declares (shapes, dtypes, logical axes)
  weight_from_params(cfg, params, K, N)                          a layer's params -> QuantizedWeight
  repeat_out_heads(w, heads, r), quantized_matmul_tp(x, w, mesh)  kv-head replicas; tensor parallelism (shard_map)
"""

from pagedjax.quantization.config import QuantConfig
from pagedjax.quantization.formats import convert_checkpoint_linear, from_awq, from_fp8, from_gptq
from pagedjax.quantization.fp8 import quantize_fp8
from pagedjax.quantization.int4 import int4_weight, quantize_int4
from pagedjax.quantization.layer import (ParamSpec, param_specs, quantized_matmul_tp, repeat_out_heads,
                                         weight_from_params)
from pagedjax.quantization.linear import dequantize, quantized_matmul
from pagedjax.quantization.weight import QuantizedWeight, expected_shapes, logical_axes

__all__ = [
    "ParamSpec",
    "QuantConfig",
    "QuantizedWeight",
    "convert_checkpoint_linear",
    "dequantize",
    "expected_shapes",
    "from_awq",
    "from_fp8",
    "from_gptq",
    "int4_weight",
    "logical_axes",
    "param_specs",
    "quantize_fp8",
    "quantize_int4",
    "quantized_matmul",
    "quantized_matmul_tp",
    "repeat_out_heads",
    "weight_from_params",
]
