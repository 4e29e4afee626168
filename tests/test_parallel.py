"""Tensor parallelism on 8 fake CPU devices: tp = 2, 4, 8 against tp = 1, float32.

Tiny random HF models with 8 attention heads (so tp = 8 divides) of every architecture; the
llama, qwen3 and gemma2 have 2 kv heads, so tp = 4 and 8 replicate kv heads (K < tp, as vLLM does). Checked:
logits of a prefill step and of a mixed decode + chunked-prefill step within 1e-5 of tp = 1,
the pool holding the right kv head on each device, greedy tokens of the engine equal to tp = 1,
the compiled step's collectives (one all-reduce after the embedding, after attention and after
each MLP; the logits gathered once; no all-gather of the pool or of a weight), per-device
memory of weights and pool, and the public API (LLM, generate) with tensor_parallel_size.
"""

from __future__ import annotations

import functools
import re
import warnings

import chex
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import pagedjax as pj
from pagedjax import parallel
from pagedjax.attention import build_metadata
from pagedjax.kv_cache import page_pool
from pagedjax.model_runner import ModelRunner, _step, pack
from pagedjax.models import abstract_params, get_config, get_model
from pagedjax.params import Params
from pagedjax.weights import load_params

from tests import hf_models

ARCHS = ("llama", "gpt2", "gpt_neox", "opt", "qwen3", "gemma2")  # qwen3, gemma2: GQA (2 kv heads),
# q/k norm and a head_dim of its own; windows, soft-caps, pre/post norms, scaled embeddings
HEADS = 8  # tp = 8 divides; the llama keeps hf_models' 2 kv heads
# The jnp reference attention: it runs under plain GSPMD sharding (the custom call: see the end)
ENGINE = dict(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64, num_pages=24,
              attn_impl="reference")
PAGE = 4  # page size of the direct model runs
slow = pytest.mark.slow


def _eight_heads(make_config):
    def make():
        cfg = make_config()
        setattr(cfg, "n_head" if hasattr(cfg, "n_head") else "num_attention_heads", HEADS)
        return cfg
    return make


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """folder(arch): a tiny random HF checkpoint with 8 heads, built once per module."""
    built: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in built:
            path = tmp_path_factory.mktemp(f"{arch}-8heads")
            with pytest.MonkeyPatch.context() as mp:
                mp.setitem(hf_models.CONFIGS, arch, _eight_heads(hf_models.CONFIGS[arch]))
                hf_models.build(arch, path, seed=len(arch) + 3)
            built[arch] = str(path)
        return built[arch]

    return get


def _load(folder: str, tp: int) -> Params:
    mesh = parallel.make_mesh(tp) if tp > 1 else None
    return load_params(folder, dtype=np.float32, mesh=mesh, progress=False)


# --- the rules ------------------------------------------------------------------------------


def test_rules_split_megatron_style():
    cfg = get_config("tiny-llama").replace(num_heads=8, head_dim=8, rotary_dim=8)  # K = 2
    mesh = parallel.make_mesh(4)
    sh = parallel.param_shardings(cfg, mesh)["params"]
    specs = {k: sh["layers_0"][k1][k2]["kernel"].spec for k, (k1, k2) in {
        "q": ("attn", "q_proj"), "k": ("attn", "k_proj"), "o": ("attn", "o_proj"),
        "gate": ("mlp", "gate_proj"), "up": ("mlp", "up_proj"), "down": ("mlp", "down_proj")}.items()}
    assert specs == {"q": P(None, "tp", None), "k": P(None, "tp", None), "o": P("tp", None, None),
                     "gate": P(None, "tp"), "up": P(None, "tp"), "down": P("tp", None)}
    assert sh["embed"]["embedding"].spec == P("tp", None)  # vocab-parallel
    assert sh["lm_head"]["kernel"].spec == P(None, "tp")
    assert sh["final_norm"]["scale"].spec == P(None)
    assert parallel.pool_sharding(cfg, mesh).spec == P(None, None, "tp", None)
    # K = 2 < tp = 4: each kv head replicated on the 2 devices whose query heads read it
    assert parallel.tp_config(cfg, 4).num_kv_heads == 4 and parallel.tp_config(cfg, 2) is cfg
    w = np.arange(2 * 3).reshape(1, 2, 3)  # [D, K, H]
    np.testing.assert_array_equal(parallel.repeat_kv_heads(w, (None, "kv_heads", None), 2),
                                  w[:, [0, 0, 1, 1]])
    # a vocabulary that does not divide is replicated; heads that do not divide are an error
    odd = parallel.param_shardings(cfg.replace(vocab_size=255), mesh)["params"]
    assert odd["embed"]["embedding"].spec == P(None, None)
    with pytest.raises(ValueError, match="attention heads"):
        parallel.tp_config(cfg, 3)
    with pytest.raises(ValueError, match="devices"):
        parallel.make_mesh(16)


# --- logits: direct model runs --------------------------------------------------------------


TP_TOL = 1e-4  # max |tp - tp1| / max |tp1|, the model tests' tolerance against HF


def _scaled_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def _forward(config, mesh, attn_impl="reference"):
    """The model part of the runner's step (same constraints), jitted with the pool donated."""
    model = get_model(config, attn_impl=attn_impl)

    def f(variables, pages, tokens, meta):
        with parallel.use_mesh(mesh):
            logits, pages = model.apply(variables, tokens, pages, meta)
            return parallel.constrain_step(logits, pages, mesh)

    return jax.jit(f, donate_argnums=1)


@functools.cache
def _two_steps(folder: str, tp: int):
    """Logits of a prefill step and of a mixed decode + chunked-prefill step, and the final pool."""
    params = _load(folder, tp)
    cfg = params.config
    mesh = parallel.mesh_of(params)
    num_pages, T, R, M = 16, 32, 4, 6
    pages = page_pool.init_pages(cfg.num_layers, num_pages, PAGE, cfg.num_kv_heads, cfg.head_dim,
                                 np.float32, sharding=mesh and parallel.pool_sharding(cfg, mesh))
    rep = mesh and parallel.replicated(mesh)
    step = _forward(cfg, mesh)
    rng = np.random.default_rng(0)
    tables = [[3, 1], [5, 7, 2, 9], [4, 11, 6], [8, 10, 12]]  # scattered pages, page 0 unused
    # step 1: three prompts (7, 12, 5 tokens); logits at every real token
    q1, s1 = [7, 12, 5], [7, 12, 5]
    meta1 = build_metadata(q1, s1, tables[:3], page_size=PAGE, num_pages=num_pages, num_tokens=T,
                           num_reqs=R, max_pages=M, logits_indices=list(range(T)))
    toks1 = rng.integers(3, hf_models.VOCAB, T).astype(np.int32)
    logits1, pages = step(params.variables, pages, *jax.device_put((toks1, meta1), rep))
    # step 2: two decode tokens, the third prompt's next 6-token chunk, a new 9-token prompt
    q2, s2 = [1, 1, 6, 9], [8, 13, 11, 9]
    meta2 = build_metadata(q2, s2, tables, page_size=PAGE, num_pages=num_pages, num_tokens=T,
                           num_reqs=R, max_pages=M, logits_indices=list(range(T)))
    toks2 = rng.integers(3, hf_models.VOCAB, T).astype(np.int32)
    logits2, pages = step(params.variables, pages, *jax.device_put((toks2, meta2), rep))
    n1, n2 = sum(q1), sum(q2)
    return np.asarray(logits1)[:n1], np.asarray(logits2)[:n2], [np.asarray(k) for k, _ in pages]


@pytest.mark.parametrize("tp", [pytest.param(2, marks=slow), 4, 8])
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_tp1(folder, arch, tp):
    ref1, ref2, ref_pool = _two_steps(folder(arch), 1)
    got1, got2, got_pool = _two_steps(folder(arch), tp)
    assert np.abs(ref1).max() > 1.0  # logits large enough that a wrong layout would show
    # As the model tests compare with HF: the worst error relative to the logit scale. float32
    # reductions split over tp devices reorder sums (~1e-6 of the scale); a wrong layout, a
    # missing all-reduce or a wrong kv-head replica is off by a good fraction of it.
    assert _scaled_err(got1, ref1) < TP_TOL, (arch, tp, "prefill logits", _scaled_err(got1, ref1))
    assert _scaled_err(got2, ref2) < TP_TOL, (arch, tp, "mixed-step logits", _scaled_err(got2, ref2))
    K, K_tp = ref_pool[0].shape[2], got_pool[0].shape[2]
    for layer, (ref, got) in enumerate(zip(ref_pool, got_pool)):  # tp kv head j is head j // (K_tp / K)
        err = _scaled_err(got, np.repeat(ref, K_tp // K, axis=2))
        assert err < TP_TOL, (arch, tp, f"pool of layer {layer}", err)


# --- greedy tokens through the engine -------------------------------------------------------

PROMPTS = hf_models.random_prompts(np.random.default_rng(5), 3, 5, 30)
GREEDY = pj.SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def _pool_pointers(llm) -> list[int]:
    return [s.data.unsafe_buffer_pointer() for s in llm.engine.runner.pages[0][0].addressable_shards]


@functools.cache
def _greedy(folder: str, tp: int) -> list[list[int]]:
    llm = pj.LLM(folder, dtype=np.float32, tensor_parallel_size=tp, **ENGINE)
    before = _pool_pointers(llm)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "donated buffers were not usable" = a pool copy
        outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert _pool_pointers(llm) == before  # the sharded pool is updated in place
    assert len(llm.engine.runner.pages[0][0].sharding.device_set) == tp
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("arch,tp", [("llama", 8)] + [  # the API tests below add llama at 4 and 2
    pytest.param(arch, tp, marks=slow) for arch in ARCHS for tp in (2, 4, 8) if (arch, tp) != ("llama", 8)])
def test_greedy_tokens_match_tp1(folder, arch, tp):
    ref = _greedy(folder(arch), 1)
    assert all(len(t) == GREEDY.max_tokens for t in ref)
    assert _greedy(folder(arch), tp) == ref


# --- the compiled step ----------------------------------------------------------------------

_COLLECTIVE = re.compile(r"= (\(.*?\)|\S+) (all-gather|all-reduce|all-to-all|collective-permute|"
                         r"reduce-scatter)(-start)?\(")


def _collectives(hlo: str) -> list[tuple[str, list[tuple[int, ...]]]]:
    """(op, result shapes) of every collective in an HLO module's text."""
    out = []
    for m in _COLLECTIVE.finditer(hlo):
        shapes = [tuple(int(d) for d in s.split(",") if d) for s in re.findall(r"\w+\[([\d,]*)\]", m.group(1))]
        out.append((m.group(2), shapes))
    return out


@pytest.mark.parametrize("arch,tp,T", [("llama", 8, 16), ("gpt2", 4, 128), ("opt", 2, 16), ("qwen3", 4, 16),
                                       ("gemma2", 8, 16)])
def test_step_collectives(folder, arch, tp, T):
    """All-reduce after the embedding, each attention and each MLP; only the logits gathered."""
    params = _load(folder(arch), tp)
    cfg = params.config
    runner = ModelRunner(params, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=T,
                         num_pages=16, precompile=False, mesh=parallel.mesh_of(params))
    buf, layout = pack(runner._dummy_inputs(T)[0])
    buf = jax.device_put(buf, runner.input_sharding)
    compiled = _step.lower(cfg, "reference", runner.params.variables, runner.pages, buf, runner._no_prev,
                           layout=layout, mesh=runner.mesh).compile()
    logits, _, pages = compiled.output_shardings  # logits replicated; the pool split as it came in
    assert logits.is_fully_replicated
    pool = parallel.pool_sharding(cfg, runner.mesh)
    assert all(s.is_equivalent_to(pool, 4) for kv in pages for s in kv)
    found = _collectives(compiled.as_text())
    R, D, V = min(T, 4), cfg.hidden_size, cfg.vocab_size
    reduced = [s for op, shapes in found if op == "all-reduce" for s in shapes]
    assert sorted(reduced) == sorted([(T, cfg.embed_dim)] + [(T, D)] * (2 * cfg.num_layers)), found
    gathered = [s for op, shapes in found if op == "all-gather" for s in shapes]
    pool_shape = runner.pages[0][0].shape
    weight_shapes = {x.shape for x in jax.tree.leaves(runner.params.variables)}
    assert pool_shape not in gathered and not weight_shapes & set(gathered), found
    assert gathered == [(R, V)], found  # the logits, once, for sampling
    assert {op for op, _ in found} <= {"all-reduce", "all-gather"}, found


# --- memory ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,tp", [("llama", 4), ("gpt_neox", 8)])
def test_per_device_memory_is_one_over_tp(folder, arch, tp):
    params = _load(folder(arch), tp)
    cfg, mesh = params.config, parallel.mesh_of(params)
    _, axes = abstract_params(cfg)
    flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, P))
    split = replicated = 0
    for x, a in zip(jax.tree.leaves(params.variables), flat_axes):
        tp_dims = [name in ("heads", "kv_heads", "mlp", "vocab") for name in a]
        want = tuple(n // tp if d else n for n, d in zip(x.shape, tp_dims))
        assert len(x.addressable_shards) == tp
        assert all(s.data.shape == want for s in x.addressable_shards), (a, x.shape)
        if any(tp_dims):
            split += x.nbytes
        else:  # norms, biases over the hidden dim, position tables
            replicated += x.nbytes
    per_device = parallel.per_device_bytes(params.variables)
    assert set(per_device.values()) == {split // tp + replicated}
    assert split > 8 * replicated  # nearly everything is split
    runner = ModelRunner(params, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=16,
                         num_pages=16, precompile=False, mesh=mesh)
    pool = parallel.per_device_bytes(runner.pages)
    assert set(pool.values()) == {page_pool.pages_bytes(runner.pages) // tp}
    assert runner.pages[0][0].addressable_shards[0].data.shape[2] == cfg.num_kv_heads // tp


def test_random_weights_are_drawn_into_their_shards():
    from pagedjax.dummy_weights import random_params

    cfg = get_config("tiny-llama")  # 4 heads, 2 kv heads
    mesh = parallel.make_mesh(4)
    params = random_params(parallel.tp_config(cfg, 4), dtype=np.float32,
                           shardings=parallel.param_shardings(cfg, mesh))
    k = params.variables["params"]["layers_0"]["attn"]["k_proj"]["kernel"]  # [D, K = tp, H]
    assert k.shape == (64, 4, 16) and {s.data.shape for s in k.addressable_shards} == {(64, 1, 16)}
    assert parallel.shard_params(params, mesh).variables["params"]["layers_0"]["attn"]["k_proj"]["kernel"] is k


# --- the public API -------------------------------------------------------------------------


def test_generate_shards_params_given_on_one_device(folder):
    ref = _greedy(folder("llama"), 1)
    params = load_params(folder("llama"), dtype=np.float32, progress=False)  # one device
    outs = pj.generate(params, PROMPTS, GREEDY, use_tqdm=False, tensor_parallel_size=4, **ENGINE)
    assert [o.outputs[0].token_ids for o in outs] == ref
    runner = pj.api._last[2].engine.runner
    assert runner.params.config.num_kv_heads == 4 and parallel.tp_size(runner.mesh) == 4
    # the same placement as loading straight into shards
    direct = _load(folder("llama"), 4)
    for a, b in zip(jax.tree.leaves(runner.params.variables), jax.tree.leaves(direct.variables)):
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim)
    chex.assert_trees_all_equal(runner.params.variables, direct.variables)


def test_generate_takes_the_mesh_of_sharded_params(folder):
    ref = _greedy(folder("llama"), 1)
    params = _load(folder("llama"), 2)
    outs = pj.generate(params, PROMPTS, GREEDY, use_tqdm=False, **ENGINE)  # no tensor_parallel_size
    assert [o.outputs[0].token_ids for o in outs] == ref
    engine = pj.api._last[2].engine
    assert engine.config.tensor_parallel_size == 2 and engine.runner.mesh == parallel.mesh_of(params)


def test_bad_tensor_parallel_sizes_raise(folder):
    params = _load(folder("opt"), 2)
    with pytest.raises(ValueError, match="attention heads"):
        pj.LLM(params, tensor_parallel_size=3, **ENGINE)
    with pytest.raises(ValueError, match="sharded over 2 devices"):
        pj.LLM(params, tensor_parallel_size=1, **ENGINE)
    with pytest.raises(ValueError, match="not both"):
        load_params(folder("opt"), mesh=parallel.make_mesh(2), shardings=parallel.replicated(
            parallel.make_mesh(2)), progress=False)


def test_replica_meshes_split_data_parallel_rows():
    mesh = parallel.make_mesh(4, data_parallel_size=2)
    assert dict(mesh.shape) == {"dp": 2, "tp": 4}
    rows = parallel.replica_meshes(mesh)
    assert [r.devices.ravel().tolist() for r in rows] == [jax.devices()[:4], jax.devices()[4:]]
    assert all(parallel.tp_size(r) == 4 and r.axis_names == ("dp", "tp") for r in rows)


# --- the custom call under tensor parallelism -----------------------------------------------


def _ffi_setup(tp: int):
    from pagedjax import _ffi
    from pagedjax.dummy_weights import random_params

    if ("pagedjax_paged_attention", "cpu") not in _ffi.register():
        pytest.fail("the pagedjax._kernels CPU paged-attention handler is not built", pytrace=False)
    cfg, mesh = get_config("tiny-llama"), parallel.make_mesh(tp)  # head dim 16, 2 kv heads
    params = random_params(parallel.tp_config(cfg, tp), dtype=np.float32, seed=1,
                           shardings=parallel.param_shardings(cfg, mesh))
    return params, mesh


def test_ffi_attention_under_tp_matches_reference():
    params, mesh = _ffi_setup(2)
    cfg, rep = params.config, parallel.replicated(mesh)
    meta = build_metadata([7, 1, 5], [7, 9, 12], [[1, 2], [3, 4, 5], [6, 7, 8]], page_size=PAGE,
                          num_pages=16, num_tokens=16, num_reqs=4, max_pages=4,
                          logits_indices=list(range(13)))
    toks = np.random.default_rng(2).integers(0, cfg.vocab_size, 16).astype(np.int32)
    out = {}
    for impl in ("reference", "ffi"):
        pages = page_pool.init_pages(cfg.num_layers, 16, PAGE, cfg.num_kv_heads, cfg.head_dim,
                                     np.float32, sharding=parallel.pool_sharding(cfg, mesh))
        logits, pages = _forward(cfg, mesh, impl)(params.variables, pages, *jax.device_put((toks, meta), rep))
        out[impl] = np.asarray(logits), np.asarray(pages[1][1])
    np.testing.assert_allclose(out["ffi"][0], out["reference"][0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["ffi"][1], out["reference"][1], rtol=1e-5, atol=1e-6)


def test_ffi_step_keeps_the_pool_split():
    params, mesh = _ffi_setup(2)
    runner = ModelRunner(params, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=16,
                         num_pages=16, precompile=False, mesh=mesh, attn_impl="ffi")
    buf, layout = pack(runner._dummy_inputs(16)[0])
    buf = jax.device_put(buf, runner.input_sharding)
    hlo = _step.lower(params.config, "ffi", runner.params.variables, runner.pages, buf, runner._no_prev,
                      layout=layout, mesh=runner.mesh).compile().as_text()
    gathered = [s for op, shapes in _collectives(hlo) if op == "all-gather" for s in shapes]
    assert gathered == [(4, params.config.vocab_size)], gathered  # the logits only
