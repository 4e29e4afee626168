"""ModelConfig: the static, hashable description of a model, from HF config.json or GGUF metadata.

A config that asks for something the models do not implement (an unknown architecture, a
rope_scaling type, a quantization scheme, cross attention) is a ValueError here, never a
silently wrong model later.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np

# HF `architectures` entry -> our architecture name (the key of pagedjax.models.MODELS)
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "GPT2LMHeadModel": "gpt2",
    "GPTNeoXForCausalLM": "gpt_neox",
    "OPTForCausalLM": "opt",
}
ARCHITECTURES = ("llama", "gpt2", "gpt_neox", "opt")
# HF activation names we implement (pagedjax.models.layers.ACTIVATIONS holds the functions)
ACTIVATIONS = ("silu", "swish", "relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "quick_gelu")
ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """HF rope_scaling for Llama: "default", "linear" (positions / factor) or "llama3"."""

    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only

    def __post_init__(self):
        if self.type not in ROPE_TYPES:
            raise ValueError(f"unsupported rope_scaling type {self.type!r} (supported: {ROPE_TYPES})")
        if self.factor <= 0 or (self.type == "llama3" and self.high_freq_factor <= self.low_freq_factor):
            raise ValueError(f"invalid rope_scaling {self}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Frozen, self-checking model description; hashable, so it can be pytree aux data."""

    architecture: str  # one of ARCHITECTURES
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
    attention_bias: bool = False  # biases on q, k, v and the output projection
    mlp_bias: bool = False
    # rotary embeddings (llama, gpt_neox); rotary_dim 0 means learned positions (gpt2, opt)
    rotary_dim: int = 0
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    parallel_residual: bool = False  # gpt_neox
    scale_attn_weights: bool = True  # gpt2: False drops the 1/sqrt(head_dim)
    scale_attn_by_inverse_layer_idx: bool = False  # gpt2
    do_layer_norm_before: bool = True  # opt (False: OPT-350m's post-norm)
    word_embed_proj_dim: int = 0  # opt: embedding width when it differs from hidden_size, else 0
    final_norm: bool = True  # opt: no final norm with post-norm layers
    norm_affine: bool = True  # opt: layer_norm_elementwise_affine
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = ""

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"ModelConfig {self.name or self.architecture}: {msg}")

        if self.architecture not in ARCHITECTURES:
            bad(f"unknown architecture {self.architecture!r} (supported: {ARCHITECTURES})")
        for f in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                  "intermediate_size", "max_position_embeddings"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) <= 0:
                bad(f"{f} must be a positive int, got {getattr(self, f)!r}")
        if self.num_heads % self.num_kv_heads:
            bad(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.activation not in ACTIVATIONS:
            bad(f"unsupported activation {self.activation!r} (supported: {ACTIVATIONS})")
        rotary = self.architecture in ("llama", "gpt_neox")
        if rotary and not (0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
            bad(f"rotary_dim {self.rotary_dim} must be even and in (0, head_dim {self.head_dim}]")
        if not rotary and self.rotary_dim:
            bad("learned-position architectures take no rotary_dim")
        if self.architecture != "llama" and self.num_heads * self.head_dim != self.hidden_size:
            bad("num_heads * head_dim must equal hidden_size")
        if self.architecture != "llama" and self.num_kv_heads != self.num_heads:
            bad("only llama has grouped-query attention")
        if self.architecture != "opt" and (self.word_embed_proj_dim or not self.do_layer_norm_before
                                           or not self.final_norm or not self.norm_affine):
            bad("word_embed_proj_dim / do_layer_norm_before / final_norm / norm_affine are OPT options")

    @property
    def embed_dim(self) -> int:
        """Width of the token embedding (OPT may project it to hidden_size)."""
        return self.word_embed_proj_dim or self.hidden_size

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (checked again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], name: str = "") -> ModelConfig:
        """Parses a HF config.json dict; ValueError for anything we do not implement."""
        arch = _hf_architecture(hf)
        if hf.get("quantization_config"):
            raise ValueError(f"quantized checkpoints are not supported (quantization_config "
                             f"{hf['quantization_config'].get('quant_method', '?')!r})")
        if hf.get("add_cross_attention") or hf.get("is_encoder_decoder"):
            raise ValueError("cross attention / encoder-decoder models are not supported")
        eos = hf.get("eos_token_id")
        common = dict(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
            name=name,
        )
        try:
            return _FROM_HF[arch](hf, common)
        except KeyError as e:
            raise ValueError(f"config.json for {arch} lacks the key {e}") from None

    @classmethod
    def from_gguf(cls, meta: Mapping[str, Any], tensor_names: Collection[str], name: str = "") -> ModelConfig:
        """Parses GGUF metadata (key -> value) of a LLaMA-family file."""
        arch = meta.get("general.architecture")
        if arch != "llama":
            raise ValueError(f"unsupported GGUF architecture {arch!r} (supported: 'llama')")
        g = lambda key, default=None: meta.get(f"llama.{key}", default)
        if "rope_freqs.weight" in tensor_names:
            raise ValueError("GGUF rope_freqs tensors (llama3 rope scaling) are not supported")
        scaling = g("rope.scaling.type", "none")
        if scaling not in ("none", "linear"):
            raise ValueError(f"unsupported GGUF rope scaling type {scaling!r}")
        rope = RopeScaling("linear", float(g("rope.scaling.factor"))) if scaling == "linear" else RopeScaling()
        D, N = int(g("embedding_length")), int(g("attention.head_count"))
        H = int(g("attention.key_length", D // N))
        if int(g("rope.dimension_count", H)) != H:
            raise ValueError("GGUF llama with partial rotary is not supported")
        eos = meta.get("tokenizer.ggml.eos_token_id")
        return cls(
            architecture="llama",
            vocab_size=int(g("vocab_size", 0)) or len(meta["tokenizer.ggml.tokens"]),
            hidden_size=D,
            num_layers=int(g("block_count")),
            num_heads=N,
            num_kv_heads=int(g("attention.head_count_kv", N)),
            head_dim=H,
            intermediate_size=int(g("feed_forward_length")),
            max_position_embeddings=int(g("context_length")),
            norm_eps=_f32(g("attention.layer_norm_rms_epsilon")),
            tie_word_embeddings="output.weight" not in tensor_names,
            rotary_dim=H,
            rope_theta=_f32(g("rope.freq_base", 10000.0)),
            rope_scaling=rope,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=() if eos is None else (int(eos),),
            name=name,
        )


def _f32(x) -> float:
    """A GGUF float32 as the shortest decimal that rounds to it (9.9999997e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def _hf_architecture(hf: Mapping[str, Any]) -> str:
    archs = hf.get("architectures") or []
    for a in archs:
        if a in HF_ARCHITECTURES:
            return HF_ARCHITECTURES[a]
    if archs:
        raise ValueError(f"unsupported architecture {archs} (supported: {sorted(HF_ARCHITECTURES)})")
    if hf.get("model_type") in ARCHITECTURES:
        return hf["model_type"]
    raise ValueError(f"unsupported model_type {hf.get('model_type')!r} and no known `architectures` "
                     f"(supported: {sorted(HF_ARCHITECTURES)})")


def _hf_rope(hf: Mapping[str, Any], head_dim: int, default_partial: float) -> dict[str, Any]:
    """rope fields from transformers 5 `rope_parameters` or the older rope_theta / rope_scaling."""
    p = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    kind = p.get("rope_type", p.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: {ROPE_TYPES})")
    theta = p.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
    partial = p.get("partial_rotary_factor", hf.get("partial_rotary_factor", hf.get("rotary_pct", default_partial)))
    fields = {f.name for f in dataclasses.fields(RopeScaling)} - {"type"}
    try:
        scaling = RopeScaling(kind, **{k: p[k] for k in fields if k in p}) if kind != "default" else RopeScaling()
        if kind == "linear" and "factor" not in p:
            raise KeyError("factor")
        if kind == "llama3" and not fields <= p.keys():
            raise KeyError(sorted(fields - p.keys()))
    except KeyError as e:
        raise ValueError(f"rope_scaling {kind!r} lacks {e}") from None
    return dict(rotary_dim=int(head_dim * partial), rope_theta=float(theta), rope_scaling=scaling)


def _llama(hf, common):
    N = hf["num_attention_heads"]
    H = hf.get("head_dim") or hf["hidden_size"] // N
    return ModelConfig(
        **common, hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"], num_heads=N,
        num_kv_heads=hf.get("num_key_value_heads") or N, head_dim=H,
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get("rms_norm_eps", 1e-6), activation=hf.get("hidden_act", "silu"),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        attention_bias=hf.get("attention_bias", False), mlp_bias=hf.get("mlp_bias", False),
        **_hf_rope(hf, H, 1.0),
    )


def _gpt2(hf, common):
    D, N = hf["n_embd"], hf["n_head"]
    return ModelConfig(
        **common, hidden_size=D, num_layers=hf["n_layer"], num_heads=N, num_kv_heads=N,
        head_dim=D // N, intermediate_size=hf.get("n_inner") or 4 * D,
        max_position_embeddings=hf["n_positions"], norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        activation=hf.get("activation_function", "gelu_new"),
        tie_word_embeddings=hf.get("tie_word_embeddings", True), attention_bias=True, mlp_bias=True,
        scale_attn_weights=hf.get("scale_attn_weights", True),
        scale_attn_by_inverse_layer_idx=hf.get("scale_attn_by_inverse_layer_idx", False),
    )


def _gpt_neox(hf, common):
    D, N = hf["hidden_size"], hf["num_attention_heads"]
    return ModelConfig(
        **common, hidden_size=D, num_layers=hf["num_hidden_layers"], num_heads=N, num_kv_heads=N,
        head_dim=D // N, intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get("layer_norm_eps", 1e-5), activation=hf.get("hidden_act", "gelu"),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        attention_bias=hf.get("attention_bias", True), mlp_bias=True,
        parallel_residual=hf.get("use_parallel_residual", True),
        **_hf_rope(hf, D // N, 0.25),
    )


def _opt(hf, common):
    D, N = hf["hidden_size"], hf["num_attention_heads"]
    proj = hf.get("word_embed_proj_dim") or D
    pre = hf.get("do_layer_norm_before", True)
    return ModelConfig(
        **common, hidden_size=D, num_layers=hf["num_hidden_layers"], num_heads=N, num_kv_heads=N,
        head_dim=D // N, intermediate_size=hf["ffn_dim"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        activation=hf.get("activation_function", "relu"),
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
        attention_bias=hf.get("enable_bias", True), mlp_bias=hf.get("enable_bias", True),
        do_layer_norm_before=pre, word_embed_proj_dim=proj if proj != D else 0,
        final_norm=pre and not hf.get("_remove_final_layer_norm", False),
        norm_affine=hf.get("layer_norm_elementwise_affine", True),
    )


_FROM_HF = {"llama": _llama, "gpt2": _gpt2, "gpt_neox": _gpt_neox, "opt": _opt}


def _named(name, **kw):
    return ModelConfig(name=name, **kw)


_TINY = dict(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, head_dim=16,
             intermediate_size=128, max_position_embeddings=128)
_LLAMA2 = dict(architecture="llama", vocab_size=32000, head_dim=128, max_position_embeddings=4096,
               rotary_dim=128, bos_token_id=1, eos_token_ids=(2,))
NAMED_CONFIGS: dict[str, ModelConfig] = {
    # tiny configs for tests
    "tiny-llama": _named("tiny-llama", architecture="llama", num_kv_heads=2, rotary_dim=16, **_TINY),
    "tiny-gpt2": _named("tiny-gpt2", architecture="gpt2", num_kv_heads=4, activation="gelu_new",
                        tie_word_embeddings=True, attention_bias=True, mlp_bias=True, **_TINY),
    "tiny-gpt-neox": _named("tiny-gpt-neox", architecture="gpt_neox", num_kv_heads=4, rotary_dim=4,
                            activation="gelu", attention_bias=True, mlp_bias=True, parallel_residual=True,
                            **_TINY),
    "tiny-opt": _named("tiny-opt", architecture="opt", num_kv_heads=4, activation="relu",
                       tie_word_embeddings=True, attention_bias=True, mlp_bias=True, **_TINY),
    # real architectures, for benchmarks on random weights
    "llama3-8b": _named("llama3-8b", architecture="llama", vocab_size=128256, hidden_size=4096,
                        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=14336,
                        max_position_embeddings=8192, rotary_dim=128, rope_theta=500000.0,
                        bos_token_id=128000, eos_token_ids=(128001, 128009)),
    "llama2-7b": _named("llama2-7b", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                        intermediate_size=11008, **_LLAMA2),
    "llama2-70b": _named("llama2-70b", hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8,
                         intermediate_size=28672, **_LLAMA2),
    "smollm2-135m": _named("smollm2-135m", architecture="llama", vocab_size=49152, hidden_size=576,
                           num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, intermediate_size=1536,
                           max_position_embeddings=8192, rotary_dim=64, rope_theta=100000.0,
                           tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,)),
}


def get_config(name: str) -> ModelConfig:
    """A named config from NAMED_CONFIGS (tiny ones for tests, real ones for benchmarks)."""
    if name not in NAMED_CONFIGS:
        raise ValueError(f"unknown model config {name!r} (known: {sorted(NAMED_CONFIGS)})")
    return NAMED_CONFIGS[name]
