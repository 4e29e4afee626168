"""Named configs: tiny ones for tests, real architectures' shapes for benchmarks on random weights."""

from __future__ import annotations

from pagedjax.models.config import ModelConfig


def _named(name, **kw):
    return ModelConfig(name=name, **kw)


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
    "tiny-opt": _named("tiny-opt", architecture="opt", num_kv_heads=4, activation="relu", norm="layer",
                       tie_word_embeddings=True, **_BIASES, **_TINY),
    # real architectures, for benchmarks on random weights
    "llama3-8b": _named("llama3-8b", architecture="llama", vocab_size=128256, hidden_size=4096,
                        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=14336,
                        max_position_embeddings=8192, rotary_dim=128, rope_theta=500000.0,
                        bos_token_id=128000, eos_token_ids=(128001, 128009)),
    "llama2-7b": _named("llama2-7b", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                        intermediate_size=11008, **_LLAMA2),
    "llama2-70b": _named("llama2-70b", hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8,
                         intermediate_size=28672, **_LLAMA2),
    # mistralai/Mixtral-8x7B-v0.1 config.json: 46,702,792,704 weights
    "mixtral-8x7b": _named("mixtral-8x7b", architecture="mixtral", vocab_size=32000, hidden_size=4096,
                           num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=14336,
                           max_position_embeddings=32768, norm_eps=1e-5, rotary_dim=128, rope_theta=1e6,
                           num_experts=8, num_experts_per_tok=2, moe_intermediate_size=14336,
                           bos_token_id=1, eos_token_ids=(2,)),
    "smollm2-135m": _named("smollm2-135m", architecture="llama", vocab_size=49152, hidden_size=576,
                           num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, intermediate_size=1536,
                           max_position_embeddings=8192, rotary_dim=64, rope_theta=100000.0,
                           tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,)),
}
