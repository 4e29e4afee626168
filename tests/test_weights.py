"""load_params: every checkpoint format gives the same weights; bad input is a clear ValueError.

Also the config parser, the Params pytree, placement by `shardings`, and random weights.
"""

from __future__ import annotations

import json
import pickle
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from pagedjax.attention import build_metadata
from pagedjax.kv_cache.page_pool import init_pages
from pagedjax.models import abstract_params, get_config, get_model
from pagedjax.models.config import ModelConfig, RopeScaling
from pagedjax.dummy_weights import random_params
from pagedjax.params import Params
from pagedjax.weights import load_params

LLAMA = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=48, max_position_embeddings=32, initializer_range=0.3, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny Llama saved as one model.safetensors (the format every other one is checked against)."""
    d = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**LLAMA)).eval().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def reference(llama_dir):
    return load_params(llama_dir, dtype=jnp.float32, progress=False)


def copy_config(src, dst, **changes):
    """dst/config.json = src's, with top-level keys changed (None deletes)."""
    cfg = json.loads((src / "config.json").read_text())
    for k, v in changes.items():
        cfg.pop(k, None) if v is None else cfg.__setitem__(k, v)
    dst.mkdir(exist_ok=True)
    (dst / "config.json").write_text(json.dumps(cfg))


def state_dict(folder):
    return safetensors.torch.load_file(folder / "model.safetensors")


def assert_same_params(a: Params, b: Params):
    assert a.config.replace(name="") == b.config.replace(name="")
    assert jax.tree.structure(a.variables) == jax.tree.structure(b.variables)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --- formats ----------------------------------------------------------------------------------


def test_reference_load(reference, llama_dir):
    assert reference.config.architecture == "llama"
    assert reference.tokenizer is None  # no tokenizer files in this folder
    shapes, _ = abstract_params(reference.config)
    assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(lambda x: x.shape, reference.variables["params"])
    sd = state_dict(llama_dir)  # spot-check the layout: q_proj [N*H, D] -> kernel [D, N, H]
    q = sd["model.layers.1.self_attn.q_proj.weight"].numpy()
    np.testing.assert_array_equal(np.asarray(reference.variables["params"]["layers_1"]["attn"]["q_proj"]["kernel"]),
                                  q.T.reshape(32, 4, 8))


def test_sharded_safetensors(llama_dir, reference, tmp_path):
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**LLAMA)).eval().save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    assert_same_params(load_params(tmp_path, dtype=jnp.float32, progress=False), reference)


def test_pytorch_bin_single_and_sharded(llama_dir, reference, tmp_path):
    sd = state_dict(llama_dir)
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    copy_config(llama_dir, single)
    torch.save(sd, single / "pytorch_model.bin")
    assert_same_params(load_params(single, dtype=jnp.float32, progress=False), reference)

    copy_config(llama_dir, sharded)
    names = sorted(sd)
    parts = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for file, keys in parts.items():
        torch.save({k: sd[k] for k in keys}, sharded / file)
    index = {"weight_map": {k: f for f, keys in parts.items() for k in keys}}
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    assert_same_params(load_params(sharded, dtype=jnp.float32, progress=False), reference)


def test_bf16_checkpoint_and_dtype_conversion(llama_dir, reference, tmp_path):
    copy_config(llama_dir, tmp_path)
    safetensors.torch.save_file({k: v.bfloat16() for k, v in state_dict(llama_dir).items()},
                                tmp_path / "model.safetensors")
    for dtype in (jnp.float32, jnp.bfloat16):
        got = load_params(tmp_path, dtype=dtype, progress=False)
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(reference)):
            assert x.dtype == dtype
            np.testing.assert_array_equal(np.asarray(x, np.float32),
                                          np.asarray(jnp.asarray(y, jnp.bfloat16), np.float32))


def test_tokenizer_folder_is_recorded(llama_dir, tmp_path):
    shutil.copytree(llama_dir, tmp_path / "m")
    (tmp_path / "m" / "tokenizer.json").write_text("{}")
    assert load_params(tmp_path / "m", dtype=jnp.float32, progress=False).tokenizer == str(tmp_path / "m")


def test_gpt2_bare_model_names_and_legacy_buffers(tmp_path):
    """GPT2Model-style names (no "transformer." prefix), tied head, and old attn.bias buffers."""
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "full")
    ref = load_params(tmp_path / "full", dtype=jnp.float32, progress=False)
    sd = {k.removeprefix("transformer."): v for k, v in state_dict(tmp_path / "full").items()}
    sd["h.0.attn.bias"] = torch.ones(1, 1, 16, 16)  # the causal-mask buffer old checkpoints carry
    copy_config(tmp_path / "full", tmp_path / "bare")
    torch.save(sd, tmp_path / "bare" / "pytorch_model.bin")
    assert_same_params(load_params(tmp_path / "bare", dtype=jnp.float32, progress=False), ref)


# --- errors -----------------------------------------------------------------------------------


def test_missing_files(llama_dir, tmp_path):
    with pytest.raises(ValueError, match="no such checkpoint"):
        load_params(tmp_path / "nope")
    with pytest.raises(ValueError, match="no config.json"):
        load_params(tmp_path)
    copy_config(llama_dir, tmp_path / "noweights")
    with pytest.raises(ValueError, match="no weights"):
        load_params(tmp_path / "noweights")
    copy_config(llama_dir, tmp_path / "badindex")
    (tmp_path / "badindex" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(ValueError, match="missing"):
        load_params(tmp_path / "badindex")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="neither"):
        load_params(tmp_path / "notes.txt")


def test_unknown_architecture(llama_dir, tmp_path):
    shutil.copytree(llama_dir, tmp_path / "m")
    copy_config(llama_dir, tmp_path / "m", architectures=["MambaForCausalLM"], model_type="mamba")
    with pytest.raises(ValueError, match="unsupported architecture.*Mamba"):
        load_params(tmp_path / "m")


def test_mismatched_shapes(llama_dir, tmp_path):
    shutil.copytree(llama_dir, tmp_path / "m")
    copy_config(llama_dir, tmp_path / "m", intermediate_size=40)
    with pytest.raises(ValueError, match=r"mlp\.\w+_proj\.weight has shape \((48, 32|32, 48)\), this config needs"):
        load_params(tmp_path / "m")
    # same element count, wrong layout: a transposed q_proj must not slip through a reshape
    copy_config(llama_dir, tmp_path / "t")
    sd = state_dict(llama_dir)
    sd["model.layers.0.mlp.up_proj.weight"] = sd["model.layers.0.mlp.up_proj.weight"].T.contiguous()
    safetensors.torch.save_file(sd, tmp_path / "t" / "model.safetensors")
    with pytest.raises(ValueError, match="up_proj.weight has shape"):
        load_params(tmp_path / "t")


def test_missing_and_unexpected_tensors(llama_dir, tmp_path):
    sd = state_dict(llama_dir)
    copy_config(llama_dir, tmp_path / "missing")
    safetensors.torch.save_file({k: v for k, v in sd.items() if "layers.1.mlp.up" not in k},
                                tmp_path / "missing" / "model.safetensors")
    with pytest.raises(ValueError, match=r"lacks tensors.*layers\.1\.mlp\.up_proj"):
        load_params(tmp_path / "missing")
    # biases the config does not ask for: an unsupported option, never silently dropped
    copy_config(llama_dir, tmp_path / "extra")
    safetensors.torch.save_file({**sd, "model.layers.0.self_attn.q_proj.bias": torch.zeros(32)},
                                tmp_path / "extra" / "model.safetensors")
    with pytest.raises(ValueError, match="no place for.*q_proj.bias"):
        load_params(tmp_path / "extra")


def test_bin_is_unpickled_as_tensors_only(llama_dir, tmp_path):
    copy_config(llama_dir, tmp_path)
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"w": torch.zeros(2), "evil": Exception("arbitrary object")}, f, protocol=2)
    with pytest.raises(ValueError, match="weights_only"):
        load_params(tmp_path)


def test_not_a_safetensors_file(llama_dir, tmp_path):
    copy_config(llama_dir, tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_params(tmp_path)


@pytest.mark.parametrize("changes,match", [
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
     r"rope_scaling 'yarn' lacks \['original_max_position_embeddings'\]"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4}}, r"rope_scaling 'dynamic' lacks \['factor'\]"),
    ({"rope_parameters": {"rope_type": "mrope", "factor": 2.0, "rope_theta": 1e4}}, "rope_scaling type 'mrope'"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}}, "lacks"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization method .gptq.: unsupported bits"),
    ({"quantization_config": {"quant_method": "bitsandbytes"}}, "quantization method .bitsandbytes. is not supported"),
    ({"hidden_act": "mish"}, "activation 'mish'"),
    ({"num_key_value_heads": 3}, "multiple of num_kv_heads"),
    ({"hidden_size": None}, "lacks the key 'hidden_size'"),
])
def test_unsupported_options(llama_dir, tmp_path, changes, match):
    shutil.copytree(llama_dir, tmp_path / "m")
    copy_config(llama_dir, tmp_path / "m", **changes)
    with pytest.raises(ValueError, match=match):
        load_params(tmp_path / "m")


# --- config parsing ---------------------------------------------------------------------------


def test_config_from_legacy_hf_dicts():
    """transformers 4 style keys: top-level rope_theta / rope_scaling, NeoX rotary_pct / rotary_emb_base."""
    llama = ModelConfig.from_hf(dict(
        architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336, rms_norm_eps=1e-5,
        rope_theta=500000.0, max_position_embeddings=131072, eos_token_id=[128001, 128008],
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}))
    assert llama.rope_theta == 500000.0 and llama.rotary_dim == 128 and llama.num_kv_heads == 8
    assert llama.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    assert llama.eos_token_ids == (128001, 128008)
    linear = ModelConfig.from_hf(dict(model_type="llama", vocab_size=10, hidden_size=8, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=8,
                                      rope_scaling={"type": "linear", "factor": 4.0}))
    assert linear.rope_scaling == RopeScaling("linear", 4.0)
    neox = ModelConfig.from_hf(dict(architectures=["GPTNeoXForCausalLM"], vocab_size=50304, hidden_size=512,
                                    num_hidden_layers=6, num_attention_heads=8, intermediate_size=2048,
                                    rotary_pct=0.25, rotary_emb_base=10000, use_parallel_residual=True))
    assert neox.rotary_dim == 16 and neox.parallel_residual and neox.head_dim == 64
    opt350 = ModelConfig.from_hf(dict(architectures=["OPTForCausalLM"], vocab_size=50272, hidden_size=1024,
                                      num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096,
                                      word_embed_proj_dim=512, do_layer_norm_before=False))
    assert opt350.embed_dim == 512 and not opt350.final_norm and opt350.activation == "relu"


def test_every_config_activation_is_implemented():
    from pagedjax.models import config, layers

    assert set(config.ACTIVATIONS) == set(layers.ACTIVATIONS)


def test_config_self_checks():
    with pytest.raises(ValueError, match="unknown model config"):
        get_config("llama-9000")
    with pytest.raises(ValueError, match="rotary_dim"):
        get_config("tiny-llama").replace(rotary_dim=15)
    with pytest.raises(ValueError, match="unknown architecture"):
        get_config("tiny-llama").replace(architecture="mamba")
    with pytest.raises(ValueError, match="grouped-query attention"):
        get_config("tiny-gpt2").replace(num_kv_heads=2)
    with pytest.raises(ValueError, match="rope_scaling type"):
        RopeScaling("mrope")
    with pytest.raises(ValueError, match="invalid rope_scaling"):  # dynamic NTK only extends too
        RopeScaling("dynamic", factor=0.5)
    with pytest.raises(ValueError, match="invalid rope_scaling"):  # yarn only extends
        RopeScaling("yarn", factor=0.5)
    with pytest.raises(ValueError, match="longrope"):  # its factors are needed
        RopeScaling("longrope")
    with pytest.raises(ValueError, match="longrope factors have 2 entries"):
        get_config("tiny-llama").replace(rope_scaling=RopeScaling("longrope", short_factor=(1.0, 2.0),
                                                                  long_factor=(1.0, 3.0)))
    with pytest.raises(ValueError, match="layer_types"):
        get_config("gemma2-9b").replace(layer_types=("sliding_attention",))
    with pytest.raises(ValueError, match="sliding_window=7 is not implemented for llama"):
        get_config("tiny-llama").replace(sliding_window=7)
    with pytest.raises(ValueError, match="GGUF architecture"):
        ModelConfig.from_gguf({"general.architecture": "falcon"}, [])
    assert hash(get_config("llama3-8b")) == hash(get_config("llama3-8b").replace())


# --- Params, placement, random weights --------------------------------------------------------


def test_params_is_a_pytree_carrying_config(reference):
    doubled = jax.jit(lambda p: jax.tree.map(lambda x: 2 * x, p))(reference)
    assert isinstance(doubled, Params) and doubled.config == reference.config
    assert doubled.tokenizer == reference.tokenizer
    a, b = jax.tree.leaves(reference)[0], jax.tree.leaves(doubled)[0]
    np.testing.assert_array_equal(np.asarray(b), 2 * np.asarray(a))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(reference)[0]]
    assert ".variables['params']['layers_0']['attn']['q_proj']['kernel']" in paths

def test_params_counts_what_the_checkpoint_holds(reference, llama_dir):
    n = sum(t.numel() for t in state_dict(llama_dir).values())
    assert reference.num_params == n and reference.nbytes == 4 * n
    assert f"{n:,} weights" in repr(reference)


def tp_sharding(mesh):
    """Megatron-style: shard heads / kv_heads / mlp / vocab over "tp", everything else replicated."""
    def fn(name, axes, shape):
        spec = [("tp" if a in ("heads", "kv_heads", "mlp", "vocab") and n % mesh.size == 0 else None)
                for a, n in zip(axes, shape.shape)]
        return NamedSharding(mesh, PartitionSpec(*spec))
    return fn


def test_shardings_hook_places_each_leaf(llama_dir, reference):
    mesh = Mesh(np.array(jax.devices()[:2]), ("tp",))
    sharded = load_params(llama_dir, dtype=jnp.float32, shardings=tp_sharding(mesh), progress=False)
    q = sharded.variables["params"]["layers_0"]["attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == PartitionSpec(None, "tp", None)
    assert len(q.addressable_shards) == 2 and q.addressable_shards[0].data.shape == (32, 2, 8)
    assert sharded.variables["params"]["final_norm"]["scale"].sharding.spec == PartitionSpec(None)
    assert_same_params(sharded, reference)
    # one Sharding for every leaf
    one = NamedSharding(mesh, PartitionSpec())
    replicated = load_params(llama_dir, dtype=jnp.float32, shardings=one, progress=False)
    assert all(x.sharding == one for x in jax.tree.leaves(replicated))


def test_random_params_on_device():
    # few distinct shapes: one jitted drawer compiles per (shape, sharding)
    cfg = get_config("tiny-llama").replace(vocab_size=32, hidden_size=32, num_heads=2, num_kv_heads=2,
                                           intermediate_size=32, num_layers=1)
    p = random_params(cfg, dtype=jnp.bfloat16, seed=1)
    shapes, _ = abstract_params(cfg)
    assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(lambda x: x.shape, p.variables["params"])
    assert {x.dtype for x in jax.tree.leaves(p)} == {jnp.dtype(jnp.bfloat16)}
    assert_same_params(p, random_params(cfg, dtype=jnp.bfloat16, seed=1))
    other = random_params(cfg, dtype=jnp.bfloat16, seed=2)
    assert not np.array_equal(np.asarray(jax.tree.leaves(p)[0], np.float32),
                              np.asarray(jax.tree.leaves(other)[0], np.float32))
    w = np.asarray(p.variables["params"]["layers_0"]["mlp"]["up_proj"]["kernel"], np.float32)
    assert abs(w.std() - 0.02) < 0.004
    np.testing.assert_array_equal(np.asarray(p.variables["params"]["final_norm"]["scale"], np.float32), 1.0)
    # sharded straight out of the jitted draw
    mesh = Mesh(np.array(jax.devices()[:2]), ("tp",))
    ps = random_params(cfg, dtype=jnp.bfloat16, seed=1, shardings=tp_sharding(mesh))
    assert ps.variables["params"]["embed"]["embedding"].sharding.spec == PartitionSpec("tp", None)
    assert_same_params(ps, p)
    # and it runs
    pages = init_pages(cfg.num_layers, 4, 4, cfg.num_kv_heads, cfg.head_dim, jnp.bfloat16)
    meta = build_metadata([3], [3], [[2]], page_size=4, num_pages=4)
    logits, _ = get_model(cfg).apply(p.variables, np.array([1, 2, 3], np.int32), pages, meta)
    assert logits.shape == (1, cfg.vocab_size) and np.isfinite(np.asarray(logits)).all()


def test_random_params_drawers_come_from_the_executable_cache(tmp_path, monkeypatch):
    """The drawers are kept in pagedjax's executable cache: a later process (a fresh in-memory
    cache over the same directory) loads every one of them and compiles none, and draws the
    same weights; quantized linears too."""
    from pagedjax import compile_cache

    monkeypatch.setenv("PAGEDJAX_COMPILE_CACHE", str(tmp_path))
    monkeypatch.setattr(compile_cache, "_CACHES", {})
    cfg = get_config("tiny-llama").replace(vocab_size=32, hidden_size=64, num_heads=2, num_kv_heads=2,
                                           intermediate_size=64, num_layers=2)
    first = random_params(cfg, dtype=jnp.bfloat16, seed=3)
    fp8 = random_params(cfg, dtype=jnp.bfloat16, seed=3, quantization="fp8")
    cold = compile_cache.executable_cache(str(tmp_path))
    assert cold.misses >= 5 and cold.disk_hits == 0  # one per distinct leaf kind, shared by the layers
    monkeypatch.setattr(compile_cache, "_CACHES", {})  # as a new process would start
    again = random_params(cfg, dtype=jnp.bfloat16, seed=3)
    fp8_again = random_params(cfg, dtype=jnp.bfloat16, seed=3, quantization="fp8")
    warm = compile_cache.executable_cache(str(tmp_path))
    assert warm.misses == 0 and warm.disk_hits == cold.misses
    assert_same_params(again, first)
    assert_same_params(fp8_again, fp8)
