"""EngineConfig: every engine option in one place (vLLM's names), with its default.

The scheduler's, the cache's and the runner's settings all come from a resolved EngineConfig
(`resolve(params)` fills what depends on the model and the device); the CLI and the server
take their defaults from these fields. Host only: jax is imported by `resolve` alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from pagedjax.kv_cache.block_allocator import CacheConfig
from pagedjax.scheduler import SchedulerConfig

ATTN_IMPLS = ("auto", "reference", "ffi")
MOE_IMPLS = ("auto", "ragged", "capacity", "dense", "gather")  # pagedjax.models.moe: how an MoE layer's experts run
# vLLM's names ("auto": the weights' dtype; "fp8" = "fp8_e4m3": e4m3 pages with per-kv-head scales)
KV_CACHE_DTYPES = ("auto", "bfloat16", "float16", "float32", "fp8", "fp8_e4m3")
# vLLM's `quantization` names we serve: "fp8" (FP8 checkpoints, or online FP8 of a float one) and
# the methods of pre-quantized checkpoints (pagedjax/quantization/config.py reads their configs)
QUANTIZATION_METHODS = ("fp8", "awq", "gptq", "compressed-tensors")


@dataclass(frozen=True)
class EngineConfig:
    """Engine options (vLLM's names). None picks a default from the model and the device."""

    max_model_len: int | None = None  # default: the model's context, capped at 4096
    max_num_seqs: int | None = None  # requests per step (default 256 on GPU, 32 on CPU)
    max_num_batched_tokens: int | None = None  # tokens per step (default 2048 on GPU, 256 on CPU)
    page_size: int = 16
    num_pages: int | None = None  # default: as many as memory allows
    gpu_memory_utilization: float = 0.9  # share of device memory for weights, activations and the pool
    cpu_kv_cache_bytes: int = 1 << 30  # the pool's size on a CPU device (no memory stats there)
    kv_cache_dtype: str = "auto"  # the pool's dtype ("auto": the weights')
    quantization: str | None = None  # the weights' (None: as the checkpoint is); applied when loading
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    long_prefill_token_threshold: int = 0  # > 0: a request computes at most this many tokens a step
    attn_impl: str = "auto"  # "reference" | "ffi" | "auto"
    tensor_parallel_size: int | None = None  # devices to split over (default: the params' mesh, else 1)
    # MoE models: split whole experts over the tp devices instead of each expert's MLP columns
    # (vLLM's --enable-expert-parallel); None: as the params were loaded (off unless load_params had it)
    enable_expert_parallel: bool | None = None
    moe_impl: str | None = None  # MoE models: "ragged" | "capacity" | "dense" | "gather" | "auto"; None: the model's
    max_logprobs: int = 20
    # Streamed (DELTA) outputs: a request's output goes out with its first token, then once at
    # least this many new tokens are in, and when it finishes (vLLM's --stream-interval): fewer,
    # larger chunks, less host work per token at high concurrency. 1: every token.
    stream_interval: int = 1
    precompile: bool = True  # compile every token bucket at start-up
    # The token counts a step is padded to (each compiled once): "fine" (1, 4, 16, 64, 256, then 2^k
    # and 1.5 * 2^k up to max_num_batched_tokens: a prefill-heavy step padded by < 1.5x; W1 on the
    # H200 1.11x the req/s of "coarse"), "coarse" (1, 4, 16, ... x4 and max_num_batched_tokens: 4
    # fewer compiled steps at 2048), or the counts themselves (those >= max_num_batched_tokens
    # dropped, it added)
    token_buckets: str | tuple[int, ...] = "fine"
    seed: int = 0
    async_scheduling: bool = True  # schedule and launch step n+1 before step n's tokens reach the host
    preemption_mode: str = "recompute"  # "recompute" | "swap": a preempted request's pages go to host memory
    swap_space: float = 4.0  # GiB of host memory for swapped pages (preemption_mode="swap")
    # Structured outputs: with a reasoning parser (deepseek_r1, qwen3) a constraint applies from the
    # token after the reasoning ends, unless enable_in_reasoning (vLLM's option) applies it throughout.
    reasoning_parser: str | None = None
    enable_in_reasoning: bool = False
    grammar_compile_timeout: float = 10.0  # seconds for compiling one constraint before a ValueError
    # A request's tokens and logprobs do not depend on the rest of the batch, its prompt's chunking
    # or prefix-cache hits: every matmul unsplit over K on GEMM algorithms that agree bit for bit
    # (cuBLASLt on a CUDA GPU at tensor-parallel size 1, its algorithm by row count on sm_90, else
    # fixed row tiles: ModelConfig.invariant_gemm), norms summing
    # each row in one order (a kernel on the GPU, row tiles elsewhere: ModelConfig.invariant_norm),
    # the attention on KV blocks at fixed positions (the GPU's custom call unsplit), on the GPU
    # deterministic ops (ModelRunner.step_compiler_options). Float models without experts
    # (tests/test_batch_invariance.py, tests/test_batch_invariance_gpu.py).
    batch_invariant: bool = False
    # After start-up, gc.collect() then gc.freeze(), as vLLM's engine core does: full collections
    # then skip the start-up heap (JAX, the model, the tokenizer), whose scan otherwise stalls a
    # step now and then (~100 ms at batch 256 on the CPU, benchmarks/RESULTS.md). Frozen objects
    # are never collected, and an engine holds reference cycles: a dropped engine stays in memory
    # (its pool on the device too) until the next engine's start-up, which unfreezes and collects
    # first, or until gc.unfreeze() and gc.collect(). Pass False to leave the collector alone.
    freeze_gc_heap: bool = True

    def __post_init__(self) -> None:
        if self.preemption_mode not in ("recompute", "swap"):
            raise ValueError(f"preemption_mode must be 'recompute' or 'swap', got {self.preemption_mode!r}")
        if (isinstance(self.swap_space, bool) or not isinstance(self.swap_space, (int, float))
                or not 0 <= self.swap_space < float("inf")):
            raise ValueError(f"swap_space must be a finite number of GiB >= 0, got {self.swap_space!r}")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}")
        if self.moe_impl is not None and self.moe_impl not in MOE_IMPLS:
            raise ValueError(f"moe_impl must be one of {MOE_IMPLS}, got {self.moe_impl!r}")
        if self.enable_expert_parallel not in (None, True, False):
            raise ValueError(f"enable_expert_parallel must be a bool, got {self.enable_expert_parallel!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(f"quantization must be one of {QUANTIZATION_METHODS} or None, got {self.quantization!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if (isinstance(self.grammar_compile_timeout, bool) or not isinstance(self.grammar_compile_timeout, (int, float))
                or not 0 < self.grammar_compile_timeout < float("inf")):
            raise ValueError(f"grammar_compile_timeout must be a positive number of seconds, "
                             f"got {self.grammar_compile_timeout!r}")
        if isinstance(self.token_buckets, list):
            object.__setattr__(self, "token_buckets", tuple(self.token_buckets))
        if self.token_buckets not in ("coarse", "fine") and not (
                isinstance(self.token_buckets, tuple) and self.token_buckets
                and all(isinstance(t, int) and not isinstance(t, bool) and t > 0 for t in self.token_buckets)
                and list(self.token_buckets) == sorted(set(self.token_buckets))):
            raise ValueError(f"token_buckets must be 'coarse', 'fine' or increasing positive token counts, "
                             f"got {self.token_buckets!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        for name in ("page_size", "max_logprobs", "cpu_kv_cache_bytes", "stream_interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "max_logprobs" else 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Each option's default (the CLI shows and uses these)."""
        return {f.name: f.default for f in dataclasses.fields(cls)}

    def resolve(self, params: Any) -> EngineConfig:
        """Fills the defaults that depend on the model and the device."""
        import jax

        from pagedjax import parallel

        gpu = jax.default_backend() == "gpu"
        max_len = self.max_model_len or min(params.config.max_position_embeddings, 4096)
        rope = params.config.rope_scaling
        # dynamic NTK rope is made to run past max_position_embeddings: up to factor times it (vLLM's bound)
        limit = int(params.config.max_position_embeddings * (rope.factor if rope.type == "dynamic" else 1))
        if max_len > limit:
            raise ValueError(f"max_model_len {max_len} exceeds the model's {limit} positions")
        seqs = self.max_num_seqs or (256 if gpu else 32)
        tokens = self.max_num_batched_tokens or (2048 if gpu else 256)
        if not self.enable_chunked_prefill:
            tokens = max(tokens, max_len)
        held = params.config.quantization
        if self.quantization is not None and (held is None or held.name != self.quantization):
            raise ValueError(f"quantization={self.quantization!r}, but these params are "
                             f"{'not quantized' if held is None else f'quantized with {held.name!r}'}: "
                             f"quantization applies when the weights are loaded (LLM(path, quantization=...), "
                             f"load_params(path, quantization=...), random_params(config, quantization=...))")
        if self.batch_invariant and (held is not None or params.config.num_experts):
            raise ValueError("batch_invariant=True is for float models without experts: "
                             + (f"these weights are quantized ({held.name!r})" if held is not None
                                else f"{params.config.architecture} routes tokens to experts"))
        tp = self.tensor_parallel_size or parallel.tp_size(parallel.mesh_of(params))
        resolved = dataclasses.replace(self, max_model_len=max_len, max_num_seqs=seqs,
                                       max_num_batched_tokens=max(tokens, 16), tensor_parallel_size=tp)
        # under batch_invariant this picks the GEMM at the real size: a PAGEDJAX_BATCH_INVARIANT_MATMUL
        # that cannot run here fails here
        parallel.check_tensor_parallel(resolved.model_config(params.config), tp)
        return resolved

    def model_config(self, config: Any) -> Any:
        """The ModelConfig the engine runs: `config` with the MoE options and batch_invariant set
        here (a ValueError naming the option for a model without experts); under batch_invariant
        with the GEMM for this device and tensor-parallel size (models/invariant_matmul.choose) and
        the norms' method (models/layers.invariant_norm_method) and the attention kernel
        (attention.invariant_attention_method) and its fixed split size (attention.invariant_split_size),
        each read once here."""
        gemm = norm = attn = split = None
        if self.batch_invariant:
            from pagedjax import attention
            from pagedjax.models import invariant_matmul, layers

            gemm = invariant_matmul.choose(self.tensor_parallel_size or 1)
            # a bad PAGEDJAX_BATCH_INVARIANT_NORM fails here
            norm = layers.invariant_norm_method(self.tensor_parallel_size or 1)
            attn = attention.invariant_attention_method()  # and a bad PAGEDJAX_BATCH_INVARIANT_ATTENTION
            split = attention.invariant_split_size()  # and a bad PAGEDJAX_BATCH_INVARIANT_SPLIT
        changes = {k: v for k, v in (("moe_impl", self.moe_impl), ("expert_parallel", self.enable_expert_parallel),
                                     ("batch_invariant", self.batch_invariant or None), ("invariant_gemm", gemm),
                                     ("invariant_norm", norm), ("invariant_attention", attn),
                                     ("invariant_split", split))
                   if v is not None and getattr(config, k) != v}
        return config.replace(**changes) if changes else config

    def scheduler_config(self) -> SchedulerConfig:
        """The scheduler's limits (of a resolved config)."""
        return SchedulerConfig(max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
                               max_model_len=self.max_model_len, enable_chunked_prefill=self.enable_chunked_prefill,
                               long_prefill_token_threshold=self.long_prefill_token_threshold,
                               preemption_mode=self.preemption_mode)

    def cache_config(self, num_pages: int, num_host_pages: int = 0, sliding_window: int = 0) -> CacheConfig:
        """The page pool as the scheduler sees it, once the runner has sized it (sliding_window:
        the model's ModelConfig.kv_sliding_window)."""
        return CacheConfig(page_size=self.page_size, num_pages=num_pages,
                           enable_prefix_caching=self.enable_prefix_caching, num_host_pages=num_host_pages,
                           sliding_window=sliding_window)
