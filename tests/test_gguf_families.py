"""GGUF files of the newer families (qwen2, qwen3, gemma2, gemma3, phi3) against the HF model they
were written from.

Each case builds a tiny random HF model (large weights, so a wrong layout shows), writes it as a
float32 GGUF file the way llama.cpp's converter does (tensor names from the `gguf` package's own
HF -> GGUF name map, llama.cpp's metadata keys, Gemma's norms stored as 1 + w), loads the file
with load_params and compares logits with the HF model. Where transformers reads that GGUF
architecture, the weights it takes from the file are checked against the HF model's too, so the
file follows llama.cpp's conventions as transformers knows them, not just ones our reader agrees
with (only the weights: transformers' GGUF config reading leaves out the windows, soft-caps and
query_pre_attn_scalar, and has no head_dim for qwen3, whose file it is not asked to read).
"""

from __future__ import annotations

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from pagedjax.weights import load_params

from tests.test_models import INIT, V, PagedRunner, build_hf, hf_logits, rel_err, run_schedule

TOL = 1e-4
_BASE = dict(vocab_size=V, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=96, max_position_embeddings=64, initializer_range=INIT, bos_token_id=0,
             eos_token_id=1, pad_token_id=2)
_GEMMA = dict(_BASE, head_dim=16, query_pre_attn_scalar=16, attn_implementation="eager")
CASES = {  # name: (HF class, config, GGUF arch, transformers reads it)
    "qwen2-tied": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config(
        **_BASE, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6}), "qwen2", True),
    "qwen3-headdim24-untied": (transformers.Qwen3ForCausalLM, transformers.Qwen3Config(
        **_BASE, head_dim=24, tie_word_embeddings=False), "qwen3", False),
    # YaRN as llama.cpp's converter writes it (rope.scaling.type yarn, factor, original context, betas)
    "qwen3-yarn-factor4-betas": (transformers.Qwen3ForCausalLM, transformers.Qwen3Config(
        **_BASE, head_dim=16, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                               "original_max_position_embeddings": 16, "beta_fast": 16.0,
                                               "beta_slow": 2.0}), "qwen3", False),
    "qwen2-yarn-factor2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config(
        **_BASE, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0,
                                  "original_max_position_embeddings": 32}), "qwen2", False),
    # llama.cpp's gemma2: sliding layers first, alternating; the window and both soft-caps in the file
    "gemma2-softcaps": (transformers.Gemma2ForCausalLM, transformers.Gemma2Config(
        **_GEMMA, sliding_window=5, attn_logit_softcapping=2.0, final_logit_softcapping=3.0), "gemma2", True),
    # llama.cpp's gemma3: 5 local layers to 1 global, local rotary base 10000
    "gemma3-pattern6": (transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig(
        **{**_GEMMA, "num_hidden_layers": 7}, sliding_window=5,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}), "gemma3", True),
    "phi3-window": (transformers.Phi3ForCausalLM, transformers.Phi3Config(
        **_BASE, sliding_window=6), "phi3", True),
}


def write_gguf(model, arch: str, path) -> None:
    """The HF `model` as a float32 GGUF file in llama.cpp's layout (convert_hf_to_gguf's choices)."""
    cfg = model.config
    arch_id = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    names = gguf.get_tensor_name_map(arch_id, cfg.num_hidden_layers)
    w = gguf.GGUFWriter(str(path), arch)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_vocab_size(cfg.vocab_size)
    rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)
    w.add_rope_freq_base(rope["rope_theta"])
    if rope.get("rope_type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        for key in ("beta_fast", "beta_slow"):
            if key in rope:
                getattr(w, f"add_rope_scaling_yarn_{key}")(rope[key])
    if arch == "phi3":
        w.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    if getattr(cfg, "sliding_window", None):
        w.add_sliding_window(cfg.sliding_window)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"<t{i}>" for i in range(cfg.vocab_size)])
    w.add_token_types([1] * cfg.vocab_size)
    w.add_token_merges([])
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    w.add_pad_token_id(cfg.pad_token_id)
    tied = cfg.tie_word_embeddings
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and tied:
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert name is not None, hf_name
        x = t.float().numpy()
        if arch.startswith("gemma") and hf_name.endswith("norm.weight"):
            x = x + 1  # llama.cpp's converter: Gemma's (1 + w) norm stored as a plain scale
        w.add_tensor(name, np.ascontiguousarray(x, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("case", sorted(CASES))
def test_gguf_matches_the_hf_model(case, tmp_path):
    cls, config, arch, hf_reads = CASES[case]
    hf = build_hf(cls, config, tmp_path / "hf")
    path = tmp_path / f"{case}.gguf"
    write_gguf(hf, arch, path)
    params = load_params(path, dtype=jnp.float32, progress=False)
    assert params.config.architecture == arch
    seed = len(case)
    rng = np.random.default_rng(seed)
    prompts = {r: [int(t) for t in rng.integers(3, V, n)] for r, n in {"a": 13, "b": 9, "c": 17}.items()}
    refs = {r: hf_logits(hf, p) for r, p in prompts.items()}
    got = run_schedule(PagedRunner(params, seed=seed), prompts,
                       [{"a": 13, "b": 4, "c": 8}, {"b": 5, "c": 9}])
    for r, lg in got.items():
        assert rel_err(lg, refs[r]) < TOL, f"{case} (seed {seed}) request {r}: {rel_err(lg, refs[r]):.2e}"
    if hf_reads:  # transformers' own GGUF reader takes the same weights from the file
        theirs = cls.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).state_dict()
        for name, t in hf.state_dict().items():
            np.testing.assert_allclose(theirs[name].numpy(), t.numpy(), rtol=1e-6, atol=1e-6, err_msg=name)


def test_gguf_yarn_overrides_with_other_meanings_are_refused(tmp_path):
    cls, config, arch, _ = CASES["qwen3-yarn-factor4-betas"]
    hf = build_hf(cls, config, tmp_path / "hf")
    path = tmp_path / "yarn.gguf"
    write_gguf(hf, arch, path)
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["qwen3.rope.scaling.type"].contents() == "yarn"
    from pagedjax.models.config import gguf_rope_scaling

    meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("qwen3.rope")}
    assert gguf_rope_scaling(meta, "qwen3").factor == 4.0
    for key, value in (("yarn_attn_factor", 0.5), ("yarn_ext_factor", 1.0), ("yarn_log_multiplier", 0.1)):
        with pytest.raises(ValueError, match=key):
            gguf_rope_scaling({**meta, f"qwen3.rope.scaling.{key}": value}, "qwen3")
    with pytest.raises(ValueError, match="original_context_length"):
        gguf_rope_scaling({k: v for k, v in meta.items() if "original" not in k}, "qwen3")
    with pytest.raises(ValueError, match="'longrope'"):
        gguf_rope_scaling({**meta, "qwen3.rope.scaling.type": "longrope"}, "qwen3")
