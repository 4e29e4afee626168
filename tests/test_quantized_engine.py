"""Quantization through the engine: the FP8 KV cache under prefix caching, swap and copy-on-write;
quantized weights under tensor parallelism; random quantized weights; and the refusals.

The FP8 pool stores what the model computes, quantized per token, so a page reused from the
prefix cache, swapped to host memory and back, or copied for a fork holds exactly the bytes a
fresh computation would: each path must give the tokens of a plain run (fp8 pool, no cache, no
preemption). Tensor parallelism (fake CPU devices) must give the tokens of one device.
"""

from __future__ import annotations

import json
import logging
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import pagedjax as pj
from pagedjax import parallel
from pagedjax.engine import EngineConfig, LLMEngine
from pagedjax.models import get_config
from pagedjax.weights import load_params
from tests import hf_models

GREEDY = pj.SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
BASE = dict(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=128, attn_impl="reference")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    hf_models.build("llama", path, seed=11)
    return path


@pytest.fixture(scope="module")
def params(folder):
    return load_params(folder, dtype=np.float32, progress=False)


def run(engine: LLMEngine, arrivals: dict[int, list[tuple[str, list[int], pj.SamplingParams]]]):
    """Steps to completion, adding arrivals[k] before step k; {request id: RequestOutput}."""
    done, step = {}, 0
    while engine.has_unfinished_requests() or any(k >= step for k in arrivals):
        for rid, prompt, sp in arrivals.get(step, []):
            engine.add_request(rid, prompt, sp)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        step += 1
        assert step < 2000
    stats = engine.stats()
    assert stats.num_free_pages == stats.num_usable_pages and stats.num_free_host_pages == stats.num_host_pages
    return done


def tokens(outs, rid):
    return outs[rid].outputs[0].token_ids


def plain(params, prompts, sp=GREEDY, **opts):
    """Tokens of each prompt with an fp8 pool, alone in a big pool, no prefix cache."""
    engine = LLMEngine(params, EngineConfig(**{**BASE, "kv_cache_dtype": "fp8", "enable_prefix_caching": False,
                                               "num_pages": 64, **opts}))
    outs = run(engine, {0: [(f"r{i}", p, sp) for i, p in enumerate(prompts)]})
    return [tokens(outs, f"r{i}") for i in range(len(prompts))]


# --- the FP8 KV cache -----------------------------------------------------------------------


def test_fp8_pool_is_e4m3_and_logged(folder, caplog):
    bf16 = load_params(folder, dtype=jnp.bfloat16, progress=False)
    with caplog.at_level(logging.INFO, logger="pagedjax"):
        engine = LLMEngine(bf16, EngineConfig(**BASE, kv_cache_dtype="fp8", num_pages=33, precompile=False))
    assert engine.runner.pages[0][0].dtype == jnp.float8_e4m3fn
    assert "holds 2x the pages of a bfloat16 pool in the same memory" in caplog.text, caplog.text
    auto = LLMEngine(bf16, EngineConfig(**BASE, precompile=False, num_pages=33))
    assert engine.runner.page_bytes() * 2 == auto.runner.page_bytes()


def test_fp8_pool_prefix_cache_hits_give_the_plain_tokens(params):
    rng = np.random.default_rng(1)
    prefix = hf_models.random_prompts(rng, 1, 40, 40)[0]
    prompts = [prefix + s for s in hf_models.random_prompts(rng, 6, 1, 9)]
    engine = LLMEngine(params, EngineConfig(**BASE, kv_cache_dtype="fp8"))
    outs = run(engine, {0: [("r0", prompts[0], GREEDY)], 14: [(f"r{i}", p, GREEDY) for i, p in enumerate(prompts)
                                                                if i]})
    assert engine.stats().prefix_cache_hits >= 5 * 32  # two full pages of 16 per later request
    assert [tokens(outs, f"r{i}") for i in range(len(prompts))] == plain(params, prompts)


def test_fp8_pool_swapped_out_and_in_gives_the_plain_tokens(params):
    rng = np.random.default_rng(2)
    prompts = hf_models.random_prompts(rng, 10, 10, 30)
    sp = pj.SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    engine = LLMEngine(params, EngineConfig(**BASE, kv_cache_dtype="fp8", page_size=4, num_pages=26,
                                            preemption_mode="swap", swap_space=2**-10))
    assert engine.runner.host_pages.dtype == jnp.float8_e4m3fn
    outs = run(engine, {0: [(f"r{i}", p, sp) for i, p in enumerate(prompts)]})
    stats = engine.stats()
    assert stats.num_preemptions > 0 and stats.num_swapped_in > 0
    assert [tokens(outs, f"r{i}") for i in range(len(prompts))] == plain(params, prompts, sp, page_size=4)


def test_fp8_pool_forks_copy_on_write_give_the_independent_tokens(params):
    """n=4 samples share the prompt's pages; the partial last page is copied before a sample writes it."""
    p = hf_models.random_prompts(np.random.default_rng(3), 1, 21, 21)[0]  # 21 tokens: a partial second page
    sp = pj.SamplingParams(n=4, temperature=0.9, seed=7, max_tokens=10, ignore_eos=True)
    engine = LLMEngine(params, EngineConfig(**BASE, kv_cache_dtype="fp8", enable_prefix_caching=False))
    copies, launch = [], engine.runner.launch
    engine.runner.launch = lambda batch, cow=(), *a, **k: (copies.extend(cow), launch(batch, cow, *a, **k))[1]
    shared = run(engine, {0: [("n4", p, sp)]})["n4"]
    assert copies, "no copy-on-write happened"
    singles = [pj.SamplingParams(temperature=0.9, seed=7 + i, max_tokens=10, ignore_eos=True) for i in range(4)]
    engine2 = LLMEngine(params, EngineConfig(**BASE, kv_cache_dtype="fp8", enable_prefix_caching=False))
    outs = run(engine2, {0: [(f"i{i}", p, s) for i, s in enumerate(singles)]})
    assert [c.token_ids for c in shared.outputs] == [tokens(outs, f"i{i}") for i in range(4)]
    assert len({tuple(c.token_ids) for c in shared.outputs}) > 1


def test_fp8_pool_under_tensor_parallelism(folder, params):
    prompts = hf_models.random_prompts(np.random.default_rng(4), 3, 5, 30)
    one = plain(params, prompts)
    llm = pj.LLM(str(folder), dtype=np.float32, tensor_parallel_size=2, kv_cache_dtype="fp8",
                 enable_prefix_caching=False, num_pages=64, **BASE)
    assert len(llm.engine.runner.pages[0][0].sharding.device_set) == 2
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == one


# --- quantized weights ----------------------------------------------------------------------


@pytest.mark.parametrize("tp", [2, 4])
def test_fp8_weights_under_tensor_parallelism(folder, tp):
    """Loaded straight into shards, and sharded from one device (kv heads replicated at tp 4)."""
    prompts = hf_models.random_prompts(np.random.default_rng(5), 3, 5, 30)
    fp8 = load_params(folder, dtype=np.float32, progress=False, quantization="fp8")
    ref = [o.outputs[0].token_ids for o in pj.generate(fp8, prompts, GREEDY, use_tqdm=False, **BASE)]
    direct = pj.LLM(str(folder), dtype=np.float32, quantization="fp8", tensor_parallel_size=tp, **BASE)
    assert direct.engine.params.config.quantization.name == "fp8"
    assert [o.outputs[0].token_ids for o in direct.generate(prompts, GREEDY, use_tqdm=False)] == ref
    del direct
    outs = pj.generate(fp8, prompts, GREEDY, use_tqdm=False, tensor_parallel_size=tp, **BASE)
    assert [o.outputs[0].token_ids for o in outs] == ref
    runner = pj.api._last[2].engine.runner
    k = runner.params.variables["params"]["layers_0"]["attn"]["k_proj"]
    assert k["qvalue"].shape[0] == max(2, tp) * 16 and len(k["qvalue"].sharding.device_set) == tp


@pytest.mark.parametrize("method", ["fp8", "awq"])
def test_random_quantized_weights_are_drawn_into_their_shards(method):
    from pagedjax.dummy_weights import quant_config, random_params

    cfg = get_config("tiny-llama").replace(num_heads=8)  # 8 heads of 16 (int4: o_proj's K splits whole 64-tiles)
    mesh = parallel.make_mesh(2)
    shardings = parallel.param_shardings(cfg.replace(quantization=quant_config(method, cfg)), mesh)
    params = random_params(cfg, dtype=np.float32, quantization=method, shardings=shardings)
    down = params.variables["params"]["layers_1"]["mlp"]["down_proj"]  # row parallel: split along K
    if method == "fp8":
        assert down["qvalue"].dtype == jnp.float8_e4m3fn and down["qvalue"].sharding.spec == P(None, "tp")
        assert float(jnp.abs(down["qvalue"].astype(jnp.float32)).max()) == 448.0  # amax / 448 scales
    else:
        assert down["qvalue"].shape == (4, 2, 32, 4) and down["zero"].dtype == jnp.uint8
        assert down["qvalue"].sharding.spec == P(None, "tp", None, None)
    assert params.variables["params"]["embed"]["embedding"].dtype == jnp.float32
    outs = pj.generate(params, [[5, 6, 7]], GREEDY, use_tqdm=False, quantization=method, **BASE)
    assert len(outs[0].outputs[0].token_ids) == GREEDY.max_tokens


# --- refusals -------------------------------------------------------------------------------


def _with_config(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **changes}))
    return dst


def test_bad_quantization_requests_raise(folder, params, tmp_path):
    with pytest.raises(ValueError, match="quantization='awq' needs a checkpoint quantized with it"):
        load_params(folder, quantization="awq", progress=False)
    with pytest.raises(ValueError, match="quantization 'int8' is not supported"):
        load_params(folder, quantization="int8", progress=False)
    with pytest.raises(ValueError, match="quantization must be one of"):
        EngineConfig(quantization="int8")
    with pytest.raises(ValueError, match="these params are not quantized"):
        LLMEngine(params, EngineConfig(quantization="fp8"))
    awq = {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm"}
    with pytest.raises(ValueError, match="does not match the checkpoint's quantization_config"):
        load_params(_with_config(folder, tmp_path / "awq", quantization_config=awq), quantization="fp8",
                    progress=False)
    # an AWQ config over float tensors: the quantized tensors are missing, nothing loads as garbage
    with pytest.raises(ValueError, match="checkpoint lacks"):
        load_params(tmp_path / "awq", progress=False)


def test_unsupported_quantized_checkpoints_raise(tmp_path):
    gpt2 = tmp_path / "gpt2"
    hf_models.build("gpt2", gpt2, seed=0)
    with pytest.raises(ValueError, match="quantized checkpoints .'fp8'. are not supported for gpt2"):
        load_params(gpt2, quantization="fp8", progress=False)
    llama = tmp_path / "llama"
    hf_models.build("llama", llama, seed=0)
    ct = {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {},
          "kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "channel", "dynamic": False}}
    with pytest.raises(ValueError, match="kv_cache_scheme.strategy"):
        load_params(_with_config(llama, tmp_path / "ct", quantization_config=ct), progress=False)
    with pytest.raises(ValueError, match="quantization method 'bitsandbytes' is not supported"):
        load_params(_with_config(llama, tmp_path / "bnb", quantization_config={"quant_method": "bitsandbytes"}),
                    progress=False)
