"""QuantConfig.from_hf on the quantization_config blocks real checkpoints carry, and its refusals."""

import dataclasses

import pytest

from pagedjax.quantization import QuantConfig

# quantization_config blocks as published checkpoints write them (values from the model cards /
# config.json files of each tool's outputs).
HF_FP8_BLOCK = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                "weight_block_size": [128, 128], "modules_to_not_convert": ["lm_head"]}
FP8_PER_TENSOR_STATIC = {"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head"]}
CT_CHANNEL_TOKEN = {
    "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
    "global_compression_ratio": 1.46, "ignore": ["lm_head"], "kv_cache_scheme": None,
    "config_groups": {"group_0": {
        "targets": ["Linear"], "output_activations": None,
        "weights": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel", "dynamic": False,
                    "group_size": None, "block_structure": None, "observer": "minmax"},
        "input_activations": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token",
                              "dynamic": True, "group_size": None, "observer": None}}},
}
AWQ = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm",
       "modules_to_not_convert": None}
GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True,
        "damp_percent": 0.01, "true_sequential": True, "static_groups": False, "checkpoint_format": "gptq",
        "model_name_or_path": None, "model_file_base_name": None, "quantizer": "optimum:1.20"}


def ct(weights=None, acts=None, **top):
    """A compressed-tensors config with the channel/token group modified."""
    q = {**CT_CHANNEL_TOKEN, **top}
    g = q["config_groups"]["group_0"]
    q["config_groups"] = {"group_0": {**g, "weights": {**g["weights"], **(weights or {})},
                                      "input_activations": None if acts is False else
                                      {**g["input_activations"], **(acts or {})}}}
    return q


def cfg(q):
    return QuantConfig.from_hf({"architectures": ["LlamaForCausalLM"], "quantization_config": q})


def test_no_quantization_config_is_none():
    assert QuantConfig.from_hf({"architectures": ["LlamaForCausalLM"]}) is None
    assert QuantConfig.from_hf({"quantization_config": None}) is None


def test_hf_fine_grained_fp8():
    c = cfg(HF_FP8_BLOCK)
    assert (c.method, c.checkpoint_format, c.weight_dtype, c.weight_strategy, c.activation, c.block_size) == (
        "fp8", "hf-fp8", "fp8", "block", "group", (128, 128))
    assert c.tensor_names() == ("weight", "weight_scale_inv")
    assert not c.is_quantized("lm_head") and c.is_quantized("model.layers.0.mlp.down_proj")


# llm-compressor's FP8 KV-cache recipe (kv_cache_scheme as neuralmagic's *-FP8-KV checkpoints write it)
KV_SCHEME = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False,
             "group_size": None, "block_structure": None, "actorder": None, "observer": "minmax"}


def test_compressed_tensors_kv_cache_scheme():
    assert cfg(CT_CHANNEL_TOKEN).kv_cache_scheme is None
    c = cfg(ct(kv_cache_scheme=KV_SCHEME))
    assert (c.kv_cache_scheme, c.weight_strategy, c.activation) == ("tensor", "channel", "token")
    assert cfg(ct(acts=False, kv_cache_scheme=KV_SCHEME)).kv_cache_scheme == "tensor"  # W8A16 + FP8 KV
    assert "k_scale" not in c.tensor_names()  # the attention's, not a linear's
    assert cfg(ct(kv_cache_scheme={**KV_SCHEME, "strategy": "attn_head"})).kv_cache_scheme == "attn_head"
    with pytest.raises(ValueError, match="kv_cache_scheme"):
        QuantConfig("awq", "awq", "int4", "group", "none", group_size=128, kv_cache_scheme="head")


def test_fp8_per_tensor_static():
    c = cfg(FP8_PER_TENSOR_STATIC)
    assert (c.weight_strategy, c.activation, c.block_size) == ("tensor", "static", None)
    assert c.tensor_names() == ("weight", "weight_scale", "input_scale")
    assert cfg({"quant_method": "fp8", "activation_scheme": "dynamic"}).activation == "token"


@pytest.mark.parametrize("weights,acts,want", [
    ({}, {}, ("channel", "token", None)),
    ({"strategy": "tensor"}, {"strategy": "tensor", "dynamic": False}, ("tensor", "static", None)),
    ({"strategy": "channel"}, {"strategy": "tensor", "dynamic": False}, ("channel", "static", None)),
    ({"strategy": "block", "block_structure": [128, 128]}, {"strategy": "group", "group_size": 128},
     ("block", "group", (128, 128))),
    ({}, False, ("channel", "none", None)),  # weight-only (W8A16): no input_activations
    ({"strategy": "tensor"}, False, ("tensor", "none", None)),
])
def test_compressed_tensors_fp8(weights, acts, want):
    c = cfg(ct(weights, acts))
    assert (c.weight_strategy, c.activation, c.block_size) == want
    assert c.checkpoint_format == "compressed-tensors" and c.weight_dtype == "fp8"
    assert c.tensor_names()[:2] == ("weight", "weight_scale")
    assert ("input_scale" in c.tensor_names()) == (want[1] == "static")


def test_awq_and_gptq():
    a = cfg(AWQ)
    assert (a.checkpoint_format, a.weight_dtype, a.group_size, a.activation) == ("awq", "int4", 128, "none")
    assert a.tensor_names() == ("qweight", "qzeros", "scales")
    g = cfg(GPTQ)
    assert (g.checkpoint_format, g.group_size) == ("gptq", 128)
    assert cfg({**GPTQ, "checkpoint_format": "gptq_v2", "group_size": -1}).checkpoint_format == "gptq_v2"
    assert cfg({**GPTQ, "group_size": -1}).group_size == -1
    assert cfg({**GPTQ, "sym": False}).checkpoint_format == "gptq"
    assert "g_idx" in g.tensor_names() and not g.act_order
    assert cfg({**GPTQ, "desc_act": True}).act_order  # each row's group from g_idx
    assert not cfg({**GPTQ, "desc_act": True, "group_size": -1}).act_order  # one group: nothing to reorder
    with pytest.raises(ValueError, match="act_order is for int4"):
        dataclasses.replace(QuantConfig.online("fp8"), act_order=True)


def test_online_fp8():
    c = QuantConfig.online("fp8")
    assert (c.method, c.weight_dtype, c.weight_strategy, c.activation) == ("online", "fp8", "channel", "token")
    assert c.tensor_names() == ("weight",) and not c.is_quantized("lm_head")
    with pytest.raises(ValueError, match="online quantization method 'int8'"):
        QuantConfig.online("int8")


def test_ignore_patterns():
    c = cfg(ct(ignore=["lm_head", "re:.*mlp\\.gate$", "model.layers.3"]))
    assert not c.is_quantized("lm_head")
    assert not c.is_quantized("model.layers.0.mlp.gate")
    assert c.is_quantized("model.layers.0.mlp.gate_proj")
    assert not c.is_quantized("model.layers.3.self_attn.q_proj")
    assert c.is_quantized("model.layers.31.self_attn.q_proj")


@pytest.mark.parametrize("q,method,field", [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "bitsandbytes", "quant_method"),
    ({"quant_method": "marlin"}, "marlin", "quant_method"),
    ({**GPTQ, "bits": 8}, "gptq", "bits"),
    ({**GPTQ, "desc_act": "yes"}, "gptq", "desc_act"),
    ({**GPTQ, "desc_act": True, "act_group_aware": True}, "gptq", "act_group_aware"),
    ({**GPTQ, "checkpoint_format": "marlin"}, "gptq", "checkpoint_format"),
    ({**GPTQ, "is_marlin_format": True}, "gptq", "is_marlin_format"),
    ({**GPTQ, "group_size": 100}, "gptq", "group_size"),
    ({**GPTQ, "lm_head": True}, "gptq", "lm_head"),
    ({**AWQ, "bits": 3}, "awq", "bits"),
    ({**AWQ, "version": "gemv"}, "awq", "version"),
    ({**AWQ, "version": "exllama"}, "awq", "version"),
    ({**AWQ, "zero_point": False}, "awq", "zero_point"),
    ({**HF_FP8_BLOCK, "fmt": "e5m2"}, "fp8", "fmt"),
    ({**HF_FP8_BLOCK, "activation_scheme": "static"}, "fp8", "activation_scheme"),
    ({**HF_FP8_BLOCK, "weight_block_size": [128]}, "fp8", "weight_block_size"),
    (ct(weights={"type": "int", "num_bits": 4}), "compressed-tensors", "weights"),
    (ct(weights={"strategy": "group", "group_size": 128}), "compressed-tensors", "strategy"),
    (ct(acts={"strategy": "tensor", "dynamic": True}), "compressed-tensors", "input_activations"),
    (ct(weights={"strategy": "block", "block_structure": [128, 128]}, acts=False), "compressed-tensors",
     "input_activations"),
    (ct(format="pack-quantized"), "compressed-tensors", "format"),
    (ct(kv_cache_scheme={**KV_SCHEME, "strategy": "channel"}), "compressed-tensors", "kv_cache_scheme.strategy"),
    (ct(kv_cache_scheme={**KV_SCHEME, "strategy": "token"}), "compressed-tensors", "kv_cache_scheme.strategy"),
    (ct(kv_cache_scheme={**KV_SCHEME, "dynamic": True}), "compressed-tensors", "kv_cache_scheme.dynamic"),
    (ct(kv_cache_scheme={**KV_SCHEME, "type": "int"}), "compressed-tensors", "kv_cache_scheme"),
    (ct(kv_cache_scheme={**KV_SCHEME, "num_bits": 4}), "compressed-tensors", "kv_cache_scheme"),
    (ct(kv_cache_scheme={**KV_SCHEME, "symmetric": False}), "compressed-tensors", "kv_cache_scheme.symmetric"),
    ({**CT_CHANNEL_TOKEN, "config_groups": {"a": {}, "b": {}}}, "compressed-tensors", "config_groups"),
])
def test_unsupported_raises_naming_method_and_field(q, method, field):
    with pytest.raises(ValueError) as e:
        cfg(q)
    assert repr(method) in str(e.value) and field in str(e.value), str(e.value)
