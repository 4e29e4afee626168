"""Pre-quantized mixture-of-experts checkpoints (Qwen3-MoE): HF block FP8 (as Qwen3-30B-A3B-FP8 is
published), compressed-tensors FP8 W8A8 (its router quantized too), AutoAWQ GEMM and GPTQ (v1 and
v2, and v1 with act order) int4.

Each is written from one tiny random HF Qwen3-MoE (8 experts, top 2, one dense layer) with the
quantizers and packers of tests/quant_checkpoints.py, every expert's gate / up / down saved as
its own tensors under "mlp.experts.{e}.<proj>", as the published MoE checkpoints are. pagedjax
runs the attention and dense MLP linears quantized; it holds the FP8 checkpoints' experts in e4m3
(the checkpoint's own codes and per-channel or per-block scales, checked exactly, run
weight-only), holds the int4 experts as the checkpoint's own uint4 codes, zero points and group
scales (checked exactly against the saved tensors unpacked by tests/quant_oracle.py, as
Qwen3-30B-A3B-GPTQ-Int4 is published: per expert `mlp.experts.{e}.<proj>.qweight / qzeros /
scales`; with act order, the codes' rows sorted by each expert's g_idx and that permutation),
dequantized by groups in the step, and keeps a quantized router in its dtype,
dequantized at load; the float64 reference is the HF model with every
quantized weight replaced by its dequantized value and, for W8A8 formats, the inputs of the
attention and dense MLP linears fake-quantized by torch's e4m3 cast.

Tolerances, per position, the worst logit error over the logit scale, as in
tests/test_quantized_checkpoints.py: int4 within float32 rounding everywhere. W8A8: a float32
computation rounds the odd activation to the neighbouring e4m3 code (per 128-group for the block
format), and every later position of that prompt then moves a little through its K and V: here
the block format moves 12 of 33 positions by at most 0.037 (the HF model itself in float32 with
the same hooks: 7, at most 0.021). So W8A8 must be within float32 rounding at the median position
and within FLIP (0.1) at every one; a wrong layout, scale or expert moves every position by a good
fraction of the scale.
"""

from __future__ import annotations

import copy
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file

from pagedjax import parallel
from pagedjax.params import Params
from pagedjax.weights import load_params
from tests import quant_checkpoints
from tests.quant_checkpoints import FLIP, TIGHT, forward, position_errs
from tests.quant_oracle import check_e4m3_codes

SEED = 20261206
V = 256
EXPERTS = 8
IGNORED_ROUTERS = {"modules_to_not_convert": ["lm_head", "re:.*mlp\\.gate$"]}
FORMATS = {  # quantization_config of each, and whether it quantizes the router too
    "hf-fp8-block": ({**quant_checkpoints.CONFIGS["hf-fp8-block"], **IGNORED_ROUTERS}, False),
    "ct-fp8-channel": (quant_checkpoints.CONFIGS["ct-fp8-channel"], True),
    "gptq": ({**quant_checkpoints.CONFIGS["gptq"], "group_size": 64}, False),
    "gptq_v2": ({**quant_checkpoints.CONFIGS["gptq"], "group_size": 64, "checkpoint_format": "gptq_v2"}, False),
    "awq": (quant_checkpoints.CONFIGS["awq-g64"], False),
    "gptq-act-order": (quant_checkpoints.CONFIGS["gptq-act-order"], False),  # groups of 64, desc_act
}
INT4 = ("gptq", "gptq_v2", "awq", "gptq-act-order")
QUANTIZE = {"hf-fp8-block": quant_checkpoints.QUANTIZERS["hf-fp8-block"],
            "ct-fp8-channel": quant_checkpoints.QUANTIZERS["ct-fp8-channel"],
            "gptq": lambda w: quant_checkpoints._gptq(w, 64),
            "gptq_v2": lambda w: quant_checkpoints._gptq(w, 64, v1=False),
            "awq": lambda w: quant_checkpoints._awq(w, 64),
            "gptq-act-order": quant_checkpoints.QUANTIZERS["gptq-act-order"]}


def hf_qwen3_moe(seed: int, moe_intermediate_size: int = 128):
    torch.manual_seed(seed)
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=V, hidden_size=256, intermediate_size=512, moe_intermediate_size=moe_intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=128, num_experts=EXPERTS, num_experts_per_tok=2,
        norm_topk_prob=True, mlp_only_layers=[1], max_position_embeddings=128, initializer_range=0.2,
        bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    cfg._experts_implementation = "eager"  # a loop over experts: float64 works (torch's grouped mm is not)
    model = transformers.Qwen3MoeForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))  # norms away from 1
    return model


def write(fmt: str, folder, model) -> quant_checkpoints.Reference:
    """The checkpoint (per-expert tensors) and its float64 reference."""
    qcfg, router = FORMATS[fmt]
    quantize = QUANTIZE[fmt]
    folder.mkdir(parents=True, exist_ok=True)
    ref = copy.deepcopy(model).double().eval()
    tensors = {}

    def put(module: str, w: torch.Tensor) -> torch.Tensor:  # HF [out, in] -> its tensors; the dequantized weight
        q, deq = quantize(w.detach().float())
        tensors.update({f"{module}.{k}": v.contiguous() for k, v in q.items()})
        return deq.to(torch.float64)

    F = model.config.moe_intermediate_size
    for name, t in model.state_dict().items():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and (module.endswith(quant_checkpoints.LINEARS)
                                         or (router and module.endswith(".mlp.gate"))):
            ref.get_submodule(module).weight.data = put(module, t)
        elif name.endswith(".experts.gate_up_proj"):  # [X, 2F, D]: gate rows, then up rows
            base = name.removesuffix(".gate_up_proj")
            for e in range(t.shape[0]):
                gate, up = put(f"{base}.{e}.gate_proj", t[e, :F]), put(f"{base}.{e}.up_proj", t[e, F:])
                ref.get_submodule(base).gate_up_proj.data[e] = torch.cat([gate, up])
        elif name.endswith(".experts.down_proj"):  # [X, D, F]
            base = name.removesuffix(".down_proj")
            for e in range(t.shape[0]):
                ref.get_submodule(base).down_proj.data[e] = put(f"{base}.{e}.down_proj", t[e])
        else:
            tensors[name] = t.detach().contiguous()
    save_file(tensors, str(folder / "model.safetensors"))
    config = model.config.to_dict()
    config["quantization_config"] = qcfg
    (folder / "config.json").write_text(json.dumps(config))
    return quant_checkpoints.Reference(ref, quant_checkpoints.ACTIVATIONS.get(fmt)).hook()


@pytest.fixture(scope="module")
def base():
    rng = np.random.default_rng(SEED)
    prompts = [rng.integers(2, V, n).tolist() for n in (11, 5, 17)]
    return hf_qwen3_moe(SEED), prompts


@pytest.fixture(scope="module")
def checkpoint(base, tmp_path_factory):
    made = {}

    def get(fmt):
        if fmt not in made:
            folder = tmp_path_factory.mktemp(fmt)
            made[fmt] = folder, write(fmt, folder, base[0])
        return made[fmt]
    return get


def check(what: str, fmt: str, got, want) -> None:
    errs = position_errs(got, want)
    where = f"{what} (seed {SEED}): errors per position {np.round(errs, 7).tolist()}"
    if quant_checkpoints.ACTIVATIONS.get(fmt) is None:
        assert errs.max() < TIGHT, where
    else:
        assert errs.max() < FLIP and np.median(errs) < TIGHT, where


def check_checkpoint_experts(folder, mlp, fmt: str) -> None:
    """Layer 0's stacked e4m3 experts [E, in, out] and scales against the checkpoint's per-expert
    codes [out, in] and scales: the same codes, bit for bit, and the same scales to float32
    rounding (amax / 448 of the dequantized channel or block, whose amax is code 448).
    ct-fp8-channel: weight_scale [out, 1], ours [E, out]; hf-fp8-block: weight_scale_inv [NB, KB]
    (128 x 128 blocks of [out, in]), ours [E, KB, NB]."""
    from safetensors.torch import load_file

    saved = load_file(str(folder / "model.safetensors"))
    for proj in ("gate_proj", "up_proj", "down_proj"):
        codes, scales = np.asarray(mlp[f"experts_{proj}"]), np.asarray(mlp[f"experts_{proj}_scale"])
        assert codes.dtype == jnp.float8_e4m3fn and codes.shape[0] == EXPERTS, (proj, codes.dtype, codes.shape)
        for e in range(EXPERTS):
            name = f"model.layers.0.mlp.experts.{e}.{proj}"
            want = saved[f"{name}.weight"]
            assert want.dtype == torch.float8_e4m3fn and want.float().abs().amax().item() == 448, name
            np.testing.assert_array_equal(codes[e].T.view(np.uint8), want.view(torch.uint8).numpy(), err_msg=name)
            if fmt == "hf-fp8-block":
                want_scale = saved[f"{name}.weight_scale_inv"].float().numpy().T  # [KB, NB]
            else:
                want_scale = saved[f"{name}.weight_scale"].float().numpy().reshape(-1)
            assert scales[e].shape == want_scale.shape, (name, scales[e].shape, want_scale.shape)
            np.testing.assert_allclose(scales[e], want_scale, rtol=1e-6, err_msg=name)


def check_int4_experts(folder, mlp, fmt: str) -> None:
    """Layer 0's stacked int4 experts against the checkpoint's per-expert tensors, unpacked by
    the oracle: codes [E, in, out] uint4, zero points [E, G, out] (GPTQ v1: stored + 1) and scales
    [E, G, out] f16, all exactly; 4 bits a weight, not the model's dtype. With act order the codes'
    rows are sorted by the expert's g_idx (stably) and "_rows" [E, in] gives each input row's stored row."""
    from safetensors.torch import load_file

    from tests.quant_oracle import awq_unpack, gptq_unpack_qweight, gptq_unpack_qzeros

    saved = load_file(str(folder / "model.safetensors"))
    quantized_bits = float_bits = 0
    for proj in ("gate_proj", "up_proj", "down_proj"):
        codes, zeros, scales = (mlp[f"experts_{proj}{sfx}"] for sfx in ("", "_zero", "_scale"))
        assert codes.dtype == jnp.uint4 and zeros.dtype == np.uint8 and scales.dtype == np.float16, proj
        codes, zeros, scales = np.asarray(codes).astype(np.uint8), np.asarray(zeros), np.asarray(scales)
        act_order = fmt == "gptq-act-order"
        assert (f"experts_{proj}_rows" in mlp) == act_order, proj
        for e in range(EXPERTS):
            name = f"model.layers.0.mlp.experts.{e}.{proj}"
            qweight, qzeros = saved[f"{name}.qweight"].numpy(), saved[f"{name}.qzeros"].numpy()
            if fmt == "awq":  # qweight [in, out/8]
                want_q, want_z = awq_unpack(qweight), awq_unpack(qzeros)
            else:  # qweight [in/8, out]
                want_q, want_z = gptq_unpack_qweight(qweight), gptq_unpack_qzeros(qzeros, v1=fmt != "gptq_v2")
            if act_order:  # stored row j: input row order[j], the rows grouped (their groups scattered)
                g_idx = saved[f"{name}.g_idx"].numpy()
                assert not np.all(np.diff(g_idx) >= 0), name
                order = np.argsort(g_idx, kind="stable")
                stored_row = np.empty_like(order)
                stored_row[order] = np.arange(len(order))  # input row order[j] sits at stored row j
                np.testing.assert_array_equal(np.asarray(mlp[f"experts_{proj}_rows"][e]), stored_row, err_msg=name)
                assert mlp[f"experts_{proj}_rows"].dtype == np.int32
                want_q = want_q[order]
            np.testing.assert_array_equal(codes[e], want_q, err_msg=name)
            np.testing.assert_array_equal(zeros[e], want_z, err_msg=name)
            np.testing.assert_array_equal(scales[e], saved[f"{name}.scales"].numpy(), err_msg=name)
        quantized_bits += 4 * codes.size + 8 * zeros.size + 16 * scales.size
        float_bits += 32 * codes.size
    assert quantized_bits < 0.2 * float_bits, (quantized_bits, float_bits)


@pytest.mark.parametrize("fmt", FORMATS)
def test_moe_logits_match_float64_dequantized_reference(fmt, base, checkpoint):
    model, prompts = base
    folder, ref = checkpoint(fmt)
    params = load_params(folder, dtype=np.float32, progress=False)
    assert params.config.architecture == "qwen3_moe" and params.config.quantization is not None
    layer0, layer1 = params.variables["params"]["layers_0"], params.variables["params"]["layers_1"]
    assert "qvalue" in layer0["attn"]["q_proj"] and "qvalue" in layer1["mlp"]["down_proj"]  # run quantized
    if fmt in INT4:  # experts: the checkpoint's uint4 codes, zeros and group scales
        check_int4_experts(folder, layer0["mlp"], fmt)
    else:  # experts: the checkpoint's e4m3 codes and per-channel or block scales
        check_checkpoint_experts(folder, layer0["mlp"], fmt)
    assert "kernel" in layer0["mlp"]["gate"]  # the router: float (dequantized where quantized)
    want = [ref.logits(p) for p in prompts]
    assert np.abs(want[2]).std() > 0.5, "logits too flat for a meaningful comparison"
    check(fmt, fmt, forward(params, prompts), want)
    # the float model is far from the quantized one at every position: the check can fail
    plain = [quant_checkpoints.Reference(copy.deepcopy(model).double()).logits(p) for p in prompts]
    assert np.median(position_errs(plain, want)) > 100 * TIGHT


@pytest.mark.parametrize("impl", ["capacity", "ragged", "dense", "gather"])
def test_block_fp8_moe_experts_with_each_impl(impl, base, checkpoint):
    """The block-FP8 checkpoint's e4m3 experts (dequantized by blocks in the step, only the chosen
    experts' weights with "gather") through every expert implementation, against float64."""
    _, prompts = base
    folder, ref = checkpoint("hf-fp8-block")
    params = load_params(folder, dtype=np.float32, progress=False)
    assert params.variables["params"]["layers_0"]["mlp"]["experts_up_proj_scale"].shape == (EXPERTS, 2, 1)
    params = Params(params.variables, params.config.replace(moe_impl=impl), params.tokenizer)
    check(f"hf-fp8-block moe_impl={impl}", "hf-fp8-block", forward(params, prompts), [ref.logits(p) for p in prompts])


@pytest.mark.parametrize("impl", ["capacity", "ragged", "dense", "gather"])
@pytest.mark.parametrize("fmt", ["awq", "gptq", "gptq-act-order"])
def test_int4_moe_experts_with_each_impl(fmt, impl, base, checkpoint):
    """The int4 checkpoints' experts (dequantized by groups in the step, only the chosen experts'
    weights with "gather") through every expert implementation, against float64."""
    _, prompts = base
    folder, ref = checkpoint(fmt)
    params = load_params(folder, dtype=np.float32, progress=False)
    assert params.variables["params"]["layers_0"]["mlp"]["experts_down_proj"].dtype == jnp.uint4
    params = Params(params.variables, params.config.replace(moe_impl=impl), params.tokenizer)
    check(f"{fmt} moe_impl={impl}", fmt, forward(params, prompts), [ref.logits(p) for p in prompts])


@pytest.mark.parametrize("fmt,tp,ep", [("hf-fp8-block", 2, True), ("gptq", 2, True), ("gptq", 2, False),
                                       ("awq", 2, False), ("awq", 4, True), ("ct-fp8-channel", 4, True),
                                       ("gptq-act-order", 2, True)])
def test_moe_tensor_parallel_matches_one_device(fmt, tp, ep, base, checkpoint):
    _, prompts = base
    folder, _ = checkpoint(fmt)
    one = forward(load_params(folder, dtype=np.float32, progress=False), prompts)
    mesh = parallel.make_mesh(tp)
    params = load_params(folder, dtype=np.float32, mesh=mesh, enable_expert_parallel=ep, progress=False)
    check(f"{fmt} tp={tp} ep={ep} against one device", fmt, forward(params, prompts, mesh), one)


def test_block_fp8_experts_split_by_whole_blocks(base, checkpoint, tmp_path):
    """Tensor parallelism splits block-FP8 experts' columns by whole 128-column blocks: 256
    columns over 2 devices run and match one device; 128 columns over 2 (64 each) are refused
    with a clear error, where expert parallelism (whole experts) runs."""
    _, prompts = base
    wide = tmp_path / "wide"
    write("hf-fp8-block", wide, hf_qwen3_moe(SEED + 1, moe_intermediate_size=256))
    one = forward(load_params(wide, dtype=np.float32, progress=False), prompts)
    mesh = parallel.make_mesh(2)
    params = load_params(wide, dtype=np.float32, mesh=mesh, progress=False)
    assert params.variables["params"]["layers_0"]["mlp"]["experts_down_proj_scale"].shape == (EXPERTS, 2, 2)
    check("hf-fp8-block (256 columns) tp=2 against one device", "hf-fp8-block", forward(params, prompts, mesh), one)
    narrow, _ = checkpoint("hf-fp8-block")
    with pytest.raises(ValueError, match=r"block-FP8 experts \(128 x 128 blocks\).*64 of the 128"):
        load_params(narrow, dtype=np.float32, mesh=mesh, progress=False)


def test_int4_experts_split_by_whole_groups(checkpoint):
    """Without expert parallelism, tensor parallelism must give each device whole groups of
    down_proj's rows: 128 rows in groups of 64 over 4 devices (32 each) are refused with a clear
    error (over 2 they run: test_moe_tensor_parallel_matches_one_device), where whole experts run."""
    folder, _ = checkpoint("awq")
    mesh = parallel.make_mesh(4)
    with pytest.raises(ValueError, match=r"int4 experts \(groups of 64 rows\).*32 of the 128 rows"):
        load_params(folder, dtype=np.float32, mesh=mesh, progress=False)
    params = load_params(folder, dtype=np.float32, mesh=mesh, enable_expert_parallel=True, progress=False)
    assert params.variables["params"]["layers_0"]["mlp"]["experts_down_proj_zero"].shape == (EXPERTS, 2, 256)


def test_act_order_experts_need_whole_experts_per_device(checkpoint):
    """Act-order experts' down_proj rows are permuted over the whole expert width: tensor
    parallelism without expert parallelism (a slice of the width per device) is refused."""
    folder, _ = checkpoint("gptq-act-order")
    with pytest.raises(ValueError, match=r"act-order int4 experts .* tensor_parallel_size 2.*expert parallelism"):
        load_params(folder, dtype=np.float32, mesh=parallel.make_mesh(2), progress=False)


def test_act_order_experts_with_unequal_groups_are_refused(checkpoint, tmp_path):
    """An expert whose g_idx gives its groups unequal numbers of rows (no contiguous groups once
    sorted) is refused with a clear error naming it."""
    import shutil

    from safetensors.torch import load_file

    folder, _ = checkpoint("gptq-act-order")
    tensors = load_file(str(folder / "model.safetensors"))
    name = "model.layers.0.mlp.experts.3.down_proj.g_idx"
    g_idx = tensors[name].clone()
    g_idx[g_idx == 1] = 0  # group 0 takes all 128 rows, group 1 none
    tensors[name] = g_idx
    save_file(tensors, str(tmp_path / "model.safetensors"))
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    with pytest.raises(ValueError, match=r"experts\.3\.down_proj \(gptq\).*2 groups 64 input channels"):
        load_params(tmp_path, dtype=np.float32, progress=False)


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_random_int4_moe_params(method):
    """random_params(quantization="awq"/"gptq") on a tiny MoE config: uint4 experts with zero
    point 8 and group scales, a forward that runs and gives finite, non-constant logits."""
    from pagedjax.dummy_weights import INT4_RMS, random_params
    from pagedjax.models import get_config

    cfg = get_config("tiny-qwen3-moe").replace(moe_intermediate_size=64)
    params = random_params(cfg, dtype=jnp.float32, quantization=method)
    assert params.config.quantization.expert_group_size == 64
    mlp = params.variables["params"]["layers_0"]["mlp"]
    codes, zeros, scales = (mlp[f"experts_gate_proj{sfx}"] for sfx in ("", "_zero", "_scale"))
    assert codes.dtype == jnp.uint4 and codes.shape == (16, 64, 64)
    assert zeros.shape == scales.shape == (16, 1, 64) and np.all(np.asarray(zeros) == 8)
    np.testing.assert_allclose(np.asarray(scales, np.float64), 0.02 / INT4_RMS, rtol=1e-3)
    q = np.asarray(codes).astype(np.int64)
    assert q.min() == 0 and q.max() == 15 and abs(q.mean() - 7.5) < 0.2  # uniform codes
    assert "qvalue" in params.variables["params"]["layers_0"]["attn"]["q_proj"]
    logits = forward(params, [[3, 5, 7, 9], [11, 2]])
    assert all(np.isfinite(g).all() and g.std() > 0 for g in logits)


@pytest.fixture(scope="module")
def online(base, tmp_path_factory):
    """The float checkpoint (saved by transformers), loaded with quantization="fp8"."""
    model, _ = base
    folder = tmp_path_factory.mktemp("online")
    model.save_pretrained(folder)
    return folder, load_params(folder, dtype=np.float32, quantization="fp8", progress=False)


def checked_codes(codes, scale, w: torch.Tensor, what: str) -> torch.Tensor:
    """The float64 weight [out, in] that e4m3 `codes` [out, in] with one `scale` per output
    channel stand for, once both are checked against the float weight w: each scale its row's
    amax / 448, each code w / scale rounded to nearest even on the e4m3 grid (either neighbour at
    a near-tie, where float32 division may land on either side)."""
    w = w.detach().double().numpy()
    scale = np.asarray(scale, np.float64)
    np.testing.assert_allclose(scale, np.abs(w).max(1) / 448, rtol=1e-6, err_msg=f"{what} scales")
    check_e4m3_codes(np.asarray(codes), w / scale[:, None], what)
    return torch.from_numpy(np.asarray(codes, np.float64) * scale[:, None])


def online_reference(model, params) -> quant_checkpoints.Reference:
    """The float64 HF model with each weight online FP8 holds (codes and scales checked against
    the float weights): the attention and dense MLP linears W8A8 (activation hooks per token), each
    expert's gate / up / down weight-only (its scales per output channel)."""
    ref = copy.deepcopy(model).double().eval()
    F = model.config.moe_intermediate_size
    ours = params.variables["params"]
    for i, layer in enumerate(model.model.layers):
        mine = ours[f"layers_{i}"]
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            q = mine["attn"][proj]
            mod = ref.model.layers[i].self_attn.get_submodule(proj)
            mod.weight.data = checked_codes(q["qvalue"], q["scale"], mod.weight, f"layer {i} {proj}")
        if "experts_gate_proj" not in mine["mlp"]:  # the dense layer
            for proj in ("gate_proj", "up_proj", "down_proj"):
                q = mine["mlp"][proj]
                mod = ref.model.layers[i].mlp.get_submodule(proj)
                mod.weight.data = checked_codes(q["qvalue"], q["scale"], mod.weight, f"layer {i} {proj}")
            continue
        experts = ref.model.layers[i].mlp.experts
        codes = {n: np.asarray(mine["mlp"][f"experts_{n}"]) for n in ("gate_proj", "up_proj", "down_proj")}
        scales = {n: np.asarray(mine["mlp"][f"experts_{n}_scale"]) for n in codes}
        for e in range(experts.gate_up_proj.shape[0]):  # ours [E, in, out], HF's [out, in]
            gate_up = layer.mlp.experts.gate_up_proj[e]
            gate = checked_codes(codes["gate_proj"][e].T, scales["gate_proj"][e], gate_up[:F], f"layer {i} gate {e}")
            up = checked_codes(codes["up_proj"][e].T, scales["up_proj"][e], gate_up[F:], f"layer {i} up {e}")
            experts.gate_up_proj.data[e] = torch.cat([gate, up])
            experts.down_proj.data[e] = checked_codes(codes["down_proj"][e].T, scales["down_proj"][e],
                                                      layer.mlp.experts.down_proj[e], f"layer {i} down {e}")
    return quant_checkpoints.Reference(ref, "token").hook()


@pytest.mark.parametrize("impl", ["capacity", "ragged", "dense", "gather"])
def test_online_fp8_moe_experts_are_e4m3_and_match_the_reference(impl, base, online):
    model, prompts = base
    _, params = online
    ref = online_reference(model, params)
    mlp = params.variables["params"]["layers_0"]["mlp"]
    assert mlp["experts_gate_proj"].dtype == jnp.float8_e4m3fn and mlp["experts_gate_proj"].shape == (EXPERTS, 256, 128)
    assert mlp["experts_down_proj_scale"].shape == (EXPERTS, 256) and mlp["experts_down_proj_scale"].dtype == np.float32
    assert "kernel" in mlp["gate"] and params.dtype == np.float32  # the router stays float
    params = Params(params.variables, params.config.replace(moe_impl=impl), params.tokenizer)
    want = [ref.logits(p) for p in prompts]
    check(f"online fp8 moe_impl={impl}", "ct-fp8-channel", forward(params, prompts), want)
    plain = [quant_checkpoints.Reference(copy.deepcopy(model).double()).logits(p) for p in prompts]
    assert np.median(position_errs(plain, want)) > 100 * TIGHT


@pytest.mark.parametrize("tp,ep", [(2, False), (4, True)])
def test_online_fp8_moe_tensor_parallel_matches_one_device(tp, ep, base, online):
    _, prompts = base
    folder, _ = online
    one = forward(load_params(folder, dtype=np.float32, quantization="fp8", progress=False), prompts)
    mesh = parallel.make_mesh(tp)
    params = load_params(folder, dtype=np.float32, quantization="fp8", mesh=mesh, enable_expert_parallel=ep,
                         progress=False)
    check(f"online fp8 tp={tp} ep={ep} against one device", "ct-fp8-channel", forward(params, prompts, mesh), one)
