"""Quantized linears at load time: a checkpoint's quantized tensors gathered by module and
converted, or float weights quantized online (FP8), then placed like any weight.

The loader (weights.py) plans the checkpoint against the model's float layout; this file takes
over for the linears the config quantizes (models/quantized.py says which):

  pre-quantized  every "<module>.<suffix>" tensor the QuantConfig names (AWQ qweight / qzeros /
                 scales, FP8 weight / weight_scale ...) leaves the plan and goes through
                 quantization.convert_checkpoint_linear, as the published layout says
  online FP8     the float kernel, converted to our layout as usual (and cached, for GGUF), is
                 read back as HF's [out, in] weight and quantized on the default device
  dequantized    a pre-quantized linear the model keeps in its dtype (an MoE model's routers,
                 and its experts for per-tensor FP8): its tensors are converted
                 as above, dequantized on the host CPU, and enter the plan as the float
                 "<module>.weight" HF would have saved
  FP8 experts    online FP8, or a per-channel or block FP8 checkpoint: each stacked expert leaf
                 [E, in, out] is quantized per expert and output channel (scale amax / 448), or per
                 expert and block for a block checkpoint. From a checkpoint the leaf holds its
                 dequantized weights, so the codes and scales are the checkpoint's own wherever a
                 channel's (block's) scale is its amax / 448 (llm-compressor's min-max observer,
                 and the published block-FP8 checkpoints': the largest weight is code 448); one
                 saved with a larger scale is rescaled to that and rounded again
  int4 experts   an AWQ or GPTQ checkpoint: each expert's qweight / qzeros / scales (/ g_idx)
                 leave the plan and are unpacked, not dequantized (AWQ's scales are searched, not
                 min-max: no requantization could give its codes back), and stacked per leaf:
                 "experts_<proj>" uint4 codes [E, K, N], "experts_<proj>_zero" uint8 [E, G, N]
                 (GPTQ v1's stored zero - 1 put back), "experts_<proj>_scale" f16 [E, G, N]; with
                 act order (GPTQ desc_act) each expert's codes have their rows sorted by its g_idx
                 and "experts_<proj>_rows" int32 [E, K] holds the stored row of each input row (the
                 inverse of that order, inverted here once rather than in every step)

Either way the QuantizedWeight's params land at "<module>.qvalue", "<module>.scale", ... in their
own dtypes, kv heads repeated whole (repeat_out_heads) when the mesh has more devices than kv
heads, each array straight into its sharding. Dims: K in_features, N out_features.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pagedjax.models import abstract_params
from pagedjax.models.config import ModelConfig
from pagedjax.models.moe import ROWS_SUFFIX, SCALE_SUFFIX, ZERO_SUFFIX
from pagedjax.models.quantized import kv_scale_tensors, quantized_linears
from pagedjax.quantization import QuantizedWeight, convert_checkpoint_linear, dequantize, repeat_out_heads
from pagedjax.quantization.formats import checkpoint_int4
from pagedjax.quantization.fp8 import quantize_experts_fp8
from pagedjax.quantization.weight import linear_features

# suffixes of quantized tensors, to say so when a checkpoint holds some we have no place for
_QUANT_SUFFIX = re.compile(r"\.(qweight|qzeros|scales|g_idx|weight_scale|weight_scale_inv|input_scale|"
                           r"k_scale|v_scale|output_scale)$")


def _pop_first(source: dict[str, Callable], names, prefix: str) -> Callable | None:
    """Removes and returns the reader of the first of `names` in `source`, each name tried as
    given and without the base model's prefix (as the loader allows for every tensor)."""
    for name in (n for hf in names for n in (hf, hf.removeprefix(prefix))):
        if name in source:
            return source.pop(name)
    return None


def flat(tree, is_leaf=None) -> dict[str, tuple[tuple[str, ...], Any]]:
    """{dotted path: (keys, leaf)} of a nested dict."""
    return {".".join(k.key for k in p): (tuple(k.key for k in p), x)
            for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]}


class QuantizedLinears:
    """The quantized linears of one load: which modules, their sizes, and placing their weights."""

    def __init__(self, config: ModelConfig, kv_repeat: int, desc: str):
        self.config, self.qcfg, self.desc, self.kv_repeat = config, config.quantization, desc, kv_repeat
        self.kv_scales = kv_scale_tensors(config)  # our param path -> its checkpoint names
        shapes, axes = abstract_params(config)
        leaves = flat(shapes)
        # our module path -> HF module name, of the linears this model has (an MoE family's map
        # names a dense MLP and a router for every layer; the router is never quantized)
        self.modules = {m: hf for m, hf in quantized_linears(config).items() if f"{m}.qvalue" in leaves}
        # FP8 experts of an MoE model (QuantConfig.quantizes_experts): each stacked expert leaf (e4m3)
        self.experts = {t for t, (_, s) in leaves.items()
                        if t.rsplit(".", 1)[-1].startswith("experts_") and s.dtype == jnp.float8_e4m3fn}
        # int4 experts: each stacked expert leaf (uint4), filled from the checkpoint's codes
        self.int4_experts = {t for t, (_, s) in leaves.items()
                             if t.rsplit(".", 1)[-1].startswith("experts_") and s.dtype == jnp.uint4}
        quantized = self.experts | self.int4_experts
        self.shapes = {t: v for t, v in leaves.items()
                       if t.rsplit(".", 1)[0] in self.modules or t in self.kv_scales or t in quantized
                       or any(t.removesuffix(sfx) in quantized for sfx in (SCALE_SUFFIX, ZERO_SUFFIX, ROWS_SUFFIX))}
        self.taken_experts: dict[str, dict[int, tuple[str, dict[str, Callable]]]] = {}  # leaf -> {e: module's}
        self.axes = {t: a for t, (_, a) in flat(axes, lambda x: isinstance(x, jax.sharding.PartitionSpec)).items()
                     if t in self.shapes}
        # module -> (K, N); our float kernel of it reshapes to [K, N] (contracted dims first)
        self.dims = {m: linear_features(self.qcfg.weight_dtype, self.shapes[f"{m}.qvalue"][1].shape)
                     for m in self.modules}

    @property
    def online(self) -> bool:
        """Whether float weights are quantized here (online FP8) rather than read quantized."""
        return self.qcfg.checkpoint_format == "online"

    def kernels(self) -> set[str]:
        """Our float kernels ("<module>.kernel") these linears stand in for."""
        return {f"{m}.kernel" for m in self.modules}

    # --- pre-quantized checkpoints ------------------------------------------------------------

    def take(self, source: dict[str, Callable[[], np.ndarray]], prefix: str) -> dict[str, dict[str, Callable]]:
        """Removes each quantized module's tensors from `source`: {module: {suffix: reader}}.

        Names may lack the base model's prefix, as the loader allows for every tensor."""
        taken = {}
        for m, hf in self.modules.items():
            tensors = {}
            for sfx in self.qcfg.tensor_names():
                read = _pop_first(source, [f"{hf}.{sfx}"], prefix)
                if read is not None:
                    tensors[sfx] = read
            taken[m] = tensors
        return taken

    def take_experts(self, source: dict[str, Callable[[], np.ndarray]], table: dict[str, Any],
                     prefix: str) -> set[str]:
        """Removes each int4 expert's tensors from `source` (the experts of `table`, the expanded
        weight map, whose targets are "<leaf>[e]" slots of int4 expert leaves); returns those targets.

        Names may lack the base model's prefix, as the loader allows for every tensor."""
        filled, missing = set(), {}
        for hf, (target, _) in table.items():
            if not (isinstance(target, str) and target.endswith("]")):
                continue
            leaf, slot = target[:-1].split("[")
            if leaf not in self.int4_experts:
                continue
            module = hf.removesuffix(".weight")
            tensors = {}
            for sfx in self.qcfg.tensor_names():
                read = _pop_first(source, [f"{module}.{sfx}"], prefix)
                if read is not None:
                    tensors[sfx] = read
            if "qweight" not in tensors:
                missing[target] = module
                continue
            self.taken_experts.setdefault(leaf, {})[int(slot)] = module, tensors
            filled.add(target)
        lacking = [m for t, m in missing.items() if t not in filled]
        if lacking:
            raise ValueError(f"{self.desc}: checkpoint lacks {lacking[0]}.qweight ({self.qcfg.name} experts are "
                             f"held as the checkpoint's int4 codes; {len(lacking)} expert projections lack theirs)")
        return filled

    def load_experts(self, place: Callable[[str, np.ndarray], None]) -> None:
        """Unpacks each int4 expert taken by take_experts and places its leaves: codes [E, K, N]
        (uint4), zeros [E, G, N] (uint8) and scales [E, G, N], and with act order the stored row of
        each input row [E, K] (int32; the codes' rows sorted by group), one leaf at a time."""
        for leaf, slots in sorted(self.taken_experts.items()):
            names = [leaf + sfx for sfx in ("", ZERO_SUFFIX, SCALE_SUFFIX)]
            names += [leaf + ROWS_SUFFIX] if self.qcfg.act_order else []
            parts = []  # per expert: (codes, zeros, scales[, input rows])
            for e in range(len(slots)):
                module, readers = slots[e]
                try:
                    q, *rest = checkpoint_int4(self.qcfg, {sfx: read() for sfx, read in readers.items()})
                    if self.qcfg.act_order:  # perm (input row of each stored row) -> its inverse
                        rest[2] = np.argsort(rest[2], kind="stable").astype(np.int32)
                    parts.append((q, *rest))
                except ValueError as err:
                    raise ValueError(f"{self.desc}: {module} ({self.qcfg.name}): {err}") from None
            for t, parts_t in zip(names, zip(*parts)):
                a, want = np.stack(parts_t), self.shapes[t][1]
                if a.shape != want.shape:
                    raise ValueError(f"{self.desc}: {slots[0][0]} and its fellow experts stack to {list(a.shape)} "
                                     f"for {t}, this config needs {list(want.shape)}")
                cast = a.astype(want.dtype)
                if t.endswith(SCALE_SUFFIX) and not np.array_equal(cast.astype(a.dtype), a):
                    raise ValueError(f"{self.desc}: {slots[0][0]} scales in {a.dtype} do not fit {want.dtype}")
                place(t, cast)
        self.taken_experts.clear()

    def take_dequantized(self, source: dict[str, Callable[[], np.ndarray]]) -> list[str]:
        """Replaces the quantized tensors of each linear the model keeps in its dtype (any left in
        `source` after `take` and `take_experts`: MoE routers, experts not held quantized) by one reader of its dequantized float weight
        [out, in] (f32) under "<module>.weight"; returns those modules. A module is found by its
        format's own tensor (`weight_scale`, `weight_scale_inv` or `qweight`)."""
        if self.online:
            return []
        names = self.qcfg.tensor_names()
        marker = next(n for n in names if n not in ("weight", "input_scale", "g_idx"))
        modules = [name.removesuffix(f".{marker}") for name in source if name.endswith(f".{marker}")]
        for m in modules:
            tensors = {sfx: source.pop(f"{m}.{sfx}") for sfx in names if f"{m}.{sfx}" in source}
            source[f"{m}.weight"] = functools.partial(self._dequantized, m, tensors)
        return modules

    def _dequantized(self, module: str, tensors: dict[str, Callable]) -> np.ndarray:
        try:
            w = convert_checkpoint_linear(self.qcfg, {sfx: read() for sfx, read in tensors.items()})
        except ValueError as e:
            raise ValueError(f"{self.desc}: {module} ({self.qcfg.name}): {e}") from None
        with jax.default_device(jax.devices("cpu")[0]):  # on the host, one linear at a time
            return np.asarray(dequantize(w), np.float32)  # [out, in]

    def take_kv_scales(self, source: dict[str, Callable[[], np.ndarray]], prefix: str) -> dict[str, Callable]:
        """Removes each attention's FP8 KV-cache scale from `source`: {our param: reader}."""
        taken = {}
        for t, names in self.kv_scales.items():
            taken[t] = _pop_first(source, names, prefix)
            if taken[t] is None:
                raise ValueError(f"{self.desc}: checkpoint lacks the KV-cache scale {names[0]} (its "
                                 f"quantization_config has a kv_cache_scheme)")
        return taken

    def load_kv_scales(self, taken: dict[str, Callable], place: Callable[[str, np.ndarray], None]) -> None:
        """Places each KV-cache scale as f32, once checked finite and > 0: a scalar per tensor, or
        [kv heads] per head ("attn_head"; each head repeated as the kv heads are under tp)."""
        per_head = self.qcfg.kv_cache_scheme == "attn_head"
        n = self.config.num_kv_heads if per_head else 1
        for t, read in taken.items():
            a = np.asarray(read(), np.float32)
            if a.size != n or not np.isfinite(a).all() or not (a > 0).all():
                what = f"{n} finite values > 0 (one per kv head" if per_head else "one finite value > 0 (per tensor"
                raise ValueError(f"{self.desc}: KV-cache scale {self.kv_scales[t][0]} must be {what}: "
                                 f"kv_cache_scheme {self.qcfg.kv_cache_scheme!r}), got shape {list(a.shape)}: "
                                 f"{a.ravel()[:4].tolist()}")
            place(t, np.repeat(a.reshape(n), self.kv_repeat) if per_head else a.reshape(()))

    def load(self, taken: dict[str, dict[str, Callable]], place: Callable[[str, np.ndarray], None]) -> None:
        """Converts each module's tensors (the published layout -> ours) and places its params."""
        for m, readers in taken.items():
            try:
                w = convert_checkpoint_linear(self.qcfg, {sfx: read() for sfx, read in readers.items()})
            except ValueError as e:
                raise ValueError(f"{self.desc}: {self.modules[m]} ({self.qcfg.name}): {e}") from None
            self.place(m, w, place)

    # --- online FP8, FP8 experts ----------------------------------------------------------------

    def place_kernel(self, t: str, arr: np.ndarray, place: Callable[[str, np.ndarray], None]) -> bool:
        """Quantizes a float kernel in our layout (online FP8, or an FP8 expert leaf, whose float
        weights a checkpoint's codes and scales dequantized to) and places it; False if `t` is not one."""
        if t in self.experts:  # [E, in, out]: per expert and output channel, or per expert and block
            q, s = quantize_experts_fp8(jnp.asarray(arr), self.qcfg.expert_block_size)
            place(t, np.asarray(q))
            place(t + SCALE_SUFFIX, np.asarray(s))
            return True
        m = t.removesuffix(".kernel")
        if not self.online or m == t or m not in self.modules:
            return False
        K, N = self.dims[m]
        w_hf = np.asarray(arr).reshape(K, N).T  # [N, K]: HF's nn.Linear weight
        self.place(m, convert_checkpoint_linear(self.qcfg, {"weight": w_hf}), place)
        return True

    # --- placing --------------------------------------------------------------------------------

    def place(self, m: str, w: QuantizedWeight, place: Callable[[str, np.ndarray], None]) -> None:
        """Checks w against the model's shapes, repeats kv heads, and places each param."""
        K, N = self.dims[m]
        if (w.in_features, w.out_features) != (K, N):
            raise ValueError(f"{self.desc}: {self.modules[m]} is [out={w.out_features}, in={w.in_features}], "
                             f"this config needs [out={N}, in={K}]")
        params = w.params()
        want = {t.rsplit(".", 1)[1] for t in self.shapes if t.rsplit(".", 1)[0] == m}
        if set(params) != want:
            raise ValueError(f"{self.desc}: {self.modules[m]} has params {sorted(params)}, the model {sorted(want)}")
        for name, a in params.items():
            _, s = self.shapes[f"{m}.{name}"]
            a = np.asarray(a)
            if a.shape != s.shape:
                raise ValueError(f"{self.desc}: {self.modules[m]}.{name} is {list(a.shape)}, expected {list(s.shape)}")
            if a.dtype != s.dtype:  # int4 scales of another float dtype: kept only if exactly representable
                cast = a.astype(s.dtype)
                if not np.array_equal(cast.astype(a.dtype), a):
                    raise ValueError(f"{self.desc}: {self.modules[m]}.{name} in {a.dtype} does not fit {s.dtype}")
                params[name] = cast
        if self.kv_repeat > 1 and "kv_heads" in tuple(self.axes[f"{m}.qvalue"]):
            w = dataclasses.replace(w, **params)
            params = repeat_out_heads(w, self.config.num_kv_heads, self.kv_repeat).params()
        for name, a in params.items():
            place(f"{m}.{name}", np.asarray(a))

    def unexpected_message(self, names: list[str]) -> str:
        """Why checkpoint tensors had no place, when some of them are quantized ones."""
        quant = [n for n in names if _QUANT_SUFFIX.search(n)]
        if not quant:
            return ""
        return (f" (quantized tensors of modules this model keeps in its dtype, such as the LM head, or a "
                f"{self.qcfg.name} layout we do not read: {quant[:4]})")

