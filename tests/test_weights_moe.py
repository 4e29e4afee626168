"""Loading MoE checkpoints: per-expert tensors stacked into [X, ...] arrays, in every layout.

HF folders (one tensor per expert, as transformers saves them; sharded; transformers 5's fused
in-memory layout) and GGUF files (written here with the `gguf` package under llama.cpp's tensor
names and keys) all give the same weights; the HF layout is checked tensor by tensor against the
checkpoint. Bad checkpoints are clear ValueErrors.
"""

from __future__ import annotations

import json

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from pagedjax.params import Params
from pagedjax.weights import load_params

_SMALL = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=40, max_position_embeddings=64, initializer_range=0.3, bos_token_id=1, eos_token_id=2,
              tie_word_embeddings=False)
CONFIGS = {
    "mixtral": (MixtralForCausalLM, lambda: MixtralConfig(**_SMALL, num_local_experts=6, num_experts_per_tok=2)),
    # every layer sparse and the top k renormalized: what llama.cpp's qwen3moe runs (for the GGUF test)
    "qwen3_moe": (Qwen3MoeForCausalLM, lambda: Qwen3MoeConfig(
        **_SMALL, head_dim=16, num_experts=6, num_experts_per_tok=3, moe_intermediate_size=24, norm_topk_prob=True)),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """arch -> (folder of the HF checkpoint, the HF model), built once."""
    built = {}

    def get(arch):
        if arch not in built:
            folder = tmp_path_factory.mktemp(arch)
            cls, config = CONFIGS[arch]
            torch.manual_seed(len(arch))
            model = cls(config()).eval()
            model.save_pretrained(folder)
            built[arch] = folder, model
        return built[arch]

    return get


def load(folder) -> Params:
    return load_params(folder, dtype=jnp.float32, progress=False)


def assert_same_params(a: Params, b: Params):
    assert a.config.replace(name="") == b.config.replace(name=""), (a.config, b.config)
    assert jax.tree.structure(a.variables) == jax.tree.structure(b.variables)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a.variables), jax.tree.leaves(b.variables)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def state_dict(folder) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(folder / "model.safetensors")


def copy_config(src, dst):
    dst.mkdir(exist_ok=True)
    (dst / "config.json").write_text((src / "config.json").read_text())


# names of one layer's expert tensors in the HF checkpoint, by our leaf
_HF_EXPERTS = {
    "mixtral": ("block_sparse_moe", {"experts_gate_proj": "w1", "experts_up_proj": "w3", "experts_down_proj": "w2"}),
    "qwen3_moe": ("mlp", {"experts_gate_proj": "gate_proj", "experts_up_proj": "up_proj",
                          "experts_down_proj": "down_proj"}),
}


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_experts_are_stacked_from_the_hf_tensors(checkpoints, arch):
    folder, _ = checkpoints(arch)
    params, sd = load(folder), state_dict(folder)
    cfg = params.config
    assert cfg.num_experts == 6 and cfg.num_experts_per_tok == CONFIGS[arch][1]().num_experts_per_tok
    block, names = _HF_EXPERTS[arch]
    for layer in range(cfg.num_layers):
        mlp = params.variables["params"][f"layers_{layer}"]["mlp"]
        prefix = f"model.layers.{layer}.{block}"
        np.testing.assert_array_equal(np.asarray(mlp["gate"]["kernel"]), sd[f"{prefix}.gate.weight"].numpy().T)
        for leaf, hf in names.items():
            got = np.asarray(mlp[leaf])  # [X, D, F] or [X, F, D]
            assert got.shape[0] == cfg.num_experts
            for e in range(cfg.num_experts):  # torch Linear [out, in] -> our [in, out]
                np.testing.assert_array_equal(got[e], sd[f"{prefix}.experts.{e}.{hf}.weight"].numpy().T,
                                              err_msg=f"{arch} layer {layer} {leaf} expert {e}")


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_sharded_and_fused_layouts_give_the_same_params(checkpoints, arch, tmp_path):
    folder, model = checkpoints(arch)
    reference = load(folder)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")  # experts of a layer split over files
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 3
    assert_same_params(load(tmp_path / "sharded"), reference)
    # transformers 5 holds experts stacked, gate|up fused: mlp.experts.gate_up_proj [X, 2F, D], down_proj [X, D, F]
    fused = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in fused), sorted(fused)[:8]
    copy_config(folder, tmp_path / "fused")
    safetensors.torch.save_file(fused, tmp_path / "fused" / "model.safetensors")
    assert_same_params(load(tmp_path / "fused"), reference)


def test_bad_expert_checkpoints_are_refused(checkpoints, tmp_path):
    folder, model = checkpoints("mixtral")
    sd = state_dict(folder)
    copy_config(folder, tmp_path / "missing")
    safetensors.torch.save_file({k: v for k, v in sd.items() if "layers.1.block_sparse_moe.experts.4.w3" not in k},
                                tmp_path / "missing" / "model.safetensors")
    with pytest.raises(ValueError, match=r"lacks tensors.*layers\.1\.block_sparse_moe\.experts\.4\.w3"):
        load(tmp_path / "missing")
    copy_config(folder, tmp_path / "extra")  # an expert the config does not have
    extra = {**sd, "model.layers.0.block_sparse_moe.experts.6.w1.weight": sd[
        "model.layers.0.block_sparse_moe.experts.0.w1.weight"].clone()}
    safetensors.torch.save_file(extra, tmp_path / "extra" / "model.safetensors")
    with pytest.raises(ValueError, match=r"no place for.*experts\.6\.w1"):
        load(tmp_path / "extra")
    copy_config(folder, tmp_path / "both")  # per-expert and fused tensors for the same weights
    both = {**sd, "model.layers.0.mlp.experts.down_proj": model.state_dict()["model.layers.0.mlp.experts.down_proj"]}
    safetensors.torch.save_file({k: v.contiguous() for k, v in both.items()}, tmp_path / "both" / "model.safetensors")
    with pytest.raises(ValueError, match="both fill layers_0.mlp.experts_down_proj"):
        load(tmp_path / "both")
    cfg = json.loads((folder / "config.json").read_text())
    copy_config(folder, tmp_path / "shape")
    (tmp_path / "shape" / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 48}))
    safetensors.torch.save_file(sd, tmp_path / "shape" / "model.safetensors")
    with pytest.raises(ValueError, match=r"experts\.\d\.w\d\.weight has shape"):
        load(tmp_path / "shape")


# --- GGUF ------------------------------------------------------------------------------------


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows for its interleaved rotary."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, arch: str, hf_config, sd: dict[str, torch.Tensor], per_expert: bool = False):
    """A float32 GGUF of the HF weights under llama.cpp's names and keys (Mixtral is its `llama`)."""
    gguf_arch = {"mixtral": "llama", "qwen3_moe": "qwen3moe"}[arch]
    w = gguf.GGUFWriter(str(path), gguf_arch)
    c = hf_config
    H = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(H)
    w.add_value_length(H)
    w.add_rope_dimension_count(H)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_expert_count(getattr(c, "num_local_experts", None) or c.num_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    if arch == "qwen3_moe":
        w.add_expert_feed_forward_length(c.moe_intermediate_size)
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    names = gguf.TENSOR_NAMES
    T = gguf.MODEL_TENSOR
    np_sd = {k: v.numpy() for k, v in sd.items()}
    w.add_tensor(names[T.TOKEN_EMBD] + ".weight", np_sd["model.embed_tokens.weight"])
    w.add_tensor(names[T.OUTPUT_NORM] + ".weight", np_sd["model.norm.weight"])
    w.add_tensor(names[T.OUTPUT] + ".weight", np_sd["lm_head.weight"])
    block = "block_sparse_moe" if arch == "mixtral" else "mlp"
    hf_names = {"mixtral": ("w1", "w3", "w2"), "qwen3_moe": ("gate_proj", "up_proj", "down_proj")}[arch]
    for i in range(c.num_hidden_layers):
        b = lambda t: names[t].format(bid=i) + ".weight"
        p = f"model.layers.{i}."
        q, k = np_sd[p + "self_attn.q_proj.weight"], np_sd[p + "self_attn.k_proj.weight"]
        if gguf_arch == "llama":
            q, k = _llama_cpp_permute(q, c.num_attention_heads), _llama_cpp_permute(k, c.num_key_value_heads)
        else:
            w.add_tensor(b(T.ATTN_Q_NORM), np_sd[p + "self_attn.q_norm.weight"])
            w.add_tensor(b(T.ATTN_K_NORM), np_sd[p + "self_attn.k_norm.weight"])
        w.add_tensor(b(T.ATTN_Q), q)
        w.add_tensor(b(T.ATTN_K), k)
        w.add_tensor(b(T.ATTN_V), np_sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(b(T.ATTN_OUT), np_sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(b(T.ATTN_NORM), np_sd[p + "input_layernorm.weight"])
        w.add_tensor(b(T.FFN_NORM), np_sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(b(T.FFN_GATE_INP), np_sd[p + f"{block}.gate.weight"])
        X = sum(n.startswith(p + f"{block}.experts.") and n.endswith(f".{hf_names[0]}.weight") for n in np_sd)
        for t, hf in zip((T.FFN_GATE_EXP, T.FFN_UP_EXP, T.FFN_DOWN_EXP), hf_names):
            experts = [np_sd[p + f"{block}.experts.{e}.{hf}.weight"] for e in range(X)]  # [out, in] each
            if per_expert:  # llama.cpp's names before it stacked the experts (early 2024)
                short = names[t].format(bid=i).split(".")[-1].removesuffix("_exps")
                for e, x in enumerate(experts):
                    w.add_tensor(f"blk.{i}.{short}.{e}.weight", x)
            else:
                w.add_tensor(b(t), np.stack(experts))  # [X, out, in]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch,per_expert", [("mixtral", False), ("mixtral", True), ("qwen3_moe", False)])
def test_gguf_gives_the_hf_weights(checkpoints, arch, per_expert, tmp_path):
    folder, model = checkpoints(arch)
    path = tmp_path / f"{arch}.gguf"
    write_gguf(path, arch, model.config, state_dict(folder), per_expert=per_expert)
    got, want = load(path), load(folder)
    assert got.config.architecture == arch
    assert_same_params(got, want)
