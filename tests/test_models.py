"""Our architectures against HF transformers (torch, float32) on tiny random checkpoints.

Each case builds a tiny HF model with large random weights (so a wrong layout shows), saves it,
loads it with load_params and feeds token chunks through the paged pool: a whole prompt in one
step, the same prompt in chunks, one token per step, and a ragged batch of several requests
mixing prefill chunks and single tokens, all with randomly permuted page tables. Every step
uses the same padded bucket, so each model compiles once.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import (
    Gemma2Config, Gemma2ForCausalLM, Gemma3Config, Gemma3ForCausalLM, Gemma3ForConditionalGeneration,
    Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM,
    MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM, OPTConfig, OPTForCausalLM, Phi3Config,
    Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM,
)

from pagedjax.attention import build_metadata
from pagedjax.kv_cache.page_pool import init_pages
from pagedjax.models import ModelConfig, abstract_params, get_config, get_model
from pagedjax.params import Params
from pagedjax.weights import load_params

V = 128  # vocab
PAGE, NUM_PAGES, MAX_PAGES, T_BUCKET, R_BUCKET = 4, 48, 8, 32, 4
TOL = 1e-4  # max |ours - hf| / max |hf|, over every compared logit
INIT = 0.3

_LLAMA = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, intermediate_size=96,
              max_position_embeddings=64, initializer_range=INIT, bos_token_id=0, eos_token_id=1)
_GPT2 = dict(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64, initializer_range=INIT,
             bos_token_id=0, eos_token_id=1)
_NEOX = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
             max_position_embeddings=64, initializer_range=INIT, bos_token_id=0, eos_token_id=1)
_QWEN2 = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
              max_position_embeddings=64, initializer_range=INIT, bos_token_id=0, eos_token_id=1)
# eager attention: HF's sdpa path has no soft-cap
_GEMMA = dict(_QWEN2, num_hidden_layers=3, pad_token_id=2, attn_implementation="eager")
_OPT = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=96,
            max_position_embeddings=64, init_std=INIT, bos_token_id=0, eos_token_id=1, pad_token_id=2)

CASES = {
    "llama-gqa-untied": (LlamaForCausalLM, LlamaConfig(
        **_LLAMA, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)),
    "llama-mqa-llama3rope-tied-bias-headdim24": (LlamaForCausalLM, LlamaConfig(
        **_LLAMA, num_attention_heads=4, num_key_value_heads=1, head_dim=24, tie_word_embeddings=True,
        attention_bias=True, mlp_bias=True,
        rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16, "rope_theta": 10000.0})),
    "llama-mha-linearrope-theta500": (LlamaForCausalLM, LlamaConfig(
        **_LLAMA, num_attention_heads=4, num_key_value_heads=4,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0})),
    "gpt2-default": (GPT2LMHeadModel, GPT2Config(**_GPT2)),
    "gpt2-ninner-inverse-layer-idx-gelu": (GPT2LMHeadModel, GPT2Config(
        **_GPT2, n_inner=96, scale_attn_by_inverse_layer_idx=True, activation_function="gelu")),
    "neox-parallel-rotary25": (GPTNeoXForCausalLM, GPTNeoXConfig(
        **_NEOX, rotary_pct=0.25, use_parallel_residual=True)),
    "neox-sequential-rotary50-base500": (GPTNeoXForCausalLM, GPTNeoXConfig(
        **_NEOX, rotary_pct=0.5, rotary_emb_base=500, use_parallel_residual=False)),
    "neox-fullrotary-nobias-tied": (GPTNeoXForCausalLM, GPTNeoXConfig(
        **_NEOX, rotary_pct=1.0, attention_bias=False, tie_word_embeddings=True)),
    "opt-project-in-out": (OPTForCausalLM, OPTConfig(**_OPT, word_embed_proj_dim=32)),
    "opt-postnorm-350m-style": (OPTForCausalLM, OPTConfig(
        **_OPT, word_embed_proj_dim=32, do_layer_norm_before=False)),
    "opt-gelu-untied": (OPTForCausalLM, OPTConfig(**_OPT, activation_function="gelu", tie_word_embeddings=False)),
    "qwen2-gqa-untied-theta1e6": (Qwen2ForCausalLM, Qwen2Config(
        **_QWEN2, num_key_value_heads=2, tie_word_embeddings=False, rope_parameters={"rope_type": "default",
                                                                                      "rope_theta": 1e6})),
    "qwen2-mqa-tied": (Qwen2ForCausalLM, Qwen2Config(**_QWEN2, num_key_value_heads=1, tie_word_embeddings=True)),
    # head_dim independent of hidden / heads (4 * 24 != 64)
    "qwen3-gqa-headdim24-untied": (Qwen3ForCausalLM, Qwen3Config(
        **_QWEN2, num_key_value_heads=2, head_dim=24, tie_word_embeddings=False)),
    "qwen3-bias-tied-theta1e6": (Qwen3ForCausalLM, Qwen3Config(
        **_QWEN2, num_key_value_heads=4, head_dim=16, attention_bias=True, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    # Qwen's optional window: on the layers from max_window_layers on (some, or all: pages released)
    "qwen2-window5-from-layer1-gqa": (Qwen2ForCausalLM, Qwen2Config(
        **{**_QWEN2, "num_hidden_layers": 3}, num_key_value_heads=2, use_sliding_window=True, sliding_window=5,
        max_window_layers=1)),
    "qwen3-window4-every-layer-headdim16": (Qwen3ForCausalLM, Qwen3Config(
        **_QWEN2, num_key_value_heads=2, head_dim=16, use_sliding_window=True, sliding_window=4,
        max_window_layers=0)),
    # windows shorter than the prompts, across page boundaries (pages of 4)
    "mistral-window6-gqa-headdim24": (MistralForCausalLM, MistralConfig(
        **_QWEN2, num_key_value_heads=2, head_dim=24, sliding_window=6)),
    "mistral-window3-mha-tied": (MistralForCausalLM, MistralConfig(
        **_QWEN2, num_key_value_heads=4, sliding_window=3, tie_word_embeddings=True)),
    # soft-caps that bind (test_softcaps_bind), sliding / global alternating, query_pre_attn_scalar
    "gemma2-window5-softcaps-gqa": (Gemma2ForCausalLM, Gemma2Config(
        **_GEMMA, num_key_value_heads=2, head_dim=16, sliding_window=5, attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0, query_pre_attn_scalar=24)),
    "gemma2-untied-bias-exactgelu-nocaps": (Gemma2ForCausalLM, Gemma2Config(
        **_GEMMA, num_key_value_heads=4, head_dim=24, sliding_window=7, tie_word_embeddings=False,
        attention_bias=True, hidden_activation="gelu", attn_logit_softcapping=None, final_logit_softcapping=None,
        layer_types=["full_attention", "sliding_attention", "sliding_attention"], query_pre_attn_scalar=16)),
    # YaRN (Qwen3's long-context setting): a ramp across the dims, cos and sin scaled by 0.1 ln 4 + 1
    "qwen3-yarn-factor4-gqa-headdim16": (Qwen3ForCausalLM, Qwen3Config(
        **_QWEN2, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                         "rope_theta": 1e4})),
    # YaRN as DeepSeek writes it (mscale / mscale_all_dim), other betas, an untruncated ramp
    "llama-yarn-mscale-betas-notruncate": (LlamaForCausalLM, LlamaConfig(
        **_LLAMA, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
        rope_parameters={"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32,
                         "rope_theta": 5000.0, "mscale": 1.0, "mscale_all_dim": 0.5, "beta_fast": 16.0,
                         "beta_slow": 2.0, "truncate": False})),
    # q/k norm, local and global layers with rotary bases of their own (linear scaling: global only)
    "gemma3-local-global-linearrope": (Gemma3ForCausalLM, Gemma3TextConfig(
        **{**_GEMMA, "num_hidden_layers": 4}, num_key_value_heads=2, head_dim=16, sliding_window=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=20, final_logit_softcapping=6.0,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}})),
    # fused qkv_proj / gate_up_proj split at load; partial rotary; a window on every layer
    "phi3-gqa-partialrotary-window5": (Phi3ForCausalLM, Phi3Config(
        **_QWEN2, num_key_value_heads=2, pad_token_id=2, sliding_window=5,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.5})),
    # longrope whose threshold no prompt here reaches (short factors; the long ones: test_phi3_longrope)
    "phi3-longrope-short-mha-tied": (Phi3ForCausalLM, Phi3Config(
        **{**_QWEN2, "max_position_embeddings": 256}, num_key_value_heads=4, pad_token_id=2,
        tie_word_embeddings=True, original_max_position_embeddings=64,
        rope_parameters={"rope_type": "longrope", "rope_theta": 1e4,
                         "short_factor": [1.0, 1.5, 2.0, 3.0, 1.2, 1.1, 5.0, 1.3],
                         "long_factor": [4.0, 3.0, 8.0, 2.0, 1.5, 7.0, 2.5, 9.0]})),
    # the text model of a multimodal checkpoint (its vision tower and projector left out)
    "gemma3-multimodal-text": (Gemma3ForConditionalGeneration, Gemma3Config(
        text_config={**_GEMMA, "num_key_value_heads": 1, "head_dim": 16, "sliding_window": 6,
                     "sliding_window_pattern": 2},
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14), mm_tokens_per_image=4)),
    # MoE: more experts than top_k, so each token skips most of them
    "mixtral-gqa-8experts-top2": (MixtralForCausalLM, MixtralConfig(
        **_LLAMA, num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2)),
    "mixtral-mqa-5experts-top3-tied-headdim24-theta500-window5": (MixtralForCausalLM, MixtralConfig(
        **_LLAMA, num_attention_heads=4, num_key_value_heads=1, head_dim=24, num_local_experts=5,
        num_experts_per_tok=3, tie_word_embeddings=True, sliding_window=5,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0})),
    # many small experts; dense layers mixed in by mlp_only_layers and by decoder_sparse_step
    "qwen3moe-16experts-top4-mlponly1-headdim24": (Qwen3MoeForCausalLM, Qwen3MoeConfig(
        **{**_QWEN2, "num_hidden_layers": 3}, num_key_value_heads=2, head_dim=24, num_experts=16,
        num_experts_per_tok=4, moe_intermediate_size=32, mlp_only_layers=[1], norm_topk_prob=False)),
    "qwen3moe-step2-normtopk-bias-tied-window6": (Qwen3MoeForCausalLM, Qwen3MoeConfig(
        **{**_QWEN2, "num_hidden_layers": 4}, num_key_value_heads=4, head_dim=16, num_experts=6,
        num_experts_per_tok=2, moe_intermediate_size=48, decoder_sparse_step=2, norm_topk_prob=True,
        attention_bias=True, tie_word_embeddings=True, use_sliding_window=True, sliding_window=6)),
}


def build_hf(cls, config, folder, seed=0):
    """A tiny HF model with non-trivial norms and biases too (HF inits those to 1 and 0), saved."""
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def hf_logits(model, ids: list[int]) -> np.ndarray:
    """HF logits [len(ids), V] for one sequence."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


class PagedRunner:
    """Feeds chunks of several requests through the pool, one jitted step (fixed bucket) per call."""

    def __init__(self, params, seed: int, dtype=jnp.float32, attn_impl: str = "reference"):
        cfg = params.config
        self.params = params
        self.pages = init_pages(cfg.num_layers, NUM_PAGES, PAGE, cfg.num_kv_heads, cfg.head_dim, dtype)
        self.apply = jax.jit(get_model(cfg, attn_impl=attn_impl).apply, donate_argnums=2)
        self.free = [int(p) for p in np.random.default_rng(seed).permutation(np.arange(1, NUM_PAGES))]
        self.tables: dict[str, list[int]] = {}
        self.lens: dict[str, int] = {}

    def step(self, chunks: dict[str, list[int]]) -> dict[str, np.ndarray]:
        """Runs one step over {request: new tokens}; returns {request: logits [len(chunk), V]}."""
        q_lens, seq_lens, tables, tokens = [], [], [], []
        for rid, toks in chunks.items():
            table = self.tables.setdefault(rid, [])
            self.lens[rid] = self.lens.get(rid, 0) + len(toks)
            while len(table) * PAGE < self.lens[rid]:
                table.append(self.free.pop())
            q_lens.append(len(toks))
            seq_lens.append(self.lens[rid])
            tables.append(table)
            tokens += toks
        meta = build_metadata(q_lens, seq_lens, tables, page_size=PAGE, num_pages=NUM_PAGES,
                              num_tokens=T_BUCKET, num_reqs=R_BUCKET, max_pages=MAX_PAGES,
                              logits_indices=range(T_BUCKET))
        tokens = np.pad(np.asarray(tokens, np.int32), (0, T_BUCKET - len(tokens)))
        logits, self.pages = self.apply(self.params.variables, tokens, self.pages, meta)
        logits = np.asarray(logits)
        assert logits.shape == (T_BUCKET, self.params.config.vocab_size)
        out, start = {}, 0
        for rid, n in zip(chunks, q_lens):
            out[rid] = logits[start:start + n]
            start += n
        return out


def run_schedule(runner, prompts: dict[str, list[int]], schedule: list[dict[str, int]]) -> dict[str, np.ndarray]:
    """Feeds each request's prompt in the chunk sizes `schedule` gives; returns all its logits."""
    done = {r: 0 for r in prompts}
    got = {r: [] for r in prompts}
    for step in schedule:
        chunks = {}
        for r, n in step.items():
            chunks[r] = prompts[r][done[r]:done[r] + n]
            done[r] += n
        for r, lg in runner.step(chunks).items():
            got[r].append(lg)
    assert all(done[r] == len(p) for r, p in prompts.items())
    return {r: np.concatenate(v) for r, v in got.items()}


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_hf(case, tmp_path):
    check_against_hf(case, tmp_path)


@pytest.mark.parametrize("impl", ["ragged", "dense", "capacity", "gather", "capacity-rounds"])
def test_moe_impls_match_hf(impl, tmp_path, monkeypatch):
    """Every expert implementation (the default, "auto", is "capacity" at this file's 32-token steps
    above); "capacity-rounds" has 8 rows per expert and round, so the fuller experts take several
    rounds."""
    from pagedjax.models import moe

    if impl == "capacity-rounds":
        monkeypatch.setattr(moe, "MIN_CAPACITY", 1)
        monkeypatch.setattr(moe, "CAPACITY_TILE", 1)
        monkeypatch.setattr(moe, "CAPACITY_FACTOR", 1.0)
        assert moe.capacity(T_BUCKET, 2, 8) == 8
    check_against_hf("mixtral-gqa-8experts-top2", tmp_path, moe_impl=impl.split("-")[0])


def check_against_hf(case, tmp_path, **config_changes):
    """Our logits against HF's: one pass, chunked, token by token, ragged (see the module doc)."""
    cls, hf_config = CASES[case]
    hf = build_hf(cls, hf_config, tmp_path)
    params = load_params(tmp_path, dtype=jnp.float32, progress=False)
    if config_changes:
        params = Params(params.variables, params.config.replace(**config_changes), params.tokenizer)
    seed = zlib.crc32(case.encode())  # per case, the same in every process (hash() of a str is not)
    rng = np.random.default_rng(seed)
    prompts = {r: [int(t) for t in rng.integers(0, V, n)] for r, n in
               {"one": 13, "chunked": 13, "decode": 9, "a": 11, "b": 3, "c": 17, "d": 7}.items()}
    refs = {r: hf_logits(hf, p) for r, p in prompts.items()}
    assert refs["c"].std() > 0.5, f"logits too flat for a meaningful comparison (seed {seed})"
    runner = PagedRunner(params, seed=seed)

    def check(got, what):
        for r, lg in got.items():
            err = rel_err(lg, refs[r])
            assert err < TOL, f"{case} {what} request {r}: relative error {err:.2e} (seed {seed})"

    check(run_schedule(runner, {"one": prompts["one"]}, [{"one": 13}]), "one pass")
    check(run_schedule(runner, {"chunked": prompts["chunked"]}, [{"chunked": 5}, {"chunked": 4}, {"chunked": 4}]),
          "chunked prefill")
    check(run_schedule(runner, {"decode": prompts["decode"]}, [{"decode": 1}] * 9), "decode")
    ragged = {r: prompts[r] for r in "abcd"}
    check(run_schedule(runner, ragged, [
        {"c": 8, "a": 6, "b": 1, "d": 7},  # prefill chunks, a whole prompt and a single token together
        {"b": 1, "a": 5, "c": 8},
        {"c": 1, "b": 1},  # decode-sized steps
    ]), "ragged batch")


@pytest.mark.parametrize("case", ["llama-gqa-untied", "neox-parallel-rotary25", "mixtral-gqa-8experts-top2",
                                  "qwen3moe-16experts-top4-mlponly1-headdim24"])
def test_bfloat16_close_to_float32(case, tmp_path):
    """bf16 weights: as far from our float32 logits as HF's own bf16 model is from its float32."""
    cls, hf_config = CASES[case]
    hf = build_hf(cls, hf_config, tmp_path)
    seed = zlib.crc32(case.encode())
    prompt = [int(t) for t in np.random.default_rng(seed).integers(0, V, 13)]
    ref = hf_logits(hf, prompt)
    hf_bf16 = cls.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    hf_err = rel_err(hf_logits(hf_bf16, prompt), ref)
    out = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        params = load_params(tmp_path, dtype=dtype, progress=False)
        assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(dtype)}
        runner = PagedRunner(params, seed=seed, dtype=dtype)
        out[dtype] = run_schedule(runner, {"p": prompt}, [{"p": 6}, {"p": 7}])["p"]
        assert out[dtype].dtype == np.float32
    assert rel_err(out[jnp.float32], ref) < TOL, f"seed {seed}"
    err = rel_err(out[jnp.bfloat16], ref)
    assert 1e-3 < err < max(2 * hf_err, 2e-2), (err, hf_err, f"seed {seed}")


def test_pages_must_match_layers():
    cfg = get_config("tiny-llama")
    model = get_model(cfg)
    pages = init_pages(1, 4, PAGE, cfg.num_kv_heads, cfg.head_dim, jnp.float32)
    meta = build_metadata([1], [1], [[1]], page_size=PAGE, num_pages=4)
    with pytest.raises(ValueError, match="page-pool layers"):
        model.init(jax.random.key(0), np.zeros(1, np.int32), pages, meta)


@pytest.mark.parametrize("name,count", [("llama3-8b", 8_030_261_248), ("llama2-7b", 6_738_415_616),
                                        ("smollm2-135m", 134_515_008), ("qwen3-8b", 8_190_735_360),
                                        ("gemma2-9b", 9_241_705_984), ("mistral-7b", 7_241_732_096),
                                        ("phi3-mini", 3_821_079_552), ("mixtral-8x7b", 46_702_792_704),
                                        ("qwen3-30b-a3b", 30_532_122_624)])
def test_named_configs_have_the_published_sizes(name, count):
    shapes, _ = abstract_params(get_config(name))
    assert sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes)) == count


_ARCH = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
         "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM", "mistral": "MistralForCausalLM",
         "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


@pytest.mark.parametrize("config,changes,match", [
    (Phi3Config(**_QWEN2), {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling type 'dynamic'"),
    (Phi3Config(**_QWEN2), {"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0] * 8}},
     r"lacks \['long_factor'"),
    (Gemma2Config(**_GEMMA), {"hidden_activation": "gelu_10"}, "activation 'gelu_10'"),
    (Gemma3TextConfig(**_GEMMA), {"hidden_activation": "relu2"}, "activation 'relu2'"),
    (Gemma2Config(**_GEMMA), {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    (Gemma3TextConfig(**_GEMMA), {"rope_parameters": {"sliding_attention": {"rope_type": "linear", "factor": 2.0}}},
     "local layers"),
    (MistralConfig(**_QWEN2), {"layer_types": ["full_attention", "sliding_attention"], "sliding_window": 4},
     "layer_types"),
    (MixtralConfig(**_LLAMA), {"layer_types": ["full_attention", "sliding_attention"], "sliding_window": 4},
     "layer_types"),
    (MixtralConfig(**_LLAMA), {"num_experts_per_tok": 9}, "num_experts_per_tok 9"),
    (Qwen3MoeConfig(**_QWEN2), {"decoder_sparse_step": 0}, "decoder_sparse_step"),
    (Qwen3MoeConfig(**_QWEN2), {"moe_intermediate_size": 0}, "moe_intermediate_size"),
])
def test_unsupported_options_are_refused(config, changes, match):
    """An option we do not implement is a ValueError naming it, never a silently wrong model."""
    hf = {**config.to_dict(), **changes, "architectures": [_ARCH[config.model_type]]}
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf(hf)


def test_softcaps_bind(tmp_path):
    """The soft-capped case's caps change HF's own logits a lot: its parity test tests them."""
    cls, hf_config = CASES["gemma2-window5-softcaps-gqa"]
    hf = build_hf(cls, hf_config, tmp_path)
    prompt = [int(t) for t in np.random.default_rng(1).integers(0, V, 17)]
    capped = hf_logits(hf, prompt)
    assert np.abs(capped).max() > 0.9 * hf_config.final_logit_softcapping  # well into the tanh's bend
    hf.config.final_logit_softcapping = None
    uncapped_final = hf_logits(hf, prompt)
    for layer in hf.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    uncapped = hf_logits(hf, prompt)
    assert rel_err(capped, uncapped_final) > 0.1
    assert rel_err(uncapped_final, uncapped) > 0.1


GEMMA3_4B_IT = {  # google/gemma-3-4b-it config.json (transformers 4.50 era: legacy keys, defaults left out)
    "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999, "eoi_token_index": 256000,
    "eos_token_id": [1, 106], "image_token_index": 262144, "initializer_range": 0.02, "mm_tokens_per_image": 256,
    "model_type": "gemma3",
    "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                    "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                    "sliding_window": 1024},
    "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                      "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                      "patch_size": 14, "vision_use_head": False},
}


def test_gemma3_multimodal_config_reads_as_hf_does():
    """A real multimodal config.json with legacy keys and defaults left out: our reading equals
    transformers' own (its Gemma3Config fills the same defaults and layer pattern)."""
    ours = ModelConfig.from_hf(GEMMA3_4B_IT)
    hf = Gemma3Config(**{k: v for k, v in GEMMA3_4B_IT.items() if k != "architectures"}).text_config
    full, local = hf.rope_parameters["full_attention"], hf.rope_parameters["sliding_attention"]
    assert (ours.architecture, ours.vocab_size, ours.hidden_size, ours.num_layers) == (
        "gemma3", hf.vocab_size, hf.hidden_size, hf.num_hidden_layers)
    assert (ours.num_heads, ours.num_kv_heads, ours.head_dim, ours.intermediate_size) == (
        hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim, hf.intermediate_size)
    assert ours.layer_types == tuple(hf.layer_types) and ours.sliding_window == hf.sliding_window == 1024
    assert ours.layer_types.count("full_attention") == 5  # layers 5, 11, ..., 29
    assert (ours.rope_theta, ours.rope_scaling.type, ours.rope_scaling.factor) == (
        full["rope_theta"], full["rope_type"], full["factor"])
    assert ours.rope_local_theta == local["rope_theta"] and local["rope_type"] == "default"
    assert ours.query_pre_attn_scalar == hf.query_pre_attn_scalar and ours.norm_eps == hf.rms_norm_eps
    assert ours.activation == hf.hidden_activation and ours.qk_norm and ours.tie_word_embeddings
    assert not ours.attn_logit_softcap and not ours.final_logit_softcap
    assert ours.eos_token_ids == (1, 106) and ours.bos_token_id == 2


def hf_logits_chunked(model, ids: list[int], chunks: list[int]) -> np.ndarray:
    """HF logits of one sequence fed in chunks through its KV cache (as HF `generate` feeds it)."""
    from transformers import DynamicCache

    cache, out, start = DynamicCache(config=model.config), [], 0
    with torch.no_grad():
        for n in chunks:
            out.append(model(torch.tensor([ids[start:start + n]]), past_key_values=cache, use_cache=True)
                       .logits[0].float().numpy())
            start += n
    assert start == len(ids)
    return np.concatenate(out)


def test_phi3_longrope_follows_hf_rule(tmp_path):
    """longrope with a threshold (original_max_position_embeddings = 8) the prompts cross: a
    forward of a sequence longer than it uses the long factors, else the short ones, with K/V
    cached as computed (transformers' rule). Compared with HF fed the same chunks."""
    config = Phi3Config(**_QWEN2, num_key_value_heads=2, pad_token_id=2, original_max_position_embeddings=8,
                        rope_parameters={"rope_type": "longrope", "rope_theta": 1e4,
                                         "short_factor": [1.0, 1.5, 2.0, 3.0, 1.2, 1.1, 5.0, 1.3],
                                         "long_factor": [4.0, 3.0, 8.0, 2.0, 1.5, 7.0, 2.5, 9.0]})
    hf = build_hf(Phi3ForCausalLM, config, tmp_path)
    params = load_params(tmp_path, dtype=jnp.float32, progress=False)
    assert params.config.rope_scaling.attention_factor == pytest.approx(2**0.5)  # max_pos 64 / 8
    check_threshold_schedules(hf, params, np.random.default_rng(11), 11)


def check_threshold_schedules(hf, params, rng: np.random.Generator, seed: int, fresh=lambda: None) -> None:
    """Our logits against HF fed the same chunks, for a rope whose frequencies depend on the
    sequence's length past a threshold of 8 tokens: under it, one pass across it, chunks across it,
    decode, and a ragged batch. `fresh()` runs before each HF reference (HF's rope state)."""
    schedules = {"short": [7], "long": [13], "across": [5, 4, 4], "decode": [6] + [1] * 8, "ragged": [3, 6, 1, 5]}
    prompts = {r: [int(t) for t in rng.integers(0, V, sum(c))] for r, c in schedules.items()}
    refs = {}
    for r, c in schedules.items():
        fresh()
        refs[r] = hf_logits_chunked(hf, prompts[r], c)
    # the threshold matters: a first chunk of 5 is not the same 5 tokens of a 13-token pass
    fresh()
    assert rel_err(refs["across"][:5], hf_logits(hf, prompts["across"])[:5]) > 0.05
    runner = PagedRunner(params, seed=seed)
    got = run_schedule(runner, {r: prompts[r] for r in ("short", "long")}, [{"short": 7, "long": 13}])
    got |= run_schedule(runner, {"across": prompts["across"]}, [{"across": n} for n in schedules["across"]])
    steps = [dict(zip(("decode", "ragged"), ns)) for ns in zip(schedules["decode"], schedules["ragged"])]
    steps += [{"decode": 1}] * (len(schedules["decode"]) - len(steps))
    got |= run_schedule(runner, {r: prompts[r] for r in ("decode", "ragged")}, steps)
    for r, lg in got.items():
        assert rel_err(lg, refs[r]) < TOL, f"seed {seed} request {r}: relative error {rel_err(lg, refs[r]):.2e}"


@pytest.mark.parametrize("case", ["gemma2-window5-softcaps-gqa", "gemma3-local-global-linearrope",
                                  "phi3-gqa-partialrotary-window5"])
def test_custom_call_matches_hf(case, tmp_path):
    """The same parity through the XLA custom call (its CPU handler): windows, soft-caps, q/k norm."""
    from pagedjax import _ffi

    if ("pagedjax_paged_attention", "cpu") not in _ffi.register():
        pytest.skip("the pagedjax._kernels CPU paged-attention handler is not built")
    cls, hf_config = CASES[case]
    hf = build_hf(cls, hf_config, tmp_path)
    params = load_params(tmp_path, dtype=jnp.float32, progress=False)
    seed = 3 + len(case)
    rng = np.random.default_rng(seed)
    prompts = {r: [int(t) for t in rng.integers(0, V, n)] for r, n in {"a": 11, "b": 3, "c": 17, "d": 7}.items()}
    got = run_schedule(PagedRunner(params, seed=seed, attn_impl="ffi"), prompts, [
        {"c": 8, "a": 6, "b": 1, "d": 7}, {"b": 1, "a": 5, "c": 8}, {"c": 1, "b": 1}])
    for r, lg in got.items():
        err = rel_err(lg, hf_logits(hf, prompts[r]))
        assert err < TOL, f"{case} (seed {seed}) request {r}: relative error {err:.2e}"


def _hf_reset_dynamic_rope(model) -> None:
    """A one-token forward: transformers' dynamic rope returns to the original frequencies when it
    sees a sequence inside max_position_embeddings (its state otherwise keeps the longest seen)."""
    with torch.no_grad():
        model(torch.tensor([[3]]))


def test_dynamic_ntk_rope_follows_hf_rule(tmp_path):
    """Dynamic NTK rope (rope_type "dynamic") with max_position_embeddings = 8 the prompts cross: a
    forward of a sequence of L > 8 tokens rotates with base theta * (2 L / 8 - 1) ** (dim / (dim - 2)),
    K/V cached as computed (transformers' rule). Compared with HF fed the same chunks, each request
    from HF's original frequencies; then the engine's greedy tokens against HF `generate`, whose
    every decode step past 8 tokens changes the base."""
    import pagedjax as pj
    from pagedjax.sampling_params import SamplingParams

    config = LlamaConfig(**{**_LLAMA, "max_position_embeddings": 8}, num_attention_heads=4, num_key_value_heads=2,
                         rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 100.0})
    hf = build_hf(LlamaForCausalLM, config, tmp_path)
    params = load_params(tmp_path, dtype=jnp.float32, progress=False)
    s = params.config.rope_scaling
    assert (s.type, s.factor, s.original_max_position_embeddings) == ("dynamic", 2.0, 8)
    rng = np.random.default_rng(12)
    check_threshold_schedules(hf, params, rng, 12, fresh=lambda: _hf_reset_dynamic_rope(hf))

    gen = [[int(t) for t in rng.integers(3, V, n)] for n in (5, 9)]
    want = []
    for p in gen:
        _hf_reset_dynamic_rope(hf)
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=16 - len(p), do_sample=False, eos_token_id=None, pad_token_id=1)
        want.append(out[0, len(p):].tolist())
    got = [pj.generate(params, [p], SamplingParams(max_tokens=16 - len(p), temperature=0.0, ignore_eos=True),
                       max_model_len=16, num_pages=16, page_size=4, use_tqdm=False)[0].outputs[0].token_ids
           for p in gen]
    assert got == want
    with pytest.raises(ValueError, match="exceeds the model's 16 positions"):  # factor x 8
        pj.LLM(params, max_model_len=17)
