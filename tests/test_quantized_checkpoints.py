"""Pre-quantized checkpoints end to end: FP8 (compressed-tensors W8A8 and W8A16, HF block-wise), AWQ and GPTQ
(act-order too).

Each format is written by tests/quant_checkpoints.py from one tiny random HF Llama (its own
quantizers, the independent packers of tests/quant_oracle.py, the published layouts), loaded
with load_params (the method detected from config.json), and run through the paged model: a
ragged prefill of three prompts, then one decode token each. The logits must match the float64
reference: the HF model with the dequantized weights, its W8A8 activations fake-quantized by
torch's own e4m3 cast in forward hooks (none for weight-only checkpoints). Tensor parallelism (2 and 4 fake CPU devices, kv heads
replicated at 4, weights loaded straight into their shards) must give one device's logits.

A compressed-tensors checkpoint with an FP8 KV-cache scheme (scales per tensor, or per kv head)
runs from an e4m3 pool with its own k_scale / v_scale; its reference stores K (after rotary) and
V through the same saturating e4m3 cast, with those scales.

Tolerances, per position: the worst logit error over the logit scale. Our forward runs in
float32 against float64, so an int4 model is off by float32 rounding (~1e-5 at most). So is a
W8A8 model at nearly every position (~5e-7: activation codes absorb small differences), but a
float32 computation can round the odd activation to the neighbouring e4m3 code, and that
position's logits then move by up to a few 1e-2: the HF model itself, run in float32 with the
same hooks, does so at the same positions of the block-FP8 checkpoint. So W8A8 positions must be
within 1e-5 but for at most a fifth of them, and all within 0.1. A wrong layout, scale axis,
zero point or block moves every position by a good fraction of the scale.
"""

from __future__ import annotations

import copy
import logging

import jax
import numpy as np
import pytest
import torch
import transformers

from pagedjax import parallel
from pagedjax.params import Params
from pagedjax.weights import load_params
from tests import quant_checkpoints

SEED = 20261205
V = 256
PAGE, NUM_PAGES = quant_checkpoints.PAGE, quant_checkpoints.NUM_PAGES
FORMATS = ("awq", "awq-g64", "gptq", "gptq-act-order", "ct-fp8-channel", "ct-fp8-tensor-static", "hf-fp8-block",
           "ct-fp8-channel-w8a16", "ct-fp8-channel-kv", "ct-fp8-channel-kv-head")
W8A8 = ("ct-fp8-channel", "ct-fp8-tensor-static", "hf-fp8-block", "ct-fp8-channel-kv", "ct-fp8-channel-kv-head")
# with the checkpoint's KV-cache scales (per tensor, per kv head): served from an fp8 pool
FP8_KV = ("ct-fp8-channel-kv", "ct-fp8-channel-kv-head")
TIGHT, FLIP = quant_checkpoints.TIGHT, quant_checkpoints.FLIP
forward, position_errs = quant_checkpoints.forward, quant_checkpoints.position_errs
MAX_FLIPPED = 0.2  # W8A8: share of positions allowed past TIGHT
# with an fp8 KV cache, every K and V element is one more rounding to e4m3, and a flip there moves
# each later position of its prompt (measured: 6 of 33 positions, all <= 0.021)
MAX_FLIPPED_KV = 0.4
TIE = 0.045  # a near-tie of the reference's top two logits, over the logit scale: greedy may pick either


def hf_llama(seed: int):
    """A tiny random Llama whose every linear tiles for FP8 128-blocks and int4 (head dim 128, 4 heads, 2 kv)."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=128,
                                   max_position_embeddings=128, initializer_range=0.2, bos_token_id=0,
                                   eos_token_id=1, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))  # norms away from 1
    return model


@pytest.fixture(scope="module")
def base():
    rng = np.random.default_rng(SEED)
    prompts = [rng.integers(2, V, n).tolist() for n in (11, 5, 17)]
    return hf_llama(SEED), prompts


@pytest.fixture(scope="module")
def checkpoint(base, tmp_path_factory):
    """checkpoint(fmt) -> (folder, reference), written once per format."""
    model, prompts = base
    made = {}

    def get(fmt):
        if fmt not in made:
            folder = tmp_path_factory.mktemp(fmt)
            made[fmt] = folder, quant_checkpoints.write(fmt, folder, model, calibration=prompts)
        return made[fmt]
    return get


def check_logits(what: str, got, want) -> None:
    errs = position_errs(got, want)
    where = f"{what} (seed {SEED}): errors per position {np.round(errs, 7).tolist()}"
    if what.split()[0] not in W8A8:
        assert errs.max() < TIGHT, where
        return
    flipped = MAX_FLIPPED_KV if what.split()[0] in FP8_KV else MAX_FLIPPED
    assert errs.max() < FLIP and (errs > TIGHT).mean() <= flipped, where


@pytest.mark.parametrize("fmt", FORMATS)
def test_logits_match_float64_dequantized_reference(fmt, base, checkpoint):
    _, prompts = base
    folder, ref = checkpoint(fmt)
    params = load_params(folder, dtype=np.float32, progress=False)
    assert params.config.quantization is not None and params.config.quantization.name == \
        quant_checkpoints.CONFIGS[fmt]["quant_method"]
    want = [ref.logits(p) for p in prompts]
    assert np.abs(want[2]).std() > 0.5, "logits too flat for a meaningful comparison"
    check_logits(fmt, forward(params, prompts), want)
    # the float model is far from the quantized one at every position: these checks can fail
    plain = [quant_checkpoints.Reference(copy.deepcopy(base[0]).double()).logits(p) for p in prompts]
    assert np.median(position_errs(plain, want)) > 100 * TIGHT
    if fmt == "gptq-act-order":  # each linear's rows sorted by group, their input channels in perm
        down = params.variables["params"]["layers_0"]["mlp"]["down_proj"]
        perm = np.asarray(down["perm"])
        assert perm.dtype == np.int32 and sorted(perm) == list(range(512)) and not np.array_equal(perm, np.arange(512))
    if fmt in FP8_KV:  # the checkpoint's scales, as saved, are the ones the pool reads
        for i, (k, v) in enumerate(ref.kv_scales):
            attn = params.variables["params"][f"layers_{i}"]["attn"]
            assert attn["k_scale"].dtype == np.float32
            assert (np.asarray(attn["k_scale"]).tolist(), np.asarray(attn["v_scale"]).tolist()) == (k, v)
        unit = jax.tree_util.tree_map_with_path(
            lambda p, x: np.ones_like(x) if p[-1].key in ("k_scale", "v_scale") else x, params.variables)
        got = forward(Params(unit, params.config), prompts)
        assert np.median(position_errs(got, want)) > 2 * FLIP  # unit scales: no saturation (measured 0.24)
        if fmt == "ct-fp8-channel-kv-head":  # each head its own scale: swapped heads' scales show
            swapped = jax.tree_util.tree_map_with_path(
                lambda p, x: x[::-1] if p[-1].key in ("k_scale", "v_scale") else x, params.variables)
            got = forward(Params(swapped, params.config), prompts)
            assert np.median(position_errs(got, want)) > FLIP  # measured 0.16


@pytest.mark.parametrize("fmt,tp", [("awq", 2), ("awq-g64", 4), ("gptq", 2), ("gptq-act-order", 4), ("ct-fp8-channel", 4),
                                    ("ct-fp8-tensor-static", 2), ("hf-fp8-block", 4), ("ct-fp8-channel-w8a16", 2),
                                    ("ct-fp8-channel-kv", 4), ("ct-fp8-channel-kv-head", 4)])
def test_tensor_parallel_matches_one_device(fmt, tp, base, checkpoint):
    _, prompts = base
    folder, _ = checkpoint(fmt)
    one = forward(load_params(folder, dtype=np.float32, progress=False), prompts)
    mesh = parallel.make_mesh(tp)
    params = load_params(folder, dtype=np.float32, mesh=mesh, progress=False)
    qvalue = params.variables["params"]["layers_0"]["attn"]["k_proj"]["qvalue"]
    assert len(qvalue.sharding.device_set) == tp and params.config.num_kv_heads == max(2, tp)
    # sums split over devices reorder float32 rounding: the same tolerances as against float64
    check_logits(f"{fmt} tp={tp} against one device", forward(params, prompts, mesh), one)


@pytest.mark.parametrize("fmt,tp", [("awq", 2), ("awq-g64", 4), ("gptq-act-order", 4), ("ct-fp8-channel", 2)])
def test_tensor_parallel_shard_map_path(fmt, tp, base, checkpoint, monkeypatch):
    """The GPU's layout of a tp step, on the CPU: each linear per shard in shard_map (the XLA path
    inside), row-parallel ones all-reduced. Int4 gives one device's logits. W8A8 row-parallel
    layers quantize their activations per shard (as vLLM's do): the reference does the same, its
    o_proj and down_proj inputs fake-quantized per token and per K/tp slice."""
    from pagedjax.models import quantized

    _, prompts = base
    folder, ref = checkpoint(fmt)
    one = forward(load_params(folder, dtype=np.float32, progress=False), prompts)
    calls = []
    monkeypatch.setattr(quantized, "shard_map_impl", lambda w, x: calls.append(w.kind) or "xla")
    mesh = parallel.make_mesh(tp)
    got = forward(load_params(folder, dtype=np.float32, mesh=mesh, progress=False), prompts, mesh)
    assert len(calls) == 7 * 2  # every linear of both layers, traced once
    if fmt not in W8A8:
        check_logits(f"{fmt} tp={tp} shard_map against one device", got, one)
        return
    try:
        per_shard = [ref.hook(row_shards=tp).logits(p) for p in prompts]
    finally:
        ref.hook()
    check_logits(f"{fmt} tp={tp} shard_map against per-shard scales", got, per_shard)
    assert np.median(position_errs(one, per_shard)) > 100 * TIGHT  # the per-shard reference differs


@pytest.mark.parametrize("fmt", FP8_KV)
def test_engine_greedy_from_the_checkpoints_kv_scales(fmt, base, checkpoint, caplog):
    """The engine (kv_cache_dtype="fp8": the pool in e4m3 with the checkpoint's k_scale / v_scale,
    prefix caching on) decodes greedily what the float64 reference picks: each token is the
    reference's argmax over the sequence so far, unless the reference's top two are within TIE
    there (twice the largest flip measured above: 0.021 of the logit scale). With unit scales 6
    of the 24 tokens break this (measured)."""
    import pagedjax as pj
    from pagedjax.engine import EngineConfig, LLMEngine

    _, prompts = base
    folder, ref = checkpoint(fmt)
    params = load_params(folder, dtype=np.float32, progress=False)
    options = dict(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64, page_size=PAGE,
                   num_pages=NUM_PAGES, attn_impl="reference", precompile=False)
    with caplog.at_level(logging.INFO, logger="pagedjax"):
        LLMEngine(params, EngineConfig(**options))
        assert "FP8 KV-cache scales (kv_cache_scheme) go unused by a float32 pool" in caplog.text, caplog.text
        engine = LLMEngine(params, EngineConfig(**options, kv_cache_dtype="fp8"))
        assert "KV cache in fp8 (e4m3, the checkpoint's k_scale / v_scale)" in caplog.text, caplog.text
    assert engine.stats().num_usable_pages > 0
    sp = pj.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, sp)
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    for i, p in enumerate(prompts):
        out = list(done[f"r{i}"].outputs[0].token_ids)
        assert len(out) == 8
        logits = ref.logits(p + out)[len(p) - 1:-1]  # [8, V]: the reference's choice at each step
        for j, (tok, row) in enumerate(zip(out, logits)):
            top2 = np.sort(row)[-2:]
            assert tok == row.argmax() or top2[1] - top2[0] < TIE * np.abs(row).max(), \
                f"prompt {i} token {j}: engine {tok}, reference {row.argmax()} ({row[tok]} vs {row.max()})"
