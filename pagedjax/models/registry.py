"""The model registry: one line per family, and the lookups from a checkpoint to its family.

Adding a family is one new model file (its module and its `FAMILY`) and one line in FAMILIES.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from pagedjax.models import gemma2, gemma3, gpt2, gpt_neox, llama, mistral, mixtral, opt, phi3, qwen2, qwen3, qwen3_moe
from pagedjax.models.family import ModelFamily

FAMILIES: tuple[ModelFamily, ...] = (
    llama.FAMILY,
    gpt2.FAMILY,
    gpt_neox.FAMILY,
    opt.FAMILY,
    qwen2.FAMILY,
    qwen3.FAMILY,
    mistral.FAMILY,
    gemma2.FAMILY,
    gemma3.FAMILY,
    phi3.FAMILY,
    mixtral.FAMILY,
    qwen3_moe.FAMILY,
)

REGISTRY: dict[str, ModelFamily] = {f.name: f for f in FAMILIES}
_BY_HF = {arch: f for f in FAMILIES for arch in f.hf_architectures}
_BY_MODEL_TYPE = {t: f for f in FAMILIES for t in (f.name, *f.hf_model_types)}
_BY_GGUF = {arch: f for f in FAMILIES for arch in f.gguf_architectures}


def family(name: str) -> ModelFamily:
    """The family registered under `name` (a ModelConfig.architecture)."""
    if name not in REGISTRY:
        raise ValueError(f"no model for architecture {name!r} (have {sorted(REGISTRY)})")
    return REGISTRY[name]


def family_for_hf(hf: Mapping[str, Any]) -> ModelFamily:
    """The family of a HF config.json: by `architectures`, else by `model_type`."""
    archs = hf.get("architectures") or []
    for a in archs:
        if a in _BY_HF:
            return _BY_HF[a]
    if archs:
        raise ValueError(f"unsupported architecture {archs} (supported: {sorted(_BY_HF)})")
    if hf.get("model_type") in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[hf["model_type"]]
    raise ValueError(f"unsupported model_type {hf.get('model_type')!r} and no known `architectures` "
                     f"(supported: {sorted(_BY_HF)})")


def config_from_hf(hf: Mapping[str, Any], name: str = ""):
    """A ModelConfig from a HF config.json dict; ValueError for anything we do not implement."""
    from pagedjax.models.config import hf_common
    from pagedjax.quantization.config import QuantConfig

    fam = family_for_hf(hf)
    archs = hf.get("architectures")
    if hf.get("add_cross_attention") or hf.get("is_encoder_decoder"):
        raise ValueError("cross attention / encoder-decoder models are not supported")
    quantization = QuantConfig.from_hf(hf)  # ValueError for a method or option we cannot honour
    if "vocab_size" not in hf and isinstance(hf.get("text_config"), Mapping):
        # a multimodal checkpoint: its text model (the token ids may be given at the top level)
        hf = {**{k: hf[k] for k in ("bos_token_id", "eos_token_id") if k in hf}, **hf["text_config"],
              "architectures": archs}
    hf = {**fam.hf_defaults, **hf}
    common = hf_common(hf, fam.name, name)
    if quantization is not None:
        common["quantization"] = quantization
    try:
        return fam.config_from_hf(hf, common)
    except KeyError as e:
        raise ValueError(f"config.json for {fam.name} lacks the key {e}") from None


def family_for_gguf(meta: Mapping[str, Any]) -> ModelFamily:
    """The family of a GGUF file, by its general.architecture."""
    arch = meta.get("general.architecture")
    fam = _BY_GGUF.get(arch)
    if fam is None or fam.config_from_gguf is None:
        raise ValueError(f"unsupported GGUF architecture {arch!r} (supported: {sorted(_BY_GGUF)})")
    return fam


def config_from_gguf(meta: Mapping[str, Any], tensor_names: Collection[str], name: str = ""):
    """A ModelConfig from GGUF metadata (key -> value) and the file's tensor names."""
    return family_for_gguf(meta).config_from_gguf(meta, tensor_names, name)
