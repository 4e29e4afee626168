"""QuantConfig: how a checkpoint's linear layers are quantized, read from HF `quantization_config`.

Supported, as vLLM reads them:
  quant_method "fp8"                 HF fine-grained FP8 (`weight_block_size` [128, 128], tensors
                                     `weight` + `weight_scale_inv`), or a serialized FP8 checkpoint
                                     without blocks (per-tensor `weight_scale`, `input_scale` if static)
  quant_method "compressed-tensors"  llm-compressor FP8 ("float-quantized"): `weight` e4m3 +
                                     `weight_scale` per tensor / channel / 128x128 block, activations
                                     dynamic per token (or per 128-group for blocks) or static per tensor
                                     (`input_scale`); or weight-only (W8A16: no `input_activations`,
                                     per-tensor or per-channel weights, as vLLM's CompressedTensorsW8A16Fp8);
                                     with a static FP8 `kv_cache_scheme` (per tensor, or per kv head:
                                     strategy "attn_head"), each attention's `k_scale` / `v_scale`,
                                     read by an FP8 KV cache (kv_cache_dtype="fp8")
  quant_method "awq"                 AutoAWQ GEMM, 4 bits, zero point, any group size
  quant_method "gptq"                4 bits, group size or -1, act-order (desc_act: each input row's
                                     group from `g_idx`) or not; "gptq" (v1: stored zeros are
                                     zero - 1) or "gptq_v2" checkpoints
and `QuantConfig.online("fp8")`: bf16/f16 weights quantized at load time (e4m3, per-output-channel
scales, dynamic per-token activations).

Anything else is a ValueError naming the method and the field we cannot honour.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

WEIGHT_DTYPES = ("fp8", "int4")
# fp8: one scale per tensor, per output channel, or per (block_n x block_k) block; int4: per K-group
WEIGHT_STRATEGIES = ("tensor", "channel", "block", "group")
# fp8 activations: dynamic per token, dynamic per (token, block_k group), static per tensor
# (`input_scale` from the checkpoint); "none": weight-only (int4 W4A16, fp8 W8A16)
ACTIVATION_SCHEMES = ("token", "group", "static", "none")
# where the tensors come from (and so how formats.py reads them)
CHECKPOINT_FORMATS = ("hf-fp8", "compressed-tensors", "awq", "gptq", "gptq_v2", "online")
# static FP8 KV-cache scales in the checkpoint: none, one per tensor, or one per kv head
KV_CACHE_SCHEMES = (None, "tensor", "attn_head")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Frozen, hashable description of a quantized checkpoint (it can ride in a ModelConfig)."""

    method: str  # the HF quant_method ("fp8", "compressed-tensors", "awq", "gptq") or "online"
    checkpoint_format: str  # one of CHECKPOINT_FORMATS
    weight_dtype: str  # "fp8" (e4m3) or "int4"
    weight_strategy: str  # one of WEIGHT_STRATEGIES
    activation: str  # one of ACTIVATION_SCHEMES
    block_size: tuple[int, int] | None = None  # fp8 "block": (block_n, block_k), e.g. (128, 128)
    group_size: int = 0  # int4: K per group; -1: one group spans the whole K
    ignore: tuple[str, ...] = ()  # modules kept unquantized: names, dotted suffixes, or "re:<regex>"
    # "tensor": the checkpoint holds static per-tensor FP8 KV-cache scales (each attention's k_scale,
    # v_scale), used by an fp8 pool; "attn_head": one per kv head ([kv heads, 1, 1] each);
    # None: none (an fp8 pool then has unit scales, as in vLLM)
    kv_cache_scheme: str | None = None
    # int4 GPTQ desc_act: each input row's group read from the checkpoint's g_idx (the rows sorted by
    # it at load, their input channels in the layer param "perm")
    act_order: bool = False

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"QuantConfig({self.method}): {msg}")

        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            bad(f"unknown checkpoint_format {self.checkpoint_format!r} (supported: {CHECKPOINT_FORMATS})")
        if self.weight_dtype not in WEIGHT_DTYPES:
            bad(f"unknown weight_dtype {self.weight_dtype!r}")
        if self.weight_strategy not in WEIGHT_STRATEGIES:
            bad(f"unknown weight_strategy {self.weight_strategy!r}")
        if self.activation not in ACTIVATION_SCHEMES:
            bad(f"unknown activation scheme {self.activation!r}")
        if self.kv_cache_scheme not in KV_CACHE_SCHEMES:
            bad(f"unknown kv_cache_scheme {self.kv_cache_scheme!r} (supported: {KV_CACHE_SCHEMES})")
        if self.weight_dtype == "int4":
            if self.weight_strategy != "group" or self.activation != "none":
                bad("int4 weights are group-quantized and weight-only")
            if self.group_size != -1 and (self.group_size <= 0 or self.group_size % 8):
                bad(f"group_size {self.group_size} must be -1 or a positive multiple of 8")
            if self.act_order and self.group_size == -1:
                bad("act_order needs groups (group_size -1 is one group)")
        else:
            if self.act_order:
                bad("act_order is for int4 (GPTQ) weights")
            if self.weight_strategy == "group":
                bad("fp8 weights are quantized per tensor, channel or block, not per group")
            if (self.weight_strategy == "block") != (self.block_size is not None):
                bad("block_size goes with weight_strategy 'block' and only with it")
            if self.block_size is not None and (len(self.block_size) != 2 or min(self.block_size) <= 0):
                bad(f"block_size {self.block_size} must be two positive ints")
            if self.activation == "none" and self.weight_strategy == "block":
                bad("weight-only fp8 (W8A16) takes per-tensor or per-channel weight scales, not blocks")
            if self.activation == "group" and self.weight_strategy != "block":
                bad("per-group activation scales go with block weights")

    # --- construction ---------------------------------------------------------------------

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> QuantConfig | None:
        """The QuantConfig of a HF config.json dict, None when it has no `quantization_config`."""
        q = config.get("quantization_config")
        if not q:
            return None
        if not isinstance(q, Mapping):
            raise ValueError(f"quantization_config must be a dict, got {type(q).__name__}")
        method = q.get("quant_method")
        parse = _PARSERS.get(method)
        if parse is None:
            raise ValueError(f"quantization method {method!r} is not supported "
                             f"(quant_method: supported {sorted(_PARSERS)})")
        return parse(q)

    @classmethod
    def online(cls, method: str) -> QuantConfig:
        """Quantize a bf16/f16 checkpoint while loading it; only "fp8" (W8A8, per-channel) exists."""
        if method != "fp8":
            raise ValueError(f"online quantization method {method!r} is not supported (supported: 'fp8')")
        return cls(method="online", checkpoint_format="online", weight_dtype="fp8", weight_strategy="channel",
                   activation="token", ignore=("lm_head",))

    # --- queries ----------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """vLLM's name of the method (its `--quantization` value): "fp8" for online FP8 too."""
        return "fp8" if self.method == "online" else self.method

    @property
    def quantizes_experts(self) -> bool:
        """Whether an MoE model's experts are held quantized, weight-only: FP8 (online FP8 and
        per-channel FP8 checkpoints with one scale per expert and output channel, block FP8
        checkpoints with their block scales: expert_block_size) or int4 (AWQ and GPTQ checkpoints,
        their codes, zeros and scales per group: expert_group_size; with act order the codes' rows
        sorted by group and each input row's stored row). From a checkpoint they are its own codes and scales
        (quant_weights.py). Per-tensor FP8 checkpoints' experts are dequantized at load."""
        if self.weight_dtype == "int4":
            return True
        return self.method == "online" or self.weight_strategy in ("channel", "block")

    @property
    def expert_block_size(self) -> tuple[int, int] | None:
        """(block_n, block_k) of FP8 experts held with block scales, None for per-channel ones."""
        return self.block_size if self.quantizes_experts and self.weight_strategy == "block" else None

    @property
    def expert_group_size(self) -> int | None:
        """K per group of int4 experts held quantized (-1: one group over the whole K), else None."""
        return self.group_size if self.quantizes_experts and self.weight_dtype == "int4" else None

    def is_quantized(self, module: str) -> bool:
        """Whether the linear `module` (HF dotted name, e.g. "model.layers.0.mlp.up_proj") is quantized."""
        for pat in self.ignore:
            if pat.startswith("re:"):
                if re.match(pat[3:], module):
                    return False
            elif module == pat or module.endswith("." + pat) or module.startswith(pat + "."):
                return False
        return True

    def tensor_names(self) -> tuple[str, ...]:
        """Suffixes of one linear's checkpoint tensors ("<module>.<suffix>"); formats.py reads these.

        Optional ones (a static `input_scale`, GPTQ's `g_idx`) are listed too: the loader passes
        those it finds.
        """
        fmt = self.checkpoint_format
        if fmt == "online":
            return ("weight",)
        if fmt == "awq":
            return ("qweight", "qzeros", "scales")
        if fmt in ("gptq", "gptq_v2"):
            return ("qweight", "qzeros", "scales", "g_idx")
        if fmt == "hf-fp8" and self.weight_strategy == "block":
            return ("weight", "weight_scale_inv")
        return ("weight", "weight_scale") + (("input_scale",) if self.activation == "static" else ())


def resolve_quantization(checkpoint: QuantConfig | None, requested: str | None) -> QuantConfig | None:
    """The QuantConfig to load with: the checkpoint's own, or online FP8 for `requested="fp8"` on an
    unquantized checkpoint (vLLM's rules: a requested method must match the checkpoint's)."""
    if requested is None:
        return checkpoint
    if requested not in _PARSERS:
        raise ValueError(f"quantization {requested!r} is not supported (supported: {sorted(_PARSERS)})")
    if checkpoint is None:
        if requested != "fp8":
            raise ValueError(f"quantization={requested!r} needs a checkpoint quantized with it (a "
                             f"quantization_config in its config.json); online quantization exists for 'fp8' only")
        return QuantConfig.online("fp8")
    if checkpoint.name != requested:
        raise ValueError(f"quantization={requested!r} does not match the checkpoint's quantization_config "
                         f"(quant_method {checkpoint.name!r}): leave it unset, or pass {checkpoint.name!r}")
    return checkpoint


# --- parsers, one per quant_method ----------------------------------------------------------


def _fail(method: str, field: str, value: Any, why: str = "") -> None:
    raise ValueError(f"quantization method {method!r}: unsupported {field}={value!r}" + (f" ({why})" if why else ""))


def _ignore_list(q: Mapping[str, Any], key: str) -> tuple[str, ...]:
    v = q.get(key) or ()
    if isinstance(v, str) or not all(isinstance(s, str) for s in v):
        raise ValueError(f"quantization_config.{key} must be a list of module names, got {v!r}")
    return tuple(v)


def _parse_fp8(q: Mapping[str, Any]) -> QuantConfig:
    m = "fp8"
    if q.get("fmt", "e4m3") != "e4m3":
        _fail(m, "fmt", q["fmt"], "only e4m3 weights")
    if q.get("dequantize"):
        _fail(m, "dequantize", q["dequantize"])
    act = q.get("activation_scheme", "dynamic")
    if act not in ("dynamic", "static"):
        _fail(m, "activation_scheme", act)
    ignore = _ignore_list(q, "modules_to_not_convert") + _ignore_list(q, "ignored_layers")
    block = q.get("weight_block_size")
    if block is None:  # serialized per-tensor FP8 (vLLM / AutoFP8): weight_scale, input_scale if static
        return QuantConfig(m, "hf-fp8", "fp8", "tensor", "token" if act == "dynamic" else "static", ignore=ignore)
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        _fail(m, "weight_block_size", block, "expected [block_n, block_k]")
    if act != "dynamic":
        _fail(m, "activation_scheme", act, "block-wise weights take dynamic per-group activations")
    return QuantConfig(m, "hf-fp8", "fp8", "block", "group", block_size=tuple(block), ignore=ignore)


def _parse_awq(q: Mapping[str, Any]) -> QuantConfig:
    m = "awq"
    if q.get("bits") != 4:
        _fail(m, "bits", q.get("bits"), "only 4")
    version = str(q.get("version", "gemm")).lower()
    if version != "gemm":
        _fail(m, "version", q.get("version"), "only the GEMM packing")
    if q.get("zero_point", True) is not True:
        _fail(m, "zero_point", q.get("zero_point"), "only asymmetric AWQ with zero points")
    if q.get("do_fuse"):
        _fail(m, "do_fuse", q["do_fuse"])
    group = q.get("group_size", 128)
    if not isinstance(group, int) or not (group == -1 or (group > 0 and group % 8 == 0)):
        _fail(m, "group_size", group)
    return QuantConfig(m, "awq", "int4", "group", "none", group_size=group,
                       ignore=_ignore_list(q, "modules_to_not_convert"))


def _parse_gptq(q: Mapping[str, Any]) -> QuantConfig:
    m = "gptq"
    if q.get("bits") != 4:
        _fail(m, "bits", q.get("bits"), "only 4")
    if q.get("desc_act") not in (None, True, False):
        _fail(m, "desc_act", q["desc_act"], "expected true or false")
    if q.get("act_group_aware"):
        _fail(m, "act_group_aware", q["act_group_aware"], "group-aware act-order checkpoints are not supported")
    if q.get("is_marlin_format") or q.get("use_marlin"):
        _fail(m, "is_marlin_format", True, "Marlin-packed checkpoints are not supported")
    if q.get("lm_head"):
        _fail(m, "lm_head", q["lm_head"], "a quantized lm_head is not supported")
    if q.get("dynamic"):
        _fail(m, "dynamic", q["dynamic"], "per-module overrides are not supported")
    if q.get("pack_dtype", "int32") != "int32":
        _fail(m, "pack_dtype", q["pack_dtype"], "only int32 packing")
    if q.get("modules_in_block_to_quantize"):
        _fail(m, "modules_in_block_to_quantize", q["modules_in_block_to_quantize"])
    fmt = q.get("checkpoint_format", q.get("format", "gptq"))
    if fmt not in ("gptq", "gptq_v2"):
        _fail(m, "checkpoint_format", fmt, "only 'gptq' and 'gptq_v2'")
    group = q.get("group_size", 128)
    if not isinstance(group, int) or not (group == -1 or (group > 0 and group % 8 == 0)):
        _fail(m, "group_size", group)
    # sym only changes the stored zeros (all 8); the math reads them either way. desc_act with one
    # group (-1) reorders nothing: every row is in group 0.
    return QuantConfig(m, fmt, "int4", "group", "none", group_size=group,
                       ignore=_ignore_list(q, "modules_to_not_convert"),
                       act_order=bool(q.get("desc_act")) and group != -1)


def _parse_compressed_tensors(q: Mapping[str, Any]) -> QuantConfig:
    m = "compressed-tensors"
    kv = _kv_cache_scheme(m, q.get("kv_cache_scheme"))
    if q.get("sparsity_config"):
        _fail(m, "sparsity_config", q["sparsity_config"])
    if q.get("transform_config"):
        _fail(m, "transform_config", q["transform_config"])
    status = q.get("quantization_status", "compressed")
    if status not in ("compressed", "frozen"):
        _fail(m, "quantization_status", status, "weights must be stored quantized")
    groups = q.get("config_groups") or {}
    if len(groups) != 1:
        _fail(m, "config_groups", sorted(groups), "exactly one config group")
    (name, group), = groups.items()
    fmt = group.get("format") or q.get("format")
    if fmt not in ("float-quantized", "naive-quantized"):
        _fail(m, "format", fmt, "only FP8 'float-quantized'")
    targets = group.get("targets")
    if targets != ["Linear"]:
        _fail(m, f"config_groups.{name}.targets", targets, "only ['Linear']")
    if group.get("output_activations"):
        _fail(m, f"config_groups.{name}.output_activations", group["output_activations"])
    w, a = group.get("weights") or {}, group.get("input_activations")
    where = f"config_groups.{name}.weights"
    if w.get("type") != "float" or w.get("num_bits") != 8:
        _fail(m, where, {k: w.get(k) for k in ("type", "num_bits")}, "only 8-bit float (e4m3) weights")
    if w.get("symmetric") is False:
        _fail(m, f"{where}.symmetric", False)
    if w.get("dynamic"):
        _fail(m, f"{where}.dynamic", w["dynamic"])
    strategy = w.get("strategy")
    block = None
    if strategy == "block":
        block = w.get("block_structure")
        if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            _fail(m, f"{where}.block_structure", block, "expected [block_n, block_k]")
        block = tuple(block)
    elif strategy not in ("tensor", "channel"):
        _fail(m, f"{where}.strategy", strategy, "tensor, channel or block")
    if a is None:  # weight-only (W8A16): bf16 activations, the e4m3 weights converted in the dot
        if block is not None:
            _fail(m, f"config_groups.{name}.input_activations", None,
                  "weight-only FP8 (W8A16) with block weight scales is not supported")
        return QuantConfig(m, "compressed-tensors", "fp8", strategy, "none", ignore=_ignore_list(q, "ignore"),
                           kv_cache_scheme=kv)
    where = f"config_groups.{name}.input_activations"
    if a.get("type") != "float" or a.get("num_bits") != 8:
        _fail(m, where, {k: a.get(k) for k in ("type", "num_bits")}, "only 8-bit float activations")
    if a.get("symmetric") is False:
        _fail(m, f"{where}.symmetric", False)
    a_strategy, dynamic = a.get("strategy"), a.get("dynamic")
    if dynamic is True and a_strategy == "token":
        act = "token"
    elif dynamic is False and a_strategy == "tensor":
        act = "static"
    elif dynamic is True and a_strategy == "group" and block is not None and a.get("group_size") == block[1]:
        act = "group"
    else:
        _fail(m, where, {"strategy": a_strategy, "dynamic": dynamic, "group_size": a.get("group_size")},
              "dynamic per-token, static per-tensor, or dynamic per-group matching the weight blocks")
    if act == "token" and strategy == "block":
        _fail(m, where, a_strategy, "block weights take per-group activations")
    return QuantConfig(m, "compressed-tensors", "fp8", strategy, act, block_size=block,
                       ignore=_ignore_list(q, "ignore"), kv_cache_scheme=kv)


def _kv_cache_scheme(m: str, kv: Any) -> str | None:
    """llm-compressor's kv_cache_scheme: None, or "tensor" / "attn_head" for static 8-bit float K/V
    scales per tensor / per kv head (each attention's `k_scale`, `v_scale`: [1] / [kv heads, 1, 1]),
    the schemes vLLM's FP8 KV cache reads."""
    if not kv:
        return None
    if not isinstance(kv, Mapping):
        _fail(m, "kv_cache_scheme", kv, "expected a dict")
    if kv.get("type") != "float" or kv.get("num_bits") != 8:
        _fail(m, "kv_cache_scheme", {k: kv.get(k) for k in ("type", "num_bits")}, "only 8-bit float (e4m3) K/V")
    strategy = kv.get("strategy", "tensor")
    if strategy not in ("tensor", "attn_head"):
        _fail(m, "kv_cache_scheme.strategy", strategy, "only per-tensor or per-head ('attn_head') K/V scales")
    if kv.get("dynamic"):
        _fail(m, "kv_cache_scheme.dynamic", kv["dynamic"], "only static scales stored in the checkpoint")
    if kv.get("symmetric") is False:
        _fail(m, "kv_cache_scheme.symmetric", False)
    return strategy


_PARSERS = {"fp8": _parse_fp8, "awq": _parse_awq, "gptq": _parse_gptq, "compressed-tensors": _parse_compressed_tensors}
