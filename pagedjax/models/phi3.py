"""Phi-3 (and Phi-3.5 / Phi-4-mini): LLaMA's layer with fused qkv_proj and gate_up_proj in the
checkpoint, split at load time; rotary optionally partial and with longrope ("su") scaling.

The module is LLaMA's (`llama.Llama`). longrope picks its short or long factors by sequence
length as transformers does (layers.rope_angles). A `sliding_window` (Phi-3-mini-4k: 2047)
applies to every layer.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from pagedjax.models import llama
from pagedjax.models.config import ModelConfig, f32, hf_rope
from pagedjax.models.family import ModelFamily

PHI3_ROPE_TYPES = ("default", "longrope")  # Phi3Config accepts these ("su" and "yarn" read as longrope)


def config_from_hf(hf: Mapping[str, Any], common: dict[str, Any]) -> ModelConfig:
    N = hf["num_attention_heads"]
    H = hf.get("head_dim") or hf["hidden_size"] // N
    rope = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    kind = rope.get("rope_type", rope.get("type", "default"))
    kind = "longrope" if kind in ("su", "yarn") else kind  # Phi3Config's legacy names
    if kind not in PHI3_ROPE_TYPES:
        raise ValueError(f"phi3: unsupported rope_scaling type {kind!r} (supported: {PHI3_ROPE_TYPES})")
    if kind == "longrope":  # Phi3Config keeps original_max_position_embeddings at the top level, and it wins
        rope = {**rope, "rope_type": kind,
                "original_max_position_embeddings": hf.get("original_max_position_embeddings", 4096)}
    return ModelConfig(
        **common, hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"], num_heads=N,
        num_kv_heads=hf.get("num_key_value_heads") or N, head_dim=H, intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        norm_eps=hf.get("rms_norm_eps", 1e-5), activation=hf.get("hidden_act", "silu"),
        tie_word_embeddings=hf.get("tie_word_embeddings", False), sliding_window=hf.get("sliding_window") or 0,
        **hf_rope({**hf, "rope_scaling": None, "rope_parameters": rope}, H, 1.0),
    )


def config_from_gguf(meta: Mapping[str, Any], tensor_names: Collection[str], name: str = "") -> ModelConfig:
    """llama.cpp's `phi3.*` keys (half-split rotary: q/k rows are not permuted)."""
    if "rope_factors_long.weight" in tensor_names:
        raise ValueError("GGUF phi3 with longrope factor tensors (128k context models) is not supported")
    g = lambda key, default=None: meta.get(f"phi3.{key}", default)
    D, N = int(g("embedding_length")), int(g("attention.head_count"))
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return ModelConfig(
        architecture="phi3", vocab_size=int(g("vocab_size", 0)) or len(meta["tokenizer.ggml.tokens"]),
        hidden_size=D, num_layers=int(g("block_count")), num_heads=N,
        num_kv_heads=int(g("attention.head_count_kv", N)), head_dim=D // N,
        intermediate_size=int(g("feed_forward_length")), max_position_embeddings=int(g("context_length")),
        norm_eps=f32(g("attention.layer_norm_rms_epsilon")),
        tie_word_embeddings="output.weight" not in tensor_names,
        sliding_window=int(g("attention.sliding_window", 0)),
        rotary_dim=int(g("rope.dimension_count", D // N)), rope_theta=f32(g("rope.freq_base", 10000.0)),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_ids=() if eos is None else (int(eos),),
        name=name,
    )


def _targets(module: str, names: str) -> tuple[str, ...]:
    return tuple(f"layers_{{}}.{module}.{p}_proj.kernel" for p in names.split())


HF_WEIGHT_MAP = {
    **{k: v for k, v in llama.HF_WEIGHT_MAP.items() if "_proj." not in k},  # embeddings, norms, head
    "model.layers.{}.self_attn.qkv_proj.weight": (_targets("attn", "q k v"), "linear_split"),
    "model.layers.{}.self_attn.o_proj.weight": ("layers_{}.attn.o_proj.kernel", "linear"),
    "model.layers.{}.mlp.gate_up_proj.weight": (_targets("mlp", "gate up"), "linear_split"),
    "model.layers.{}.mlp.down_proj.weight": ("layers_{}.mlp.down_proj.kernel", "linear"),
}

GGUF_TENSOR_MAP = {
    **{k: v for k, v in llama.GGUF_TENSOR_MAP.items() if not any(p in k for p in ("attn_q", "attn_k", "attn_v",
                                                                                  "ffn_gate", "ffn_up"))},
    "blk.{}.attn_qkv.weight": "model.layers.{}.self_attn.qkv_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.gate_up_proj.weight",  # gate | up, as HF
}


def check(cfg: ModelConfig, fail) -> None:
    if not cfg.rotary_dim:
        fail("phi3 needs rotary embeddings (rotary_dim > 0)")
    if cfg.layer_types:
        fail("phi3's window is on every layer (no layer_types)")


FAMILY = ModelFamily(
    name="phi3",
    model=llama.Llama,
    hf_architectures=("Phi3ForCausalLM",),
    config_from_hf=config_from_hf,
    weight_map=HF_WEIGHT_MAP,
    base_prefix="model.",
    options=frozenset({"sliding_window", "rotary_dim", "rope_theta", "rope_scaling"}),
    check=check,
    gguf_architectures=("phi3",),
    config_from_gguf=config_from_gguf,
    gguf_tensor_map=GGUF_TENSOR_MAP,
)
