"""Qwen3-MoE: Qwen3's attention (q/k RMSNorm, GQA, rotary) with top-k of many small SwiGLU experts.

Dims: D hidden, X experts, F expert MLP width (`moe_intermediate_size`).
The module is LLaMA's (`llama.Llama`) with the shared `qk_norm` feature and, per layer, the
shared `layers.SparseMoeBlock` or a dense MLP of `intermediate_size`: HF's rule (layer i is sparse
unless i is in `mlp_only_layers`, or (i + 1) is not a multiple of `decoder_sparse_step`) becomes
`dense_layers`. Routing is HF's `Qwen3MoeTopKRouter`: softmax in float32, top k, renormalized
only with `norm_topk_prob`. Checkpoints: per-expert `mlp.experts.{e}.gate_proj/up_proj/down_proj`
stacked at load (or transformers 5's fused layout); GGUF files of llama.cpp's `qwen3moe`.
`use_sliding_window` puts the window on every layer, as HF does (no released checkpoint sets it).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from pagedjax.models import llama, mixtral, qwen3
from pagedjax.models.config import ModelConfig, hf_rope
from pagedjax.models.family import ModelFamily


def config_from_hf(hf: Mapping[str, Any], common: dict[str, Any]) -> ModelConfig:
    N = hf["num_attention_heads"]
    H = hf.get("head_dim") or hf["hidden_size"] // N
    L = hf["num_hidden_layers"]
    X = hf.get("num_experts", hf.get("num_local_experts", 128))  # saved as num_local_experts by transformers 5
    step, mlp_only = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or ())
    if X and (not isinstance(step, int) or step < 1):
        raise ValueError(f"qwen3_moe: decoder_sparse_step must be an int >= 1, got {step!r}")
    sparse = [X > 0 and i not in mlp_only and (i + 1) % step == 0 for i in range(L)]
    bias = hf.get("attention_bias", False)
    moe = dict(num_experts=X, num_experts_per_tok=hf.get("num_experts_per_tok", 8),
               moe_intermediate_size=hf.get("moe_intermediate_size", 768),
               norm_topk_prob=hf.get("norm_topk_prob", False)) if any(sparse) else {}
    return ModelConfig(
        **common, hidden_size=hf["hidden_size"], num_layers=L, num_heads=N,
        num_kv_heads=hf.get("num_key_value_heads") or N, head_dim=H, intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 32768),
        norm_eps=hf.get("rms_norm_eps", 1e-6), activation=hf.get("hidden_act", "silu"),
        tie_word_embeddings=hf.get("tie_word_embeddings", False), qkv_bias=bias, o_bias=bias, qk_norm=True,
        sliding_window=(hf.get("sliding_window") or 0) if hf.get("use_sliding_window") else 0,
        dense_layers=tuple(i for i in range(L) if not sparse[i]) if any(sparse) else (), **moe,
        **hf_rope(hf, H, 1.0),
    )


def config_from_gguf(meta: Mapping[str, Any], tensor_names: Collection[str], name: str = "") -> ModelConfig:
    """llama.cpp's `qwen3moe.*` keys: Qwen3's, plus the experts (every layer sparse; the top k
    renormalized unless `expert_weights_norm` says otherwise, as llama.cpp's graph does)."""
    g = lambda key, default=None: meta.get(f"qwen3moe.{key}", default)
    as_qwen3 = {k.replace("qwen3moe.", "qwen3.", 1): v for k, v in meta.items()}
    as_qwen3.setdefault("qwen3.feed_forward_length", g("expert_feed_forward_length"))  # no dense layer: unused
    dense = qwen3.config_from_gguf(as_qwen3, tensor_names, name)
    return dense.replace(architecture="qwen3_moe", num_experts=int(g("expert_count")),
                         num_experts_per_tok=int(g("expert_used_count")),
                         moe_intermediate_size=int(g("expert_feed_forward_length")),
                         norm_topk_prob=bool(g("expert_weights_norm", True)))


HF_WEIGHT_MAP = {
    **qwen3.HF_WEIGHT_MAP,  # attention, q/k norms, the dense layers' MLP
    "model.layers.{}.mlp.gate.weight": ("layers_{}.mlp.gate.kernel", "linear"),  # the router
    # HF checkpoints: one tensor per expert, each stacked into slot {e} of our [X, ...] array
    **{f"model.layers.{{}}.mlp.experts.{{e}}.{p}_proj.weight": (f"layers_{{}}.mlp.experts_{p}_proj[{{e}}]", "linear")
       for p in ("gate", "up", "down")},
    **mixtral.STACKED_EXPERTS_WEIGHT_MAP,
}

GGUF_TENSOR_MAP = {
    **qwen3.GGUF_TENSOR_MAP,  # a dense layer's ffn_gate / ffn_up / ffn_down included
    "blk.{}.ffn_gate_inp.weight": "model.layers.{}.mlp.gate.weight",
    **mixtral.GGUF_EXPERTS_TENSOR_MAP,
}


def check(cfg: ModelConfig, fail) -> None:
    if not cfg.rotary_dim:
        fail("qwen3_moe needs rotary embeddings (rotary_dim > 0)")
    if not cfg.qk_norm:
        fail("qwen3_moe has q/k norm (qk_norm=True)")
    if cfg.layer_types:
        fail("qwen3_moe's window is on every layer (no layer_types)")


FAMILY = ModelFamily(
    name="qwen3_moe",
    model=llama.Llama,
    hf_architectures=("Qwen3MoeForCausalLM",),
    config_from_hf=config_from_hf,
    weight_map=HF_WEIGHT_MAP,
    base_prefix="model.",
    options=frozenset({"qkv_bias", "o_bias", "qk_norm", "sliding_window", "rotary_dim", "rope_theta",
                       "rope_scaling", "norm_topk_prob", "dense_layers", "quantization"}) | mixtral.MOE_OPTIONS,
    check=check,
    gguf_architectures=("qwen3moe",),
    config_from_gguf=config_from_gguf,
    gguf_tensor_map=GGUF_TENSOR_MAP,
)
