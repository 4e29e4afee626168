"""ModelFamily: everything pagedjax knows about one model family, declared in its model file.

A model file (`llama.py`, `gpt2.py`, ...) defines its Flax module and one `FAMILY`; the registry
(`registry.py`) lists the families, one line each. Nothing outside `pagedjax/models/` tests a
family's name: the loader reads the weight map and the GGUF tables from here, the config checks
read `options`, and the shared math in `layers.py` reads the config's feature fields.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import flax.linen as nn

# HF tensor name (layer index as {}) -> (our path, or paths for a fused tensor; how to convert).
# how: "copy" (same layout), "linear" (torch nn.Linear [out, in]: transposed), "split3" (GPT-2's
# fused Conv1D q|k|v along the last dim), "neox_qkv" (NeoX's fused Linear, q/k/v interleaved per
# head), "linear_split" (a fused Linear whose rows are the targets' outputs one after the other,
# of any sizes: Phi-3's qkv_proj and gate_up_proj), "experts_linear" (experts stacked,
# [X, out, in]: each transposed), "experts_gate_up" (the same with gate|up fused along out).
# Our kernels keep heads as separate dims, e.g. q_proj.kernel [D, N, H]. MoE checkpoints hold
# one tensor per expert: an expert index {e} in the HF name and "[{e}]" after our path stack
# them into slot e of our [X, ...] array.
WeightMap = Mapping[str, tuple[str | tuple[str, ...], str]]


@dataclass(frozen=True)
class ModelFamily:
    """One family: its module, the checkpoints it reads and the features it implements."""

    name: str  # ModelConfig.architecture
    model: type[nn.Module]  # (tokens [T], pages, meta) -> (logits [S, V] f32, pages)
    hf_architectures: tuple[str, ...]  # config.json "architectures" entries it serves
    config_from_hf: Callable[[Mapping[str, Any], dict[str, Any]], Any]  # (config.json, common fields) -> ModelConfig
    weight_map: WeightMap
    base_prefix: str  # the prefix of the base model, which bare checkpoints (GPT2Model, ...) lack
    # ModelConfig feature fields this family implements; any other set to a non-default value is refused
    options: frozenset[str] = frozenset()
    # Further constraints: check(config, fail) calls fail("message") for a config the family cannot run
    check: Callable[[Any, Callable[[str], None]], None] | None = None
    hf_model_types: tuple[str, ...] = ()  # config.json "model_type" values (when "architectures" is absent)
    gguf_architectures: tuple[str, ...] = ()  # GGUF "general.architecture" values
    config_from_gguf: Callable[..., Any] | None = None  # (metadata, tensor names, name) -> ModelConfig
    gguf_tensor_map: Mapping[str, str] = field(default_factory=dict)  # GGUF name -> HF name ({} = layer)
    # GGUF tensors whose rows llama.cpp permuted for its rotary layout: short name -> config field
    # holding their head count (they are un-permuted on load)
    gguf_permuted: Mapping[str, str] = field(default_factory=dict)
    # (GGUF name, float32 array) -> the array as the HF tensor holds it, for what llama.cpp's
    # converter changed beyond the names (Gemma's norms are stored as 1 + w)
    gguf_fix: Callable[[str, Any], Any] | None = None
    # checkpoint name prefix -> the weight map's (a multimodal checkpoint's text model: Gemma 3)
    hf_renames: Mapping[str, str] = field(default_factory=dict)
    # config.json values HF's config class assumes when a key is absent, where the reader needs
    # them (a multimodal checkpoint's text_config lists only what differs from them)
    hf_defaults: Mapping[str, Any] = field(default_factory=dict)
    hf_ignored: str = ""  # regex of checkpoint tensors that are not part of this model (a vision tower)
