"""Named configs: tiny ones for tests, real architectures' shapes for benchmarks on random weights."""

from __future__ import annotations

from pagedjax.models.config import ModelConfig, RopeScaling


def _named(name, **kw):
    return ModelConfig(name=name, **kw)


def _alternating(num_layers: int, pattern: int) -> tuple[str, ...]:
    """HF's layer_types: every `pattern`-th layer global, the others sliding."""
    return tuple("sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers))


_TINY = dict(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, head_dim=16,
             intermediate_size=128, max_position_embeddings=128)
_BIASES = dict(qkv_bias=True, o_bias=True, mlp_bias=True)
_LLAMA2 = dict(architecture="llama", vocab_size=32000, head_dim=128, max_position_embeddings=4096,
               rotary_dim=128, bos_token_id=1, eos_token_ids=(2,))
NAMED_CONFIGS: dict[str, ModelConfig] = {
    # tiny configs for tests
    "tiny-llama": _named("tiny-llama", architecture="llama", num_kv_heads=2, rotary_dim=16, **_TINY),
    "tiny-gpt2": _named("tiny-gpt2", architecture="gpt2", num_kv_heads=4, activation="gelu_new", norm="layer",
                        tie_word_embeddings=True, **_BIASES, **_TINY),
    "tiny-gpt-neox": _named("tiny-gpt-neox", architecture="gpt_neox", num_kv_heads=4, rotary_dim=4,
                            activation="gelu", norm="layer", parallel_residual=True, **_BIASES, **_TINY),
    "tiny-mixtral": _named("tiny-mixtral", architecture="mixtral", num_kv_heads=2, rotary_dim=16, num_experts=8,
                           num_experts_per_tok=2, moe_intermediate_size=32, **_TINY),
    "tiny-qwen3-moe": _named("tiny-qwen3-moe", architecture="qwen3_moe", num_kv_heads=2, rotary_dim=16,
                             qk_norm=True, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=16,
                             norm_topk_prob=False, dense_layers=(1,), **_TINY),
    "tiny-opt": _named("tiny-opt", architecture="opt", num_kv_heads=4, activation="relu", norm="layer",
                       tie_word_embeddings=True, **_BIASES, **_TINY),
    # the newer families, their features on (windows shorter than a tiny benchmark's prompts)
    "tiny-qwen2": _named("tiny-qwen2", architecture="qwen2", num_kv_heads=2, rotary_dim=16, qkv_bias=True,
                         rope_theta=1e6, **_TINY),
    "tiny-qwen3": _named("tiny-qwen3", architecture="qwen3", num_kv_heads=2, rotary_dim=16, qk_norm=True, **_TINY),
    "tiny-mistral": _named("tiny-mistral", architecture="mistral", num_kv_heads=2, rotary_dim=16, sliding_window=32,
                           **_TINY),
    "tiny-gemma2": _named("tiny-gemma2", architecture="gemma2", num_kv_heads=2, rotary_dim=16, norm="rms_unit_offset",
                          activation="gelu_pytorch_tanh", tie_word_embeddings=True, sliding_window=32,
                          layer_types=_alternating(2, 2), attn_logit_softcap=50.0, final_logit_softcap=30.0,
                          query_pre_attn_scalar=16.0, **_TINY),
    "tiny-gemma3": _named("tiny-gemma3", architecture="gemma3", num_kv_heads=2, rotary_dim=16, norm="rms_unit_offset",
                          activation="gelu_pytorch_tanh", tie_word_embeddings=True, qk_norm=True, sliding_window=32,
                          layer_types=_alternating(2, 2), rope_local_theta=10000.0, rope_theta=1e6,
                          query_pre_attn_scalar=16.0, **_TINY),
    "tiny-phi3": _named("tiny-phi3", architecture="phi3", num_kv_heads=4, rotary_dim=16, sliding_window=32, **_TINY),
    # real architectures, for benchmarks on random weights
    "llama3-8b": _named("llama3-8b", architecture="llama", vocab_size=128256, hidden_size=4096,
                        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=14336,
                        max_position_embeddings=8192, rotary_dim=128, rope_theta=500000.0,
                        bos_token_id=128000, eos_token_ids=(128001, 128009)),
    "llama2-7b": _named("llama2-7b", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                        intermediate_size=11008, **_LLAMA2),
    "llama2-70b": _named("llama2-70b", hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8,
                         intermediate_size=28672, **_LLAMA2),
    # mistralai/Mixtral-8x7B-v0.1 config.json (46,702,792,704 weights): 8 experts, top 2, no window
    "mixtral-8x7b": _named("mixtral-8x7b", architecture="mixtral", vocab_size=32000, hidden_size=4096,
                           num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=14336,
                           max_position_embeddings=32768, norm_eps=1e-5, rotary_dim=128, rope_theta=1e6,
                           num_experts=8, num_experts_per_tok=2, moe_intermediate_size=14336,
                           bos_token_id=1, eos_token_ids=(2,)),
    # Qwen/Qwen3-30B-A3B config.json (30,532,122,624 weights): 128 experts of width 768, top 8
    # renormalized, every layer sparse (decoder_sparse_step 1, mlp_only_layers []), no window
    "qwen3-30b-a3b": _named("qwen3-30b-a3b", architecture="qwen3_moe", vocab_size=151936, hidden_size=2048,
                            num_layers=48, num_heads=32, num_kv_heads=4, head_dim=128, intermediate_size=6144,
                            max_position_embeddings=40960, norm_eps=1e-6, qk_norm=True, rotary_dim=128,
                            rope_theta=1e6, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                            norm_topk_prob=True, bos_token_id=151643, eos_token_ids=(151645,)),
    "smollm2-135m": _named("smollm2-135m", architecture="llama", vocab_size=49152, hidden_size=576,
                           num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, intermediate_size=1536,
                           max_position_embeddings=8192, rotary_dim=64, rope_theta=100000.0,
                           tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,)),
    # Public config.json values of the real checkpoints (HF model pages):
    # Qwen/Qwen3-8B
    "qwen3-8b": _named("qwen3-8b", architecture="qwen3", vocab_size=151936, hidden_size=4096, num_layers=36,
                       num_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=12288,
                       max_position_embeddings=40960, norm_eps=1e-6, qk_norm=True, rotary_dim=128,
                       rope_theta=1000000.0, bos_token_id=151643, eos_token_ids=(151645,)),
    # google/gemma-2-9b: sliding layers first, window 4096, soft-caps 50 / 30, query_pre_attn_scalar 256
    "gemma2-9b": _named("gemma2-9b", architecture="gemma2", vocab_size=256000, hidden_size=3584, num_layers=42,
                        num_heads=16, num_kv_heads=8, head_dim=256, intermediate_size=14336,
                        max_position_embeddings=8192, norm_eps=1e-6, activation="gelu_pytorch_tanh",
                        tie_word_embeddings=True, norm="rms_unit_offset", rotary_dim=256, rope_theta=10000.0,
                        sliding_window=4096, layer_types=_alternating(42, 2), attn_logit_softcap=50.0,
                        final_logit_softcap=30.0, query_pre_attn_scalar=256.0, bos_token_id=2, eos_token_ids=(1,)),
    # google/gemma-3-12b-it (its text_config; Gemma3TextConfig's defaults for what it leaves out)
    "gemma3-12b": _named("gemma3-12b", architecture="gemma3", vocab_size=262208, hidden_size=3840, num_layers=48,
                         num_heads=16, num_kv_heads=8, head_dim=256, intermediate_size=15360,
                         max_position_embeddings=131072, norm_eps=1e-6, activation="gelu_pytorch_tanh",
                         tie_word_embeddings=True, norm="rms_unit_offset", qk_norm=True, rotary_dim=256,
                         rope_theta=1000000.0, rope_scaling=RopeScaling("linear", 8.0), rope_local_theta=10000.0,
                         sliding_window=1024, layer_types=_alternating(48, 6), query_pre_attn_scalar=256.0,
                         bos_token_id=2, eos_token_ids=(1, 106)),
    # mistralai/Mistral-7B-v0.1 (the release with a sliding window)
    "mistral-7b": _named("mistral-7b", architecture="mistral", vocab_size=32000, hidden_size=4096, num_layers=32,
                         num_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=14336,
                         max_position_embeddings=32768, rotary_dim=128, rope_theta=10000.0, sliding_window=4096,
                         bos_token_id=1, eos_token_ids=(2,)),
    # microsoft/Phi-3-mini-4k-instruct
    "phi3-mini": _named("phi3-mini", architecture="phi3", vocab_size=32064, hidden_size=3072, num_layers=32,
                        num_heads=32, num_kv_heads=32, head_dim=96, intermediate_size=8192,
                        max_position_embeddings=4096, rotary_dim=96, rope_theta=10000.0, sliding_window=2047,
                        bos_token_id=1, eos_token_ids=(32000,)),
}
