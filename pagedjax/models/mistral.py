"""Mistral: LLaMA's layer with sliding-window attention on every layer when `sliding_window` is set.

The module is LLaMA's (`llama.Llama`); the window is the shared `sliding_window` feature of
`layers.Attention`. Since every layer reads within the window, the KV-cache manager frees the
pages a request's window has passed (`ModelConfig.kv_sliding_window`). Mistral GGUF files
are llama.cpp's `llama` architecture and load as `llama` (llama.cpp keeps no window there).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pagedjax.models import llama
from pagedjax.models.config import ModelConfig, hf_rope
from pagedjax.models.family import ModelFamily


def config_from_hf(hf: Mapping[str, Any], common: dict[str, Any]) -> ModelConfig:
    if hf.get("layer_types") and set(hf["layer_types"]) != {"sliding_attention"} and hf.get("sliding_window"):
        raise ValueError("mistral: per-layer layer_types mixing full and sliding attention are not supported")
    N = hf["num_attention_heads"]
    H = hf.get("head_dim") or hf["hidden_size"] // N
    return ModelConfig(
        **common, hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"], num_heads=N,
        num_kv_heads=hf.get("num_key_value_heads") or N, head_dim=H,
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 131072),
        norm_eps=hf.get("rms_norm_eps", 1e-6), activation=hf.get("hidden_act", "silu"),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        sliding_window=hf.get("sliding_window") or 0,
        **hf_rope(hf, H, 1.0),
    )


def check(cfg: ModelConfig, fail) -> None:
    if not cfg.rotary_dim:
        fail("mistral needs rotary embeddings (rotary_dim > 0)")
    if cfg.layer_types:
        fail("mistral's window is on every layer (no layer_types)")


FAMILY = ModelFamily(
    name="mistral",
    model=llama.Llama,
    hf_architectures=("MistralForCausalLM",),
    config_from_hf=config_from_hf,
    weight_map=llama.HF_WEIGHT_MAP,
    base_prefix="model.",
    options=frozenset({"sliding_window", "rotary_dim", "rope_theta", "rope_scaling", "quantization"}),
    check=check,
)
