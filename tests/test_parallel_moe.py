"""Mixture of experts over 8 fake CPU devices: tensor and expert parallelism against tp = 1, float32.

Tiny random HF Mixtral (8 experts, top 2) and Qwen3-MoE (16 experts, top 4, a dense layer among
the sparse ones) with 8 attention heads. Under tensor parallelism each device holds F / tp
columns of every expert; under expert parallelism (`enable_expert_parallel`) X / tp whole
experts. Checked: logits of a prefill step and of a mixed decode + chunked-prefill step within
1e-4 of tp = 1's scale (each expert implementation once), greedy tokens of the engine equal to
tp = 1, the weights each device holds, and the compiled step's collectives: one all-reduce
[T, D] after each MoE layer as after a dense MLP, no all-gather of a weight or of the pool.
"""

from __future__ import annotations

import functools
import re
import warnings

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import pagedjax as pj
from pagedjax import parallel
from pagedjax.attention import build_metadata
from pagedjax.kv_cache import page_pool
from pagedjax.model_runner import ModelRunner, _step, pack
from pagedjax.models import abstract_params, get_model, moe
from pagedjax.params import Params
from pagedjax.weights import load_params

from tests import hf_models

HEADS = 8
PAGE = 4
TOL = 1e-4  # max |tp - tp1| / max |tp1|: float32 sums reordered over devices stay ~1e-6 of the scale
ENGINE = dict(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64, num_pages=24, attn_impl="reference")
slow = pytest.mark.slow


@functools.cache
def checkpoint(arch: str, tmp_root: str) -> str:
    """A tiny random HF checkpoint of `arch` with 8 attention heads (tp = 8 divides), built once."""
    import pathlib

    folder = pathlib.Path(tmp_root) / f"{arch}-8heads"
    config = hf_models.CONFIGS[arch]()
    config.num_attention_heads = HEADS
    torch_seed = len(arch) + 5
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(hf_models.CONFIGS, arch, lambda: config)
        hf_models.build(arch, folder, seed=torch_seed)
    return str(folder)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("moe-ckpts"))
    return lambda arch: checkpoint(arch, root)


def _load(folder: str, tp: int, ep: bool = False) -> Params:
    mesh = parallel.make_mesh(tp) if tp > 1 else None
    return load_params(folder, dtype=np.float32, mesh=mesh, enable_expert_parallel=ep, progress=False)


def _forward(config, mesh):
    """The model part of the runner's step (same constraints), jitted with the pool donated."""
    model = get_model(config, attn_impl="reference")

    def f(variables, pages, tokens, meta):
        with parallel.use_mesh(mesh):
            logits, pages = model.apply(variables, tokens, pages, meta)
            return parallel.constrain_step(logits, pages, mesh)

    return jax.jit(f, donate_argnums=1)


@functools.cache
def _two_steps(folder: str, tp: int, ep: bool, moe_impl: str = "auto"):
    """Logits of a prefill step and of a mixed decode + chunked-prefill step."""
    params = _load(folder, tp, ep)
    cfg = params.config.replace(moe_impl=moe_impl)
    mesh = parallel.mesh_of(params)
    num_pages, T, R, M = 16, 32, 4, 6
    pages = page_pool.init_pages(cfg.num_layers, num_pages, PAGE, cfg.num_kv_heads, cfg.head_dim,
                                 np.float32, sharding=mesh and parallel.pool_sharding(cfg, mesh))
    rep = mesh and parallel.replicated(mesh)
    step = _forward(cfg, mesh)
    rng = np.random.default_rng(0)
    tables = [[3, 1], [5, 7, 2, 9], [4, 11, 6], [8, 10, 12]]
    out = []
    for q, s, n_req in (([7, 12, 5], [7, 12, 5], 3), ([1, 1, 6, 9], [8, 13, 11, 9], 4)):
        meta = build_metadata(q, s, tables[:n_req], page_size=PAGE, num_pages=num_pages, num_tokens=T,
                              num_reqs=R, max_pages=M, logits_indices=list(range(T)))
        toks = rng.integers(3, hf_models.VOCAB, T).astype(np.int32)
        logits, pages = step(params.variables, pages, *jax.device_put((toks, meta), rep))
        out.append(np.asarray(logits)[:sum(q)])
    return out


def _err(got, ref) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("arch,tp,ep,impl", [
    ("mixtral", 2, False, "auto"), ("mixtral", 4, True, "auto"), ("mixtral", 8, False, "auto"),
    ("mixtral", 8, True, "auto"), ("mixtral", 4, True, "ragged"), ("mixtral", 2, False, "dense"),
    ("qwen3_moe", 4, False, "auto"), ("qwen3_moe", 8, True, "auto"), ("mixtral", 4, True, "gather"),
    ("qwen3_moe", 2, False, "gather"),
    pytest.param("qwen3_moe", 8, False, "ragged", marks=slow), pytest.param("qwen3_moe", 2, True, "dense", marks=slow),
])
def test_logits_match_tp1(folder, arch, tp, ep, impl):
    refs = _two_steps(folder(arch), 1, False)
    assert np.abs(refs[0]).max() > 1.0  # logits large enough that a wrong layout would show
    for what, got, ref in zip(("prefill", "mixed step"), _two_steps(folder(arch), tp, ep, impl), refs):
        assert _err(got, ref) < TOL, (arch, tp, ep, impl, what, _err(got, ref))


@functools.cache
def _greedy(folder: str, tp: int, ep: bool) -> list[list[int]]:
    prompts = hf_models.random_prompts(np.random.default_rng(5), 3, 5, 30)
    llm = pj.LLM(folder, dtype=np.float32, tensor_parallel_size=tp, enable_expert_parallel=ep, **ENGINE)
    assert llm.engine.runner.config.expert_parallel == ep
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "donated buffers were not usable" = a pool copy
        outs = llm.generate(prompts, pj.SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True),
                            use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("arch,tp,ep", [("mixtral", 8, True), ("qwen3_moe", 4, False)] + [
    pytest.param(a, tp, ep, marks=slow) for a in hf_models.MOE_FAMILIES for tp in (2, 4, 8) for ep in (False, True)
    if (a, tp, ep) not in (("mixtral", 8, True), ("qwen3_moe", 4, False))])
def test_greedy_tokens_match_tp1(folder, arch, tp, ep):
    ref = _greedy(folder(arch), 1, False)
    assert all(len(t) == 10 for t in ref)
    assert _greedy(folder(arch), tp, ep) == ref


@pytest.mark.parametrize("ep", [False, True])
def test_each_device_holds_its_slice_of_the_experts(folder, ep):
    tp = 4
    params = _load(folder("qwen3_moe"), tp, ep)
    cfg = params.config
    assert cfg.expert_parallel == ep
    layer = params.variables["params"]["layers_0"]["mlp"]
    X, D, F = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    want = {"experts_gate_proj": (X // tp, D, F) if ep else (X, D, F // tp),
            "experts_up_proj": (X // tp, D, F) if ep else (X, D, F // tp),
            "experts_down_proj": (X // tp, F, D) if ep else (X, F // tp, D),
            "gate": {"kernel": (D, X)}}  # the router: replicated
    got = jax.tree.map(lambda x: {s.data.shape for s in x.addressable_shards}, layer)
    assert got == jax.tree.map(lambda s: {s}, want, is_leaf=lambda s: isinstance(s, tuple))
    # device d holds experts [d X / tp, (d + 1) X / tp), or columns [d F / tp, (d + 1) F / tp) of all
    w = layer["experts_up_proj"]  # [X, D, F]
    full = np.asarray(w)
    for shard in w.addressable_shards:
        d = jax.devices().index(shard.device)
        want = full[d * X // tp:(d + 1) * X // tp] if ep else full[:, :, d * F // tp:(d + 1) * F // tp]
        np.testing.assert_array_equal(shard.data, want)
    # the dense layer (mlp_only_layers) is split like any dense MLP
    assert {s.data.shape for s in params.variables["params"]["layers_1"]["mlp"]["up_proj"]["kernel"]
            .addressable_shards} == {(D, cfg.intermediate_size // tp)}


_COLLECTIVE = re.compile(r"= (\(.*?\)|\S+) (all-gather|all-reduce|all-to-all|collective-permute|"
                         r"reduce-scatter)(-start)?\(")


def _collectives(hlo: str) -> list[tuple[str, list[tuple[int, ...]]]]:
    """(op, result shapes) of every collective in an HLO module's text."""
    out = []
    for m in _COLLECTIVE.finditer(hlo):
        shapes = [tuple(int(d) for d in s.split(",") if d) for s in re.findall(r"\w+\[([\d,]*)\]", m.group(1))]
        out.append((m.group(2), shapes))
    return out


@pytest.mark.parametrize("ep,T", [(False, 16), (True, 16), (False, 256), (True, 1)])
def test_step_collectives(folder, ep, T):
    """One all-reduce [T, D] per attention and per MLP (MoE or dense) and one for the embedding;
    only the logits gathered: no weight, no pool all-gathered. (T = 256: the capacity layout's
    rounds loop inside the per-device computation, still one all-reduce after it; T = 16: "auto"
    runs every expert on every token; T = 1: it gathers each assignment's expert weights, on the
    device holding them.)"""
    tp = 4
    params = _load(folder("qwen3_moe"), tp, ep)
    cfg = params.config
    runner = ModelRunner(params, max_model_len=256, max_num_seqs=4, max_num_batched_tokens=T,
                         num_pages=16, precompile=False, mesh=parallel.mesh_of(params))
    assert runner.config.expert_parallel == ep
    want = {1: "gather", 16: "dense", 256: "capacity"}[T]
    assert moe.resolve_impl("auto", T, cfg.num_experts_per_tok, cfg.num_experts) == want
    buf, layout = pack(runner._dummy_inputs(T)[0])
    buf = jax.device_put(buf, runner.input_sharding)
    compiled = _step.lower(runner.config, "reference", runner.params.variables, runner.pages, buf, runner._no_prev,
                           layout=layout, mesh=runner.mesh).compile()
    found = _collectives(compiled.as_text())
    reduced = [s for op, shapes in found if op == "all-reduce" for s in shapes]
    D = cfg.hidden_size
    assert sorted(reduced) == sorted([(T, cfg.embed_dim)] + [(T, D)] * (2 * cfg.num_layers)), found
    if T > moe.MIN_CAPACITY:  # this step has the capacity layout's rounds loop
        assert moe.capacity(T, cfg.num_experts_per_tok, cfg.num_experts) < T
    gathered = [s for op, shapes in found if op == "all-gather" for s in shapes]
    assert gathered == [(min(T, 4), cfg.vocab_size)], found  # the logits, once, for sampling
    assert {op for op, _ in found} <= {"all-reduce", "all-gather"}, found


def test_what_does_not_divide_is_refused(folder):
    from pagedjax.models import get_config

    moe = get_config("tiny-qwen3-moe")  # 16 experts of width 16, a dense layer of width 128
    with pytest.raises(ValueError, match="expert MLP width 16 does not divide over tensor_parallel_size 32"):
        parallel.check_tensor_parallel(moe.replace(num_heads=32, num_kv_heads=32, head_dim=2, rotary_dim=2), 32)
    with pytest.raises(ValueError, match="6 experts do not divide over tensor_parallel_size 4"):
        parallel.check_tensor_parallel(moe.replace(num_experts=6, expert_parallel=True), 4)
    parallel.check_tensor_parallel(moe.replace(expert_parallel=True), 4)  # 16 experts, 4 devices: fine
    with pytest.raises(ValueError, match="enable_expert_parallel needs a mesh"):
        load_params(folder("mixtral"), enable_expert_parallel=True)
    _, axes = abstract_params(moe)
    assert tuple(axes["layers_0"]["mlp"]["experts_down_proj"]) == ("experts", "moe_mlp", "embed")
    assert parallel.logical_spec(("experts", "moe_mlp", "embed"), (16, 16, 64), parallel.make_mesh(4)) == \
        P(None, "tp", None)
    assert parallel.logical_spec(("experts", "moe_mlp", "embed"), (16, 16, 64), parallel.make_mesh(4),
                                 parallel.axis_rules(expert_parallel=True)) == P("tp", None, None)


def test_generate_places_single_device_params_expert_parallel(folder):
    """Params loaded on one device, expert parallelism asked of the engine: the runner places the
    experts whole per device (as load_params would) and the tokens are tp = 1's."""
    ref = _greedy(folder("mixtral"), 1, False)
    params = _load(folder("mixtral"), 1)
    prompts = hf_models.random_prompts(np.random.default_rng(5), 3, 5, 30)
    outs = pj.generate(params, prompts, pj.SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True),
                       use_tqdm=False, tensor_parallel_size=4, enable_expert_parallel=True, **ENGINE)
    assert [o.outputs[0].token_ids for o in outs] == ref
    runner = pj.api._last[2].engine.runner
    assert runner.config.expert_parallel and not params.config.expert_parallel
    direct = _load(folder("mixtral"), 4, ep=True)
    for a, b in zip(jax.tree.leaves(runner.params.variables), jax.tree.leaves(direct.variables)):
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim)
