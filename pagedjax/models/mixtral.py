"""Mixtral: Mistral's attention (GQA, rotary, an optional sliding window on every layer) with a
sparse MoE MLP, top-2 of 8 SwiGLU experts.

Dims: D hidden, N query heads, H head dim, X experts, F expert MLP width.
The module is LLaMA's (`llama.Llama`); the MLP is the shared `layers.SparseMoeBlock`, chosen by
the config's MoE fields (every layer sparse). Routing is HF's `MixtralTopKRouter`: softmax over
all X logits in float32, top k, renormalized. Checkpoints: HF's per-expert tensors
(`block_sparse_moe.experts.{e}.w1/w2/w3`), stacked into [X, D, F] arrays at load time, or
transformers 5's fused `mlp.experts.gate_up_proj` / `down_proj`; GGUF files of llama.cpp's
`llama` architecture with `llama.expert_count` (`ffn_*_exps`, or the older per-expert tensors).
The window (`sliding_window`, null in the released Mixtral configs) is the shared feature of
`layers.Attention`, pages behind it freed as for Mistral.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from pagedjax.models import llama
from pagedjax.models.config import ModelConfig, hf_rope
from pagedjax.models.family import ModelFamily

MOE_OPTIONS = frozenset({"num_experts", "num_experts_per_tok", "moe_intermediate_size", "moe_impl",
                         "expert_parallel"})


def config_from_hf(hf: Mapping[str, Any], common: dict[str, Any]) -> ModelConfig:
    if hf.get("layer_types") and set(hf["layer_types"]) != {"sliding_attention"} and hf.get("sliding_window"):
        raise ValueError("mixtral: per-layer layer_types mixing full and sliding attention are not supported")
    N = hf["num_attention_heads"]
    H = hf.get("head_dim") or hf["hidden_size"] // N
    F = hf["intermediate_size"]
    return ModelConfig(
        **common, hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"], num_heads=N,
        num_kv_heads=hf.get("num_key_value_heads") or N, head_dim=H, intermediate_size=F,
        max_position_embeddings=hf.get("max_position_embeddings", 4096 * 32),
        norm_eps=hf.get("rms_norm_eps", 1e-5), activation=hf.get("hidden_act", "silu"),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        sliding_window=hf.get("sliding_window") or 0,
        num_experts=hf.get("num_local_experts", 8), num_experts_per_tok=hf.get("num_experts_per_tok", 2),
        moe_intermediate_size=F, **hf_rope(hf, H, 1.0),
    )


def config_from_gguf(meta: Mapping[str, Any], tensor_names: Collection[str], name: str = "") -> ModelConfig:
    """A `llama` GGUF with experts (llama.cpp writes Mixtral as llama + `llama.expert_count`)."""
    dense = llama.config_from_gguf(meta, tensor_names, name, experts=False)
    return dense.replace(
        architecture="mixtral", num_experts=int(meta["llama.expert_count"]),
        num_experts_per_tok=int(meta["llama.expert_used_count"]), moe_intermediate_size=dense.intermediate_size)


# Expert weights already stacked [X, ...], shared by every MoE family's map:
STACKED_EXPERTS_WEIGHT_MAP = {
    # transformers 5's in-memory layout (gate|up fused), should a file hold it
    "model.layers.{}.mlp.experts.gate_up_proj": (
        ("layers_{}.mlp.experts_gate_proj", "layers_{}.mlp.experts_up_proj"), "experts_gate_up"),
    "model.layers.{}.mlp.experts.down_proj": ("layers_{}.mlp.experts_down_proj", "experts_linear"),
    # stacked per projection [X, out, in]: what GGUF's ffn_*_exps tensors are named here
    "model.layers.{}.mlp.experts.gate_proj": ("layers_{}.mlp.experts_gate_proj", "experts_linear"),
    "model.layers.{}.mlp.experts.up_proj": ("layers_{}.mlp.experts_up_proj", "experts_linear"),
}
# llama.cpp's stacked expert tensors -> those names
GGUF_EXPERTS_TENSOR_MAP = {
    "blk.{}.ffn_gate_exps.weight": "model.layers.{}.mlp.experts.gate_proj",
    "blk.{}.ffn_up_exps.weight": "model.layers.{}.mlp.experts.up_proj",
    "blk.{}.ffn_down_exps.weight": "model.layers.{}.mlp.experts.down_proj",
}

_DENSE_MLP = {k for k in llama.HF_WEIGHT_MAP if ".mlp." in k}
HF_WEIGHT_MAP = {
    **{k: v for k, v in llama.HF_WEIGHT_MAP.items() if k not in _DENSE_MLP},
    # HF checkpoints: one tensor per expert, each stacked into slot {e} of our [X, ...] array
    "model.layers.{}.block_sparse_moe.gate.weight": ("layers_{}.mlp.gate.kernel", "linear"),
    "model.layers.{}.block_sparse_moe.experts.{e}.w1.weight": ("layers_{}.mlp.experts_gate_proj[{e}]", "linear"),
    "model.layers.{}.block_sparse_moe.experts.{e}.w3.weight": ("layers_{}.mlp.experts_up_proj[{e}]", "linear"),
    "model.layers.{}.block_sparse_moe.experts.{e}.w2.weight": ("layers_{}.mlp.experts_down_proj[{e}]", "linear"),
    "model.layers.{}.mlp.gate.weight": ("layers_{}.mlp.gate.kernel", "linear"),
    **STACKED_EXPERTS_WEIGHT_MAP,
}

GGUF_TENSOR_MAP = {
    **{k: v for k, v in llama.GGUF_TENSOR_MAP.items() if not k.startswith(("blk.{}.ffn_gate", "blk.{}.ffn_up",
                                                                           "blk.{}.ffn_down"))},
    "blk.{}.ffn_gate_inp.weight": "model.layers.{}.block_sparse_moe.gate.weight",
    **GGUF_EXPERTS_TENSOR_MAP,
    # GGUF files written before llama.cpp stacked the experts (early 2024)
    "blk.{}.ffn_gate.{e}.weight": "model.layers.{}.block_sparse_moe.experts.{e}.w1.weight",
    "blk.{}.ffn_up.{e}.weight": "model.layers.{}.block_sparse_moe.experts.{e}.w3.weight",
    "blk.{}.ffn_down.{e}.weight": "model.layers.{}.block_sparse_moe.experts.{e}.w2.weight",
}


def check(cfg: ModelConfig, fail) -> None:
    if not cfg.rotary_dim:
        fail("mixtral needs rotary embeddings (rotary_dim > 0)")
    if not cfg.num_experts:
        fail("mixtral has experts (num_experts > 0)")
    if cfg.layer_types:
        fail("mixtral's window is on every layer (no layer_types)")


FAMILY = ModelFamily(
    name="mixtral",
    model=llama.Llama,
    hf_architectures=("MixtralForCausalLM",),
    config_from_hf=config_from_hf,
    weight_map=HF_WEIGHT_MAP,
    base_prefix="model.",
    options=frozenset({"sliding_window", "rotary_dim", "rope_theta", "rope_scaling", "quantization"}) | MOE_OPTIONS,
    check=check,
    config_from_gguf=config_from_gguf,
    gguf_tensor_map=GGUF_TENSOR_MAP,
    gguf_permuted={"attn_q": "num_heads", "attn_k": "num_kv_heads"},
)
