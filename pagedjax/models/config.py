"""ModelConfig: the static, hashable description of a model, in features rather than family names.

A config is read from HF config.json or GGUF metadata by its family's model file (the registry in
`pagedjax.models` finds the family); shared math in `layers.py` selects by the feature fields here.
A config that asks for something its family does not implement (an unknown architecture, an
option the family does not declare, a rope_scaling type, a quantization scheme) is a ValueError
here, never a silently wrong model later.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pagedjax.quantization.config import QuantConfig

# HF activation names we implement (pagedjax.models.layers.ACTIVATIONS holds the functions)
ACTIVATIONS = ("silu", "swish", "relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "quick_gelu")
ROPE_TYPES = ("default", "linear", "llama3", "longrope", "yarn", "dynamic")
# RMSNorm (LLaMA's: x * w), Gemma's RMSNorm (x * (1 + w), in float32) or LayerNorm
NORMS = ("rms", "rms_unit_offset", "layer")
LAYER_TYPES = ("full_attention", "sliding_attention")  # HF's `layer_types` values
# How the experts of an MoE layer run (pagedjax.models.moe)
MOE_IMPLS = ("auto", "ragged", "capacity", "dense", "gather")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """HF rope_scaling: "default", "linear" (positions / factor), "llama3", "longrope" (Phi-3),
    "yarn" (Qwen2.5/3 long context, DeepSeek: frequencies ramped between the interpolated and the
    original ones, cos and sin scaled) or "dynamic" (dynamic NTK: past the model's
    max_position_embeddings, kept here as original_max_position_embeddings, the base grows with
    the sequence's length)."""

    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3, longrope, yarn, dynamic
    # longrope: per-frequency divisors [rotary_dim / 2] for sequences up to / past
    # original_max_position_embeddings; longrope and yarn: the factor on cos and sin (HF's attention_factor)
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0
    # yarn: the ramp between the rotation counts beta_fast and beta_slow over the original context
    # (its dims floored / ceiled unless truncate is False)
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True

    def __post_init__(self):
        if self.type not in ROPE_TYPES:
            raise ValueError(f"unsupported rope_scaling type {self.type!r} (supported: {ROPE_TYPES})")
        if self.factor <= 0 or (self.type == "llama3" and self.high_freq_factor <= self.low_freq_factor) or (
                self.type == "yarn" and (self.factor < 1 or self.beta_fast <= 0 or self.beta_slow <= 0)) or (
                self.type == "dynamic" and self.factor < 1):
            raise ValueError(f"invalid rope_scaling {self}")
        longrope = self.type == "longrope"
        if longrope != bool(self.short_factor) or longrope != bool(self.long_factor) or (
                len(self.short_factor) != len(self.long_factor)) or self.attention_factor <= 0:
            raise ValueError(f"invalid rope_scaling {self}: short_factor and long_factor (of equal length) "
                             f"are for longrope only, and needed there")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Frozen, self-checking model description; hashable, so it can be pytree aux data.

    The fields after `eos_token_ids` are features: each has a neutral default, and a family uses
    one only if its model file lists it in `ModelFamily.options` (checked here).
    """

    architecture: str  # the family's name in pagedjax.models.REGISTRY
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float = 1e-5
    activation: str = "silu"
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # batch-invariant numerics (EngineConfig.batch_invariant, every family): each matmul sums K in one
    # order whatever its row count (invariant_gemm) and each norm sums a row in one fixed order, so a
    # row's result does not depend on how many rows are beside it
    batch_invariant: bool = False
    # its GEMM (models/invariant_matmul.py: "tiles", "mosaic", "cublaslt", "cublaslt_m"), chosen by the engine for
    # its device and tensor-parallel size; None: as PAGEDJAX_BATCH_INVARIANT_MATMUL says ("tiles")
    invariant_gemm: str | None = None
    # its norms (models/layers.py invariant_norm_method: "tiles", "kernel"), chosen by the engine;
    # None: as PAGEDJAX_BATCH_INVARIANT_NORM says (unset: "kernel" on a GPU, else "tiles")
    invariant_norm: str | None = None
    # its attention kernel (attention.invariant_attention_method: "tensor_core", "tensor_core16",
    # "simt"), chosen by the engine; None: as PAGEDJAX_BATCH_INVARIANT_ATTENTION says ("tensor_core16")
    invariant_attention: str | None = None
    # its attention's fixed split size in positions (attention.invariant_split_size; 0: unsplit),
    # chosen by the engine; None: as PAGEDJAX_BATCH_INVARIANT_SPLIT says
    invariant_split: int | None = None
    name: str = ""
    # -- features
    norm: str = "rms"  # "rms" | "layer"
    norm_affine: bool = True  # False: LayerNorm without scale and bias (OPT)
    qkv_bias: bool = False  # biases on the q, k and v projections
    o_bias: bool = False  # bias on the attention output projection
    mlp_bias: bool = False
    # rotary embeddings; rotary_dim 0 means none (the family adds learned positions, or nothing)
    rotary_dim: int = 0
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    parallel_residual: bool = False  # x + attn(n1(x)) + mlp(n2(x)) (GPT-NeoX)
    scale_attn_weights: bool = True  # False drops the 1/sqrt(head_dim) (GPT-2)
    scale_attn_by_inverse_layer_idx: bool = False  # GPT-2
    do_layer_norm_before: bool = True  # False: post-norm layers (OPT-350m)
    word_embed_proj_dim: int = 0  # embedding width when it differs from hidden_size (OPT), else 0
    final_norm: bool = True  # False: no norm before the head (OPT with post-norm layers)
    qk_norm: bool = False  # the config's norm over head_dim on each q and k head, before rotary (Qwen3, Gemma 3)
    # sliding-window attention: a layer of type "sliding_attention" sees keys p - W < k <= p
    sliding_window: int = 0  # W; 0: none
    layer_types: tuple[str, ...] = ()  # per layer, LAYER_TYPES; (): every layer sliding when W > 0
    rope_local_theta: float = 0.0  # > 0: sliding layers' rotary base, without rope_scaling (Gemma 3)
    attn_logit_softcap: float = 0.0  # > 0: scores s become c * tanh(s / c) (Gemma 2)
    final_logit_softcap: float = 0.0  # > 0: the same on the output logits (Gemma 2)
    query_pre_attn_scalar: float = 0.0  # > 0: scores scaled by its ** -0.5 instead of head_dim ** -0.5 (Gemma)
    # mixture of experts (models/moe.py): num_experts 0 means a dense MLP in every layer
    num_experts: int = 0
    num_experts_per_tok: int = 0  # k: experts each token is routed to
    moe_intermediate_size: int = 0  # F of each expert's SwiGLU MLP
    norm_topk_prob: bool = True  # renormalize the k routing weights to sum to 1 (Mixtral; Qwen3-MoE's option)
    dense_layers: tuple[int, ...] = ()  # layers with a dense MLP of intermediate_size instead of experts
    moe_impl: str = "auto"  # how the experts run: models.moe.MOE_IMPLS (static)
    expert_parallel: bool = False  # experts split whole over the tp devices, not by MLP columns
    # quantized linears (pagedjax.quantization.QuantConfig): from config.json's quantization_config,
    # or online FP8 asked for at load time; None: every weight in the model's dtype
    quantization: QuantConfig | None = None

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"ModelConfig {self.name or self.architecture}: {msg}")

        from pagedjax.models.registry import REGISTRY  # the families (imported late: they import this file)

        family = REGISTRY.get(self.architecture)
        if family is None:
            bad(f"unknown architecture {self.architecture!r} (supported: {tuple(REGISTRY)})")
        for f in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                  "intermediate_size", "max_position_embeddings"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) <= 0:
                bad(f"{f} must be a positive int, got {getattr(self, f)!r}")
        if self.num_heads % self.num_kv_heads:
            bad(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.activation not in ACTIVATIONS:
            bad(f"unsupported activation {self.activation!r} (supported: {ACTIVATIONS})")
        if self.norm not in NORMS:
            bad(f"unsupported norm {self.norm!r} (supported: {NORMS})")
        if self.rotary_dim and not (0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
            bad(f"rotary_dim {self.rotary_dim} must be even and in (0, head_dim {self.head_dim}]")
        if not isinstance(self.sliding_window, int) or self.sliding_window < 0:
            bad(f"sliding_window must be an int >= 0, got {self.sliding_window!r}")
        if self.layer_types and (len(self.layer_types) != self.num_layers
                                 or not set(self.layer_types) <= set(LAYER_TYPES) or not self.sliding_window):
            bad(f"layer_types must name one of {LAYER_TYPES} per layer ({self.num_layers}), with a "
                f"sliding_window, got {self.layer_types!r}")
        for f in ("rope_local_theta", "attn_logit_softcap", "final_logit_softcap", "query_pre_attn_scalar"):
            if not getattr(self, f) >= 0:
                bad(f"{f} must be >= 0, got {getattr(self, f)!r}")
        scaling = self.rope_scaling
        if scaling.type == "longrope" and 2 * len(scaling.short_factor) != self.rotary_dim:
            bad(f"longrope factors have {len(scaling.short_factor)} entries, rotary_dim {self.rotary_dim} needs "
                f"{self.rotary_dim // 2}")
        if self.quantization is not None:
            from pagedjax.quantization.config import QuantConfig

            if not isinstance(self.quantization, QuantConfig):
                bad(f"quantization must be a QuantConfig or None, got {type(self.quantization).__name__}")
            if "quantization" not in family.options:
                bad(f"quantized checkpoints ({self.quantization.name!r}) are not supported for {self.architecture} "
                    f"(quantized families: those whose linears are plain nn.Linear, e.g. llama)")
        defaults = _feature_defaults()
        for f, default in defaults.items():
            value = getattr(self, f)
            if value != default and f not in family.options:
                bad(f"{f}={value!r} is not implemented for {self.architecture} "
                    f"(its options: {sorted(family.options) or 'none'})")
        if self.num_experts:
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                bad(f"num_experts_per_tok {self.num_experts_per_tok} must be in [1, num_experts {self.num_experts}]")
            if self.moe_intermediate_size <= 0:
                bad(f"moe_intermediate_size must be a positive int, got {self.moe_intermediate_size!r}")
        elif self.num_experts < 0:
            bad(f"num_experts must be >= 0, got {self.num_experts}")
        if self.moe_impl not in MOE_IMPLS:
            bad(f"moe_impl must be one of {MOE_IMPLS}, got {self.moe_impl!r}")
        if any(not 0 <= i < self.num_layers for i in self.dense_layers) or list(self.dense_layers) != sorted(
                set(self.dense_layers)):
            bad(f"dense_layers {self.dense_layers} must be sorted, distinct layer indices < {self.num_layers}")
        if family.check is not None:
            family.check(self, bad)

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of layer `layer`, or None where it attends to every earlier token."""
        if not self.sliding_window:
            return None
        sliding = not self.layer_types or self.layer_types[layer] == "sliding_attention"
        return self.sliding_window if sliding else None

    @property
    def kv_sliding_window(self) -> int:
        """The window every layer reads within (pages wholly behind it can be freed), else 0."""
        return self.sliding_window if all(self.layer_window(i) for i in range(self.num_layers)) else 0

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` routes its tokens to experts (else: a dense MLP)."""
        return self.num_experts > 0 and layer_idx not in self.dense_layers

    @property
    def embed_dim(self) -> int:
        """Width of the token embedding (OPT may project it to hidden_size)."""
        return self.word_embed_proj_dim or self.hidden_size

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (checked again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], name: str = "") -> ModelConfig:
        """Parses a HF config.json dict with its family's reader; ValueError for anything we do not implement."""
        from pagedjax.models.registry import config_from_hf

        return config_from_hf(hf, name)

    @classmethod
    def from_gguf(cls, meta: Mapping[str, Any], tensor_names, name: str = "") -> ModelConfig:
        """Parses GGUF metadata (key -> value) with its family's reader."""
        from pagedjax.models.registry import config_from_gguf

        return config_from_gguf(meta, tensor_names, name)


def _feature_defaults() -> dict[str, Any]:
    """The feature fields (those after `name`) and their neutral defaults."""
    fields = dataclasses.fields(ModelConfig)
    first = next(i for i, f in enumerate(fields) if f.name == "name") + 1
    return {f.name: f.default for f in fields[first:]}


# --- helpers the families' readers share ---------------------------------------------------------


def f32(x) -> float:
    """A GGUF float32 as the shortest decimal that rounds to it (9.9999997e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def hf_common(hf: Mapping[str, Any], architecture: str, name: str) -> dict[str, Any]:
    """The fields every family reads the same way from config.json."""
    eos = hf.get("eos_token_id")
    return dict(
        architecture=architecture,
        vocab_size=hf["vocab_size"],
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
        name=name,
    )


def hf_qwen_window(hf: Mapping[str, Any]) -> dict[str, Any]:
    """Qwen2/Qwen3's optional sliding window (`use_sliding_window`, off in the released checkpoints):
    on the layers from `max_window_layers` on, as transformers' `layer_types` (written in
    config.json by transformers 5, else derived the same way); {} when off."""
    W, n = hf.get("sliding_window"), hf["num_hidden_layers"]
    if not hf.get("use_sliding_window") or not W:
        return {}
    first = hf.get("max_window_layers", n)
    types = tuple(hf.get("layer_types") or ["sliding_attention" if i >= first else "full_attention" for i in range(n)])
    return {"sliding_window": int(W), "layer_types": types} if "sliding_attention" in types else {}


def hf_rope(hf: Mapping[str, Any], head_dim: int, default_partial: float) -> dict[str, Any]:
    """rope fields from transformers 5 `rope_parameters` or the older rope_theta / rope_scaling."""
    p = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    kind = p.get("rope_type", p.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: {ROPE_TYPES})")
    theta = p.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
    partial = p.get("partial_rotary_factor", hf.get("partial_rotary_factor", hf.get("rotary_pct", default_partial)))
    needs = {"linear": {"factor"}, "llama3": {"factor", "low_freq_factor", "high_freq_factor",
                                              "original_max_position_embeddings"},
             "longrope": {"short_factor", "long_factor", "original_max_position_embeddings"},
             "yarn": {"original_max_position_embeddings"}, "dynamic": {"factor"}}.get(kind, set())
    if not needs <= p.keys():
        raise ValueError(f"rope_scaling {kind!r} lacks {sorted(needs - p.keys())}")
    fields = {f.name for f in dataclasses.fields(RopeScaling)} - {"type"}
    kw = {k: tuple(map(float, v)) if isinstance(v, list) else v for k, v in p.items() if k in fields}
    if kind == "longrope":  # transformers' _compute_longrope_parameters
        orig = p["original_max_position_embeddings"]
        factor = p.get("factor") or hf.get("max_position_embeddings", orig) / orig
        kw["factor"] = 1.0
        if p.get("attention_factor") is None:
            kw["attention_factor"] = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(orig))
    if kind == "yarn":  # transformers' _compute_yarn_parameters
        orig = p["original_max_position_embeddings"]
        factor = p.get("factor") or hf.get("max_position_embeddings", orig) / orig
        kw["factor"] = float(factor)
        if p.get("attention_factor") is None:
            def mscale(scale, m=1.0):
                return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
            m, m_all = p.get("mscale"), p.get("mscale_all_dim")
            kw["attention_factor"] = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
        kw["beta_fast"] = float(p.get("beta_fast") or 32)
        kw["beta_slow"] = float(p.get("beta_slow") or 1)
        kw["truncate"] = bool(p.get("truncate", True))
    if kind == "dynamic":  # transformers' _compute_dynamic_ntk_parameters: the config's max_position_embeddings
        if "max_position_embeddings" not in hf:
            raise ValueError("rope_scaling 'dynamic' needs the config's max_position_embeddings")
        kw["original_max_position_embeddings"] = int(hf["max_position_embeddings"])
    scaling = RopeScaling(kind, **kw) if kind != "default" else RopeScaling()
    return dict(rotary_dim=int(head_dim * partial), rope_theta=float(theta), rope_scaling=scaling)


def gguf_rope_scaling(meta: Mapping[str, Any], arch: str) -> RopeScaling:
    """RopeScaling from llama.cpp's `<arch>.rope.scaling.*` keys: none, linear, or yarn (factor and
    original context, optional betas; its attention factor computed as transformers does). The
    YaRN overrides llama.cpp reads with other meanings (attn_factor, ext_factor, log multiplier)
    are refused rather than guessed."""
    g = lambda key, default=None: meta.get(f"{arch}.rope.scaling.{key}", default)  # noqa: E731
    kind = g("type", "none")
    if kind == "none":
        return RopeScaling()
    if kind == "linear":
        return RopeScaling("linear", float(g("factor")))
    if kind != "yarn":
        raise ValueError(f"unsupported GGUF rope scaling type {kind!r} for {arch} (supported: none, linear, yarn)")
    for key, neutral in (("yarn_attn_factor", 1.0), ("yarn_ext_factor", None), ("yarn_log_multiplier", 0.0)):
        if g(key) is not None and g(key) != neutral:
            raise ValueError(f"{arch}: GGUF YaRN with rope.scaling.{key}={g(key)} is not supported")
    if g("factor") is None or g("original_context_length") is None:
        raise ValueError(f"{arch}: GGUF YaRN needs rope.scaling.factor and rope.scaling.original_context_length")
    p = {"rope_type": "yarn", "factor": float(g("factor")),
         "original_max_position_embeddings": int(g("original_context_length"))}
    p.update({b: float(g(f"yarn_{b}")) for b in ("beta_fast", "beta_slow") if g(f"yarn_{b}") is not None})
    return hf_rope({"rope_parameters": p}, 2, 1.0)["rope_scaling"]


def get_config(name: str) -> ModelConfig:
    """A named config (tiny ones for tests, real ones for benchmarks): see models/named.py."""
    from pagedjax.models.named import NAMED_CONFIGS

    if name not in NAMED_CONFIGS:
        raise ValueError(f"unknown model config {name!r} (known: {sorted(NAMED_CONFIGS)})")
    return NAMED_CONFIGS[name]
