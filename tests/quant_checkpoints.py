"""Tiny quantized HF checkpoints written in the published layouts, and their float64 reference.

`write(fmt, folder, model)` quantizes the linears of a tiny HF Llama (q/k/v/o, gate/up/down; the
LM head and embeddings stay float) with this file's own round-to-nearest quantizers, packs the
codes with the independent packers of tests/quant_oracle.py, and saves model.safetensors and a
config.json carrying the method's quantization_config. It returns a `Reference`: the HF model in
float64 with each linear's weight replaced by its dequantized value, and, for W8A8 formats,
forward pre-hooks that fake-quantize each linear's input with torch's own float8_e4m3fn cast (per
token, per 128-group or static per tensor), so the reference quantizes activations with nothing
of pagedjax.

Layouts, as the tools write them:
  compressed-tensors float-quantized (llm-compressor; compressed_tensors/quantization/lifecycle,
    vLLM's CompressedTensorsW8A8Fp8): `weight` e4m3 [out, in], `weight_scale` f32 [out, 1]
    (channel) or [1] (tensor), `input_scale` f32 [1] (static activations); w = weight * scale.
    Weight-only (vLLM's CompressedTensorsW8A16Fp8): the same tensors, `input_activations` null
  HF fine-grained FP8 (transformers integrations/finegrained_fp8.py, DeepSeek-V3): `weight` e4m3
    [out, in], `weight_scale_inv` f32 [ceil(out/128), ceil(in/128)] multiplying its block
  compressed-tensors FP8 KV cache (llm-compressor's kv_cache_scheme, strategy "tensor"; vLLM's
    BaseKVCacheMethod): each attention's `k_scale` / `v_scale` f32 [1], K (after rotary) and V
    stored as e4m3(x / scale); here the scales of each layer are half its amax / 448 over the
    calibration prompts, so the largest K and V saturate and a scale left unread shows.
    Strategy "attn_head" (compressed-tensors' QuantizationStrategy.ATTN_HEAD, whose scales are
    [num heads, 1, 1] over K and V [batch, kv heads, seq, head_dim]): one scale per kv head, each
    half its head's amax / 448
  AutoAWQ GEMM (awq/modules/linear/gemm.py WQLinear_GEMM.from_linear): `qweight` int32 [in, out/8],
    `qzeros` int32 [in/group, out/8] (both with AWQ's nibble order), `scales` f16 [in/group, out]
  AutoGPTQ (nn_modules/qlinear/qlinear_cuda_old.py QuantLinear.pack): `qweight` int32 [in/8, out],
    `qzeros` int32 [in/group, out/8] storing zero - 1 (v1), `scales` f16, `g_idx` int32 [in]
    With desc_act (auto_gptq/quantization/gptq.py GPTQ.fasterquant, actorder=True): the input
    rows are quantized in the order perm (descending Hessian diagonal), group i covering perm's
    positions [i * group, (i + 1) * group); the codes are put back in the rows' own order before
    packing, and g_idx[perm[j]] = j // group, so a group's rows are scattered over `in`. Here perm
    is a random permutation of each linear (no Hessian), which exercises the same layout.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from safetensors.torch import save_file

from pagedjax import parallel
from pagedjax.attention import build_metadata
from pagedjax.kv_cache.page_pool import init_pages
from pagedjax.models import get_model
from tests.quant_oracle import awq_pack, gptq_pack_qweight, gptq_pack_qzeros

E4M3 = torch.float8_e4m3fn
PAGE, NUM_PAGES = 8, 32  # the pool `forward` runs through
TIGHT = 3e-5  # per-position error of float32 rounding (measured: int4 <= 8e-6, W8A8 ~5e-7)
FLIP = 0.1  # W8A8: a position where an activation rounded to the neighbouring e4m3 code (measured <= 0.02)
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")

CT_GROUP = {"targets": ["Linear"], "output_activations": None,
            "weights": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "group_size": None,
                        "block_structure": None}}
CONFIGS = {  # quantization_config blocks, as each tool writes them
    "ct-fp8-channel": {
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "ignore": ["lm_head"], "kv_cache_scheme": None, "config_groups": {"group_0": {
            **CT_GROUP, "weights": {**CT_GROUP["weights"], "strategy": "channel"},
            "input_activations": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token",
                                  "dynamic": True, "group_size": None}}}},
    "ct-fp8-channel-kv": {
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "ignore": ["lm_head"], "config_groups": {"group_0": {
            **CT_GROUP, "weights": {**CT_GROUP["weights"], "strategy": "channel"},
            "input_activations": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token",
                                  "dynamic": True, "group_size": None}}},
        "kv_cache_scheme": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor",
                            "dynamic": False, "group_size": None, "observer": "minmax"}},
    "ct-fp8-tensor-static": {
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "ignore": ["lm_head"], "config_groups": {"group_0": {
            **CT_GROUP, "weights": {**CT_GROUP["weights"], "strategy": "tensor"},
            "input_activations": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor",
                                  "dynamic": False}}}},
    "ct-fp8-channel-w8a16": {
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "ignore": ["lm_head"], "config_groups": {"group_0": {
            **CT_GROUP, "weights": {**CT_GROUP["weights"], "strategy": "channel"}, "input_activations": None}}},
    "hf-fp8-block": {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                     "weight_block_size": [128, 128], "modules_to_not_convert": ["lm_head"]},
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"},
    "awq-g64": {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm"},
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": False,
             "checkpoint_format": "gptq"},
    "gptq-act-order": {"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": True, "sym": False,
                       "static_groups": False, "checkpoint_format": "gptq"},
}
CONFIGS["ct-fp8-channel-kv-head"] = {**CONFIGS["ct-fp8-channel-kv"], "kv_cache_scheme": {
    **CONFIGS["ct-fp8-channel-kv"]["kv_cache_scheme"], "strategy": "attn_head"}}


ROW_PARALLEL = ("self_attn.o_proj", "mlp.down_proj")  # split along K under tensor parallelism


@dataclass
class Reference:
    """The HF model in float64 with dequantized weights and fake-quantized activations."""

    model: torch.nn.Module
    activation: str | None = None  # "token", "group", "static", or None (weight-only)
    input_scales: dict[str, float] = field(default_factory=dict)
    # per layer (k_scale, v_scale), each a float or one per kv head: an FP8 KV cache
    kv_scales: list[tuple[Any, Any]] | None = None
    hooks: list = field(default_factory=list)

    def hook(self, row_shards: int = 1) -> Reference:
        """(Re)installs the activation hooks; row_shards > 1 quantizes the inputs of row-parallel
        linears per token and per shard of K, as each of row_shards devices does with its slice."""
        for h in self.hooks:
            h.remove()
        self.hooks = []
        if self.activation is None:
            return self
        for name, mod in self.model.named_modules():
            if name.endswith(LINEARS):
                scale = self.input_scales.get(name)
                shards = row_shards if name.endswith(ROW_PARALLEL) and self.activation == "token" else 1
                hook = _activation_hook(self.activation, scale, shards=shards)
                self.hooks.append(mod.register_forward_pre_hook(hook))
        return self

    def logits(self, ids: list[int]) -> np.ndarray:
        """float64 logits [len(ids), V] of one sequence (K and V fake-quantized while it runs, for
        an FP8 KV cache: the rotary patch is module-wide, so it is in place for this call only)."""
        kv = []
        if self.kv_scales is not None:
            def one(x, s, head_axis):  # K [B, kv heads, T, H] (head axis 1), V [B, T, kv heads * H] (2)
                s = torch.tensor(s, dtype=torch.float64)
                if s.ndim == 0:
                    return fake_quant(x.to(torch.float64), s)
                heads = x.unflatten(-1, (len(s), -1)) if head_axis == 2 else x  # V: [B, T, kv heads, H]
                shape = [1] * heads.ndim
                shape[head_axis] = len(s)
                return fake_quant(heads.to(torch.float64), s.reshape(shape)).reshape(x.shape)
            kv = _kv_hooks(self.model, lambda i, k: one(k, self.kv_scales[i][0], 1),
                           lambda i, v: one(v, self.kv_scales[i][1], 2))
        try:
            with torch.no_grad():
                return self.model(torch.tensor([ids])).logits[0].numpy()
        finally:
            for h in kv:
                h.remove()


class _Hook:
    """A removable patch of modeling_llama.apply_rotary_pos_emb: K after rotary through on_k(layer, k)."""

    def __init__(self, model, on_k):
        from transformers.models.llama import modeling_llama

        self.module, self.rope, self.layer = modeling_llama, modeling_llama.apply_rotary_pos_emb, [0]
        self.pre = [layer.self_attn.register_forward_pre_hook(lambda m, a, i=i: self.layer.__setitem__(0, i))
                    for i, layer in enumerate(model.model.layers)]

        def rope(q, k, *args, **kwargs):
            q, k = self.rope(q, k, *args, **kwargs)
            return q, on_k(self.layer[0], k)
        modeling_llama.apply_rotary_pos_emb = rope

    def remove(self):
        self.module.apply_rotary_pos_emb = self.rope
        for h in self.pre:
            h.remove()


def _kv_hooks(model, on_k, on_v) -> list:
    """Hooks passing each layer's K (after rotary) and V, as the KV cache stores them, through
    on_k(layer, k) / on_v(layer, v), whose results the attention then reads."""
    hooks = [_Hook(model, on_k)]
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.self_attn.v_proj.register_forward_hook(lambda m, a, out, i=i: on_v(i, out)))
    return hooks


def calibrate_kv(model, prompts: list[list[int]], per_head: bool = False) -> list[tuple[Any, Any]]:
    """Each layer's (amax K after rotary, amax V) over the prompts (the float model): floats, or
    per_head arrays [kv heads]."""
    heads = model.config.num_key_value_heads
    amax = [[np.zeros(heads) if per_head else 0.0] * 2 for _ in model.model.layers]

    def seen(i, j, x, head_axis):
        if per_head:  # K [B, kv heads, T, H], V [B, T, kv heads * H]
            h = x.unflatten(-1, (heads, -1)) if head_axis == 2 else x
            dims = [d for d in range(h.ndim) if d != head_axis]
            amax[i][j] = np.maximum(amax[i][j], h.abs().amax(dim=dims).double().numpy())
        else:
            amax[i][j] = max(amax[i][j], float(x.abs().max()))
        return x
    hooks = _kv_hooks(model, lambda i, k: seen(i, 0, k, 1), lambda i, v: seen(i, 1, v, 2))
    try:
        with torch.no_grad():
            for p in prompts:
                model(torch.tensor([p]))
    finally:
        for h in hooks:
            h.remove()
    return [tuple(a) for a in amax]


def fake_quant(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale saturated to +-448, cast by torch to float8_e4m3fn, times scale (float64)."""
    return (x / scale).clamp(-448, 448).to(E4M3).to(torch.float64) * scale


def _activation_hook(kind: str, input_scale: float | None = None, group: int = 128, shards: int = 1):
    def hook(module, args):
        x = args[0].to(torch.float64)
        if kind == "static":
            return (fake_quant(x, torch.tensor(input_scale, dtype=torch.float64)),)
        if kind == "token" and shards == 1:
            s = (x.abs().amax(-1, keepdim=True) / 448).clamp(min=1e-12)  # [..., 1]
            return (fake_quant(x, s),)
        if kind == "token":  # per token and per shard of K
            return (fake_quant_groups(x, x.shape[-1] // shards),)
        return (fake_quant_groups(x, group),)
    return hook


def fake_quant_groups(x: torch.Tensor, group: int) -> torch.Tensor:
    """Each token's K in groups of `group`, each with its own amax / 448 scale."""
    g = x.reshape(*x.shape[:-1], -1, group)  # [..., KB, group]
    s = (g.abs().amax(-1, keepdim=True) / 448).clamp(min=1e-12)
    return fake_quant(g, s).reshape(x.shape)


# --- the quantizers, one per format: weight [N, K] float -> (tensors, dequantized float64 [N, K]) -----


def _fp8_channel(w: torch.Tensor):
    scale = (w.abs().amax(1, keepdim=True) / 448).float()  # [N, 1]
    codes = (w / scale).clamp(-448, 448).to(E4M3)
    return {"weight": codes, "weight_scale": scale}, codes.double() * scale.double()


def _fp8_tensor(w: torch.Tensor):
    scale = (w.abs().amax() / 448).float().reshape(1)  # [1]
    codes = (w / scale).clamp(-448, 448).to(E4M3)
    return {"weight": codes, "weight_scale": scale}, codes.double() * scale.double()


def _fp8_block(w: torch.Tensor, b: int = 128):
    N, K = w.shape
    blocks = w.reshape(N // b, b, K // b, b)
    scale = (blocks.abs().amax(dim=(1, 3)) / 448).float()  # [NB, KB]: weight_scale_inv multiplies
    full = scale.repeat_interleave(b, 0).repeat_interleave(b, 1)  # [N, K]
    codes = (w / full).clamp(-448, 448).to(E4M3)
    return {"weight": codes, "weight_scale_inv": scale}, codes.double() * full.double()


def _int4_rtn(w: np.ndarray, group: int, zmin: int):
    """Round-to-nearest asymmetric int4 per (group, out column): codes [K, N], zeros, f16 scales [G, N]."""
    wk = w.T.astype(np.float64)  # [K, N]
    K, N = wk.shape
    g = wk.reshape(K // group, group, N)
    lo, hi = g.min(1), g.max(1)  # [G, N]
    s = ((hi - lo) / 15).astype(np.float16)
    s64 = s.astype(np.float64)
    z = np.clip(np.round(-lo / s64), zmin, 15)
    q = np.clip(np.round(g / s64[:, None]) + z[:, None], 0, 15).reshape(K, N)
    deq = (q - np.repeat(z, group, 0)) * np.repeat(s64, group, 0)  # [K, N]
    return q.astype(np.uint8), z.astype(np.uint8), s, deq.T


def _awq(w: torch.Tensor, group: int):
    q, z, s, deq = _int4_rtn(w.double().numpy(), group, zmin=0)
    t = {"qweight": awq_pack(q), "qzeros": awq_pack(z), "scales": s}
    return {k: torch.from_numpy(v) for k, v in t.items()}, torch.from_numpy(deq)


def _gptq(w: torch.Tensor, group: int, v1: bool = True):
    # v1 stores zero - 1, so a zero point of 0 cannot be written: zeros are clipped to [1, 15] here
    q, z, s, deq = _int4_rtn(w.double().numpy(), group, zmin=1 if v1 else 0)
    K = q.shape[0]
    t = {"qweight": gptq_pack_qweight(q), "qzeros": gptq_pack_qzeros(z, v1=v1), "scales": s,
         "g_idx": (np.arange(K) // group).astype(np.int32)}
    return {k: torch.from_numpy(v) for k, v in t.items()}, torch.from_numpy(deq)


def _gptq_act_order(w: torch.Tensor, group: int):
    """GPTQ with desc_act: rows quantized in a random order perm, put back before packing."""
    wn = w.double().numpy()  # [N, K]
    K = wn.shape[1]
    perm = np.random.default_rng([K, wn.shape[0], int(abs(wn).sum() * 1e6) % 2**31]).permutation(K)
    q_p, z, s, deq_p = _int4_rtn(wn[:, perm], group, zmin=1)  # codes [K, N] in perm's order
    q = np.empty_like(q_p)
    q[perm] = q_p  # row perm[j] of the weight is the j-th quantized
    deq = np.empty_like(deq_p)
    deq[:, perm] = deq_p
    g_idx = np.empty(K, np.int32)
    g_idx[perm] = np.arange(K) // group
    t = {"qweight": gptq_pack_qweight(q), "qzeros": gptq_pack_qzeros(z, v1=True), "scales": s, "g_idx": g_idx}
    return {k: torch.from_numpy(v) for k, v in t.items()}, torch.from_numpy(deq)


QUANTIZERS = {"ct-fp8-channel": _fp8_channel, "ct-fp8-tensor-static": _fp8_tensor, "hf-fp8-block": _fp8_block,
              "ct-fp8-channel-w8a16": _fp8_channel, "ct-fp8-channel-kv": _fp8_channel,
              "ct-fp8-channel-kv-head": _fp8_channel,
              "awq": lambda w: _awq(w, 128), "awq-g64": lambda w: _awq(w, 64), "gptq": lambda w: _gptq(w, 128),
              "gptq-act-order": lambda w: _gptq_act_order(w, 64)}
ACTIVATIONS = {"ct-fp8-channel": "token", "ct-fp8-channel-kv": "token", "ct-fp8-channel-kv-head": "token", "ct-fp8-tensor-static": "static", "hf-fp8-block": "group"}


def calibrate(model, prompts: list[list[int]]) -> dict[str, float]:
    """Static input scales: amax / 448 of each linear's input over the prompts (the float model)."""
    amax, hooks = {}, []
    for name, mod in model.named_modules():
        if name.endswith(LINEARS):
            def hook(m, args, name=name):
                amax[name] = max(amax.get(name, 0.0), float(args[0].abs().max()))
            hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        for p in prompts:
            model(torch.tensor([p]))
    for h in hooks:
        h.remove()
    return {k: v / 448 for k, v in amax.items()}


def write(fmt: str, folder: Path, model, calibration: list[list[int]] | None = None) -> Reference:
    """Writes `model` (a tiny HF Llama, float32) quantized as `fmt` into folder; returns its reference."""
    folder.mkdir(parents=True, exist_ok=True)
    act = ACTIVATIONS.get(fmt)
    input_scales = calibrate(model, calibration) if act == "static" else {}
    ref = copy.deepcopy(model).double().eval()
    tensors = {}
    for name, t in model.state_dict().items():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module.endswith(LINEARS):
            q, deq = QUANTIZERS[fmt](t.detach().float())
            tensors.update({f"{module}.{k}": v.contiguous() for k, v in q.items()})
            if act == "static":
                tensors[f"{module}.input_scale"] = torch.tensor([input_scales[module]], dtype=torch.float32)
            ref.get_submodule(module).weight.data = deq.to(torch.float64)
        else:
            tensors[name] = t.detach().contiguous()
    kv_scales = None
    if CONFIGS[fmt].get("kv_cache_scheme"):  # half the calibration amax / 448: the largest K, V saturate
        kv_scales = []
        per_head = CONFIGS[fmt]["kv_cache_scheme"]["strategy"] == "attn_head"
        for i, amax in enumerate(calibrate_kv(model, calibration, per_head)):
            if per_head:  # [kv heads, 1, 1]
                pair = [torch.tensor(a / 448 / 2, dtype=torch.float32).reshape(-1, 1, 1) for a in amax]
                kv_scales.append(tuple(t.flatten().tolist() for t in pair))  # as saved
            else:
                pair = [torch.tensor([a / 448 / 2], dtype=torch.float32) for a in amax]
                kv_scales.append(tuple(float(t) for t in pair))  # as saved
            tensors.update({f"model.layers.{i}.self_attn.{n}": t for n, t in zip(("k_scale", "v_scale"), pair)})
    save_file(tensors, str(folder / "model.safetensors"))
    config = model.config.to_dict()
    config["quantization_config"] = CONFIGS[fmt]
    (folder / "config.json").write_text(json.dumps(config))
    stored = {k: float(torch.tensor(v, dtype=torch.float32)) for k, v in input_scales.items()}  # as saved
    return Reference(ref, act, stored, kv_scales).hook()


# --- pagedjax's side: the logits of a loaded checkpoint through the paged model ---------------


def forward(params, prompts: list[list[int]], mesh=None) -> list[np.ndarray]:
    """Logits [len(p), V] of each prompt: all but its last token in one ragged prefill, then one
    decode step of the last tokens, through the paged pool (pages in a scattered order; in e4m3
    for a checkpoint with KV-cache scales, as kv_cache_dtype="fp8" makes it)."""
    cfg = params.config
    fp8 = cfg.quantization is not None and cfg.quantization.kv_cache_scheme is not None
    pages = init_pages(cfg.num_layers, NUM_PAGES, PAGE, cfg.num_kv_heads, cfg.head_dim,
                       jnp.float8_e4m3fn if fp8 else np.float32,
                       sharding=mesh and parallel.pool_sharding(cfg, mesh))
    model = get_model(cfg, attn_impl="reference")

    def f(variables, pages, tokens, meta):
        with parallel.use_mesh(mesh):
            logits, pages = model.apply(variables, tokens, pages, meta)
            return parallel.constrain_step(logits, pages, mesh)

    step = jax.jit(f, donate_argnums=1)
    free = list(np.random.default_rng(len(prompts)).permutation(np.arange(1, NUM_PAGES)))
    tables = [[int(free.pop()) for _ in range(-(-len(p) // PAGE))] for p in prompts]
    out = [[] for _ in prompts]
    for chunks, seq_lens in (([p[:-1] for p in prompts], [len(p) - 1 for p in prompts]),
                             ([p[-1:] for p in prompts], [len(p) for p in prompts])):
        q = [len(c) for c in chunks]
        T = 48
        meta = build_metadata(q, seq_lens, tables, page_size=PAGE, num_pages=NUM_PAGES, num_tokens=T,
                              num_reqs=4, max_pages=4, logits_indices=range(T))
        tokens = np.zeros(T, np.int32)
        tokens[:sum(q)] = [t for c in chunks for t in c]
        rep = mesh and parallel.replicated(mesh)
        logits, pages = step(params.variables, pages, *jax.device_put((tokens, meta), rep))
        logits, start = np.asarray(logits), 0
        for i, n in enumerate(q):
            out[i].append(logits[start:start + n])
            start += n
    return [np.concatenate(o) for o in out]


def position_errs(got: list[np.ndarray], want: list[np.ndarray]) -> np.ndarray:
    """Each position's worst logit error over its prompt's logit scale."""
    return np.concatenate([np.abs(g - w).max(-1) / np.abs(w).max() for g, w in zip(got, want)])
