"""Gemma 3 text models: Gemma 2's module with q/k norm, a 5:1 local/global layer pattern and a
rotary base of their own for the local layers (`rope_local_base_freq`); rope_scaling (linear, on
the 4B+ models) applies to the global layers only.

Serves `Gemma3ForCausalLM` checkpoints and the text model of `Gemma3ForConditionalGeneration`
ones (their `text_config`; the vision tower and projector are left out). The module is Gemma 2's
(`gemma2.Gemma`); what differs are features of the shared attention.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from pagedjax.models import gemma2
from pagedjax.models.config import ModelConfig, hf_rope
from pagedjax.models.family import ModelFamily

# Gemma3TextConfig's defaults, for keys a config.json leaves out (a multimodal checkpoint's
# text_config lists only what differs from them)
HF_DEFAULTS = dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh",
                   max_position_embeddings=131072, rms_norm_eps=1e-6, tie_word_embeddings=True,
                   query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=None,
                   attn_logit_softcapping=None, bos_token_id=2, eos_token_id=1)
SLIDING_WINDOW_PATTERN = 6  # every 6th layer global (Gemma3TextConfig's sliding_window_pattern)


def _rope(hf: Mapping[str, Any], head_dim: int) -> dict[str, Any]:
    """Global layers' rotary (rope_theta, rope_scaling) and the local layers' base."""
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:  # transformers 5: per layer type
        local = params.get("sliding_attention") or {}
        if local.get("rope_type", "default") != "default":
            raise ValueError(f"gemma3: rope scaling on the local layers ({local['rope_type']!r}) is not supported")
        rope = hf_rope({"rope_parameters": {"rope_theta": 1e6, **(params.get("full_attention") or {})}}, head_dim, 1.0)
        return dict(**rope, rope_local_theta=float(local.get("rope_theta", 10000.0)))
    rope = hf_rope({"rope_theta": 1e6, **hf}, head_dim, 1.0)
    return dict(**rope, rope_local_theta=float(hf.get("rope_local_base_freq", 10000.0)))


def config_from_hf(hf: Mapping[str, Any], common: dict[str, Any]) -> ModelConfig:
    L = hf["num_hidden_layers"]
    pattern = hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or SLIDING_WINDOW_PATTERN
    types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(L)]
    return ModelConfig(**gemma2.hf_features(hf, common, types), qk_norm=True, **_rope(hf, hf["head_dim"]))


def config_from_gguf(meta: Mapping[str, Any], tensor_names: Collection[str], name: str = "") -> ModelConfig:
    """llama.cpp's `gemma3.*` keys; like llama.cpp, the pattern is 5 local layers to 1 global and
    the local rotary base 10000 (neither is in the file)."""
    L = int(meta["gemma3.block_count"])
    types = ["sliding_attention" if (i + 1) % SLIDING_WINDOW_PATTERN else "full_attention" for i in range(L)]
    return ModelConfig(**gemma2.gguf_features("gemma3", meta, tensor_names, name, types), qk_norm=True,
                       rope_local_theta=10000.0)


HF_WEIGHT_MAP = {
    **gemma2.HF_WEIGHT_MAP,
    "model.layers.{}.self_attn.q_norm.weight": ("layers_{}.attn.q_norm.scale", "copy"),
    "model.layers.{}.self_attn.k_norm.weight": ("layers_{}.attn.k_norm.scale", "copy"),
}

GGUF_TENSOR_MAP = {
    **gemma2.GGUF_TENSOR_MAP,
    "blk.{}.attn_q_norm.weight": "model.layers.{}.self_attn.q_norm.weight",
    "blk.{}.attn_k_norm.weight": "model.layers.{}.self_attn.k_norm.weight",
}


def check(cfg: ModelConfig, fail) -> None:
    gemma2.check(cfg, fail)
    if not cfg.qk_norm:
        fail("gemma3 has q/k norm (qk_norm=True)")


FAMILY = ModelFamily(
    name="gemma3",
    model=gemma2.Gemma,
    hf_architectures=("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"),
    config_from_hf=config_from_hf,
    weight_map=HF_WEIGHT_MAP,
    base_prefix="model.",
    options=gemma2.OPTIONS | {"qk_norm", "rope_local_theta"},
    check=check,
    hf_model_types=("gemma3_text",),
    hf_defaults=HF_DEFAULTS,
    # transformers 5 and earlier names of the text model inside Gemma3ForConditionalGeneration
    hf_renames={"model.language_model.": "model.", "language_model.model.": "model.",
                "language_model.lm_head.": "lm_head."},
    hf_ignored=r"^(model\.)?(vision_tower|multi_modal_projector)\.",
    gguf_architectures=("gemma3",),
    config_from_gguf=config_from_gguf,
    gguf_tensor_map=GGUF_TENSOR_MAP,
    gguf_fix=gemma2.gguf_fix,
)
