"""Shared model math: projections, norms, rotary embeddings, MLPs and the paged attention block.

Dims: T tokens in the flat batch, S positions whose logits are needed, D hidden, E embedding
width (OPT may project it), F MLP width, N query heads, K kv heads, H head dim, V vocab;
in the MoE block X experts, k experts per token.

Every parameter carries logical axis names ("embed", "vocab", "heads", "kv_heads", "head_dim",
"mlp", "norm", "experts", "moe_mlp"); pagedjax.parallel maps them to mesh axes. Activations
keep the parameters' dtype; norms, softmax, routing and logits are computed in float32.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import ClassVar

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pagedjax.attention import AttentionMetadata, paged_attention, resolve_impl
from pagedjax.kv_cache.kv_dtype import is_fp8
from pagedjax.kv_cache.page_pool import write_kv
from pagedjax.models import invariant_matmul, moe, quantized
from pagedjax.models.config import ModelConfig, RopeScaling

INIT_STD = 0.02

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


# Batch-invariant mode: rows per matmul tile, by backend. Every matmul of a row then has the same
# shape ([rows, K] @ [K, N]) whatever the batch, so the backend picks the same algorithm and
# blocking, and a row's sums run in the same order next to any other rows. On the GPU each tile
# reads the whole weight, so its tiles are larger: a prefill of 2048 tokens reads the weights 16
# times, and a decode step of few rows computes 128 (on an H200, Llama-3-8B's batch-1 decode step
# took 10.3 ms against 5.5 untiled: benchmarks/RESULTS.md).
INVARIANT_ROWS = {"cpu": 16, "gpu": 128}


def invariant_rows() -> int:
    """The batch-invariant row tile of the default backend."""
    return INVARIANT_ROWS.get(jax.default_backend(), INVARIANT_ROWS["cpu"])


def row_tiled(f: Callable[[jax.Array], jax.Array], x: jax.Array, rows: int | None = None) -> jax.Array:
    """f over x [T, ...] in tiles of `rows` rows (zero-padded; default invariant_rows()), one tile
    at a time: f(x) with each row's result independent of T. f must be row-local (row i of f(x)
    reads row i of x)."""
    rows = rows or invariant_rows()
    T = x.shape[0]
    n = -(-T // rows)
    tiles = jnp.pad(x, [(0, n * rows - T)] + [(0, 0)] * (x.ndim - 1)).reshape(n, rows, *x.shape[1:])
    # A loop over tiles: XLA cannot merge them back into one matmul. The barrier on each tile keeps
    # its producers out of f's fusion (on the GPU a GEMM's prologue) and its consumers out of the
    # epilogue, also where one tile drops the loop.
    y = jax.lax.map(lambda t: jax.lax.optimization_barrier(f(jax.lax.optimization_barrier(t))), tiles)
    # The barrier keeps what follows out of the tile's computation: with one tile XLA drops the
    # loop, and would otherwise fold a following convert into the dot (bf16 -> f32 logits unrounded).
    y = jax.lax.optimization_barrier(y)
    return y.reshape(n * rows, *y.shape[2:])[:T]


def rows_matmul(cfg: ModelConfig | None, eqn: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """jnp.einsum(eqn, x, w) for an eqn whose first x dim is the rows; under cfg.batch_invariant
    row-tiled, or one fixed-algorithm launch where cfg.invariant_gemm (or, unset,
    PAGEDJAX_BATCH_INVARIANT_MATMUL) chooses one (mosaic, cublaslt, cublaslt_m) and it applies."""
    if cfg is not None and cfg.batch_invariant:
        method = cfg.invariant_gemm or invariant_matmul.impl()
        y = None if method == "tiles" else invariant_matmul.einsum(eqn, x, w, method=method)
        return row_tiled(lambda t: jnp.einsum(eqn, t, w), x) if y is None else y
    return jnp.einsum(eqn, x, w)


KV_SCALES = ("k_scale", "v_scale")  # an attention's FP8 KV-cache scales from a checkpoint: f32 scalars


def _param(module: nn.Module, name: str, init, shape: tuple[int, ...], axes: tuple[str | None, ...]):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


# --- projections and embeddings -------------------------------------------------------------


class Einsum(nn.Module):
    """`x @ kernel` as an einsum (kernel laid out as `shape`), plus a bias over the output dims.

    With a `config` whose quantization covers this linear, the kernel is a quantized weight
    (params "qvalue", "scale", ...; models/quantized.py) and the quantized matmul runs instead.
    """

    eqn: str  # e.g. "td,dnh->tnh"
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    use_bias: bool = False
    config: ModelConfig | None = None  # read for its quantization and batch_invariant

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        qcfg = quantized.linear_quantization(self.config, self.path)
        if qcfg is not None:
            y = quantized.quantized_einsum(self, qcfg, self.eqn, self.shape, self.axes, x)
        else:
            kernel = _param(self, "kernel", nn.initializers.normal(INIT_STD), self.shape, self.axes)
            y = rows_matmul(self.config, self.eqn, x, kernel.astype(x.dtype))
        if self.use_bias:
            k_dims, out_dims = self.eqn.split(",")[1].split("->")
            keep = [i for i, c in enumerate(k_dims) if c in out_dims]  # the kernel's output dims
            bias = _param(self, "bias", nn.initializers.zeros, tuple(self.shape[i] for i in keep),
                          tuple(self.axes[i] for i in keep))
            y = y + bias.astype(y.dtype)
        return y


class Embed(nn.Module):
    """A lookup table [num, features] that can also be attended (tied output head)."""

    num_embeddings: int
    features: int
    axes: tuple[str | None, str | None] = ("vocab", "embed")

    def setup(self):
        self.embedding = _param(self, "embedding", nn.initializers.normal(INIT_STD),
                                (self.num_embeddings, self.features), self.axes)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding, ids, axis=0)  # [T, features]

    def attend(self, x: jax.Array, cfg: ModelConfig | None = None) -> jax.Array:
        """x [S, features] -> [S, num]: the tied output head (row-tiled under cfg.batch_invariant)."""
        return rows_matmul(cfg, "se,ve->sv", x, self.embedding.astype(x.dtype))  # [S, num]


def lm_head(cfg: ModelConfig, embed: Embed, x: jax.Array) -> jax.Array:
    """Logits [S, V] in float32, through the tied embedding or an `lm_head` projection."""
    if cfg.tie_word_embeddings:
        logits = embed.attend(x, cfg)
    else:
        logits = Einsum("se,ev->sv", (cfg.embed_dim, cfg.vocab_size), ("embed", "vocab"), config=cfg,
                        name="lm_head")(x)
    return softcap_logits(cfg, logits.astype(jnp.float32))


def softcap_logits(cfg: ModelConfig, logits: jax.Array) -> jax.Array:
    """c * tanh(logits / c) with c = cfg.final_logit_softcap (Gemma 2); unchanged when 0."""
    c = cfg.final_logit_softcap
    return c * jnp.tanh(logits / c) if c else logits


def head_logits(cfg: ModelConfig, variables, x: jax.Array) -> jax.Array:
    """`lm_head` as a pure function of the weights: head inputs x [S, E] -> logits [S, V] f32.

    The same einsum as the module, callable outside `apply` (inside `lax.map`, say), so the
    runner can compute logits for many rows a chunk at a time (prompt logprobs).
    """
    p = variables["params"]
    if cfg.tie_word_embeddings:
        logits = rows_matmul(cfg, "se,ve->sv", x, p["embed"]["embedding"].astype(x.dtype))
    else:
        logits = rows_matmul(cfg, "se,ev->sv", x, p["lm_head"]["kernel"].astype(x.dtype))
    return softcap_logits(cfg, logits.astype(jnp.float32))


def head_rows(module: nn.Module, x: jax.Array, meta: AttentionMetadata, all_hidden: bool,
              head_in: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """The head inputs [S, E] of the rows at meta.logits_indices: `head_in` (the final norm, and
    whatever else runs per row before the head) applied to those rows of x [T, D].

    With `all_hidden` it runs on every token instead, and the result [T, E] is sown as
    `intermediates["head_input"]` (read with `apply(..., mutable=["intermediates"])`): prompt
    logprobs need the logits of every position. Without it the sow never happens and the head
    input costs S rows, not T.
    """
    if not all_hidden:
        return head_in(x[meta.logits_indices])  # [S, E]
    h = head_in(x)  # [T, E]
    module.sow("intermediates", "head_input", h)
    return h[meta.logits_indices]  # [S, E]


# --- norms ----------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """LLaMA's RMSNorm: normalize in float32, cast back, then scale (HF's order).

    With `unit_offset` (Gemma's): scale by (1 + w) in float32, then cast back; w starts at 0.
    """

    eps: float
    unit_offset: bool = False
    batch_invariant: bool = False  # each row's sums independent of the row count (see row_norm)
    invariant_norm: str | None = None  # how, under batch_invariant (row_norm's method)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros if self.unit_offset else nn.initializers.ones
        scale = _param(self, "scale", init, (x.shape[-1],), ("norm",))

        def rms(x: jax.Array, moments: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
            xf = x.astype(jnp.float32)
            ms = jnp.mean(xf * xf, axis=-1, keepdims=True) if moments is None else moments[1]
            y = xf * jax.lax.rsqrt(ms + self.eps)
            if self.unit_offset:
                return (y * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)
            return scale.astype(x.dtype) * y.astype(x.dtype)

        return row_norm(rms, x, self.batch_invariant, self.invariant_norm)


class LayerNorm(nn.Module):
    """LayerNorm in float32, with optional scale and bias (OPT can turn both off)."""

    eps: float
    affine: bool = True
    batch_invariant: bool = False  # each row's sums independent of the row count (see row_norm)
    invariant_norm: str | None = None  # how, under batch_invariant (row_norm's method)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.affine:
            scale = _param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("norm",))
            bias = _param(self, "bias", nn.initializers.zeros, (x.shape[-1],), ("norm",))

        def layer_norm(x: jax.Array, moments: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
            xf = x.astype(jnp.float32)
            if moments is None:
                mean = jnp.mean(xf, axis=-1, keepdims=True)
                var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
            else:
                mean, var = moments
            y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
            if self.affine:
                y = y * scale + bias
            return y.astype(x.dtype)

        return row_norm(layer_norm, x, self.batch_invariant, self.invariant_norm, centered=True)


NORM_ENV = "PAGEDJAX_BATCH_INVARIANT_NORM"  # listed in compile_cache.PROGRAM_ENV
NORM_METHODS = ("tiles", "kernel")


def invariant_norm_method(tensor_parallel_size: int = 1) -> str:
    """How batch_invariant norms run: "tiles" (row_tiled: fixed-size row tiles in a loop), or
    "kernel" (the row statistics in one launch of models/invariant_norm's kernel, one program per
    row; interpreted off the GPU). PAGEDJAX_BATCH_INVARIANT_NORM where set, else "kernel" on a GPU
    at tensor-parallel size 1 (its bit tests and the engine's bi tests pass on an H100; W1's bi
    cost 28% -> 25%, the mixed step no longer waits on the host: benchmarks/RESULTS.md) and
    "tiles" elsewhere. On a GPU the kernel runs at size 1 only (a ValueError otherwise): XLA
    partitions a custom call it knows nothing of by replicating its operands (the per-head norm's
    are head-sharded), a path neither tested nor measured."""
    gpu = jax.default_backend() == "gpu"
    method = os.environ.get(NORM_ENV) or ("kernel" if gpu and tensor_parallel_size == 1 else "tiles")
    if method not in NORM_METHODS:
        raise ValueError(f"{NORM_ENV}={method!r}: expected one of {', '.join(NORM_METHODS)}")
    if method == "kernel" and gpu and tensor_parallel_size != 1:
        raise ValueError(f"{NORM_ENV}=kernel runs at tensor_parallel_size 1 on a GPU, got {tensor_parallel_size}")
    return method


def row_norm(f: Callable[..., jax.Array], x: jax.Array, batch_invariant: bool, method: str | None = None,
             centered: bool = False) -> jax.Array:
    """A norm f over x [T, ..., D]; under batch_invariant with each row's sums independent of T.
    XLA's reductions over D are not: its CPU reduction sums 8 rows at a time in SIMD lanes once
    there are 8 rows, one row across the lanes below that, and its GPU reduction picks fusion and
    tiling by the row count. `method` (else invariant_norm_method()): "tiles" runs f on row tiles of
    a fixed size; "kernel" passes f(x, moments) the row statistics from invariant_norm.row_moments
    (`centered`: mean and variance, else the mean square), f's elementwise rest left to XLA."""
    if not batch_invariant:
        return f(x)
    if (method or invariant_norm_method()) == "kernel":
        from pagedjax.models import invariant_norm

        return f(x, invariant_norm.row_moments(x, centered))
    return row_tiled(f, x)


def norm(cfg: ModelConfig, name: str) -> nn.Module:
    """The config's norm: RMSNorm ("rms", Gemma's "rms_unit_offset") or LayerNorm (optionally without affine)."""
    if cfg.norm in ("rms", "rms_unit_offset"):
        return RMSNorm(cfg.norm_eps, cfg.norm == "rms_unit_offset", cfg.batch_invariant, cfg.invariant_norm, name=name)
    return LayerNorm(cfg.norm_eps, cfg.norm_affine, cfg.batch_invariant, cfg.invariant_norm, name=name)


# --- rotary embeddings ----------------------------------------------------------------------


def rope_inv_freq(cfg: ModelConfig, local: bool = False, long: bool = False) -> np.ndarray:
    """Inverse frequencies [rotary_dim / 2] (host constant), with HF's rope_scaling applied.

    local: a sliding layer's, with cfg.rope_local_theta when set (unscaled, Gemma 3's local rotary).
    long: longrope's long factors (else its short ones).
    """
    dim, s = cfg.rotary_dim, cfg.rope_scaling
    theta = cfg.rope_local_theta if local and cfg.rope_local_theta else cfg.rope_theta
    if local and cfg.rope_local_theta:
        s = RopeScaling()
    inv = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    if s.type == "linear":
        inv = inv / s.factor
    elif s.type == "llama3":
        wavelen = 2 * np.pi / inv
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor)
        medium = (1 - smooth) * inv / s.factor + smooth * inv
        inv = np.where(wavelen > low_wavelen, inv / s.factor, np.where(wavelen < high_wavelen, inv, medium))
    elif s.type == "longrope":
        inv = inv / np.asarray(s.long_factor if long else s.short_factor, np.float64)
    elif s.type == "yarn":
        keep = _yarn_extrapolation(s, dim, theta)
        inv = inv / s.factor * (1 - keep) + inv * keep
    return inv.astype(np.float32)


def _yarn_extrapolation(s: RopeScaling, dim: int, theta: float) -> np.ndarray:
    """YaRN's weight [dim / 2] of each frequency's original (extrapolated) value against its
    interpolated one (inv / factor): 1 for the high frequencies that turn more than beta_fast times
    over the original context, 0 for those under beta_slow, a linear ramp between."""
    def dim_of(rotations):  # the dim whose frequency turns `rotations` times in the original context
        return dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(s.beta_fast), dim_of(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers does: no zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    return 1 - ramp


def rope_angles(cfg: ModelConfig, meta: AttentionMetadata, local: bool = False) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) [T, rotary_dim / 2] float32 of each token's position, for apply_rope.

    longrope (Phi-3) follows transformers' rule: a forward whose sequence is longer than
    original_max_position_embeddings (max position + 1) uses the long factors, else the short
    ones. Dynamic NTK too: such a forward's base is theta * (factor * L / M - (factor - 1)) **
    (dim / (dim - 2)) for a sequence of L > M = max_position_embeddings tokens, float32 as HF
    computes it. A request's sequence here is its context up to this step's last token
    (seq_lens), which is what HF sees when it runs that request alone with the same chunks.
    """
    pos = meta.positions.astype(jnp.float32)[:, None]  # [T, 1]
    s = RopeScaling() if local and cfg.rope_local_theta else cfg.rope_scaling  # as rope_inv_freq
    if s.type == "dynamic":
        M, dim = s.original_max_position_embeddings, cfg.rotary_dim
        seq = jnp.maximum(meta.seq_lens[_token_requests(meta)], M).astype(jnp.float32)  # [T]
        base = cfg.rope_theta * (s.factor * seq / M - (s.factor - 1)) ** (dim / (dim - 2))  # [T]
        inv = 1.0 / base[:, None] ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)[None, :]  # [T, rot/2]
        angles = pos * inv
        return jnp.cos(angles), jnp.sin(angles)
    if s.type != "longrope":
        angles = pos * rope_inv_freq(cfg, local)[None, :]  # [T, rot/2]
        if s.type == "yarn" and s.attention_factor != 1:
            return jnp.cos(angles) * s.attention_factor, jnp.sin(angles) * s.attention_factor
        return jnp.cos(angles), jnp.sin(angles)
    long = (meta.seq_lens[_token_requests(meta)] > s.original_max_position_embeddings)[:, None]  # [T, 1]
    inv = jnp.where(long, rope_inv_freq(cfg, long=True)[None, :], rope_inv_freq(cfg, long=False)[None, :])
    angles = pos * inv  # [T, rot/2]
    return jnp.cos(angles) * s.attention_factor, jnp.sin(angles) * s.attention_factor


def _token_requests(meta: AttentionMetadata) -> jax.Array:
    """The request of each token [T] (padding tokens: the last request's)."""
    T, R = meta.positions.shape[0], meta.seq_lens.shape[0]
    return jnp.clip(jnp.searchsorted(meta.query_start_loc, jnp.arange(T), side="right") - 1, 0, R - 1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates the first 2 * cos.shape[-1] dims of x [T, n, H] in HF's half-split layout."""
    rot = 2 * cos.shape[-1]
    cos, sin = cos[:, None, :], sin[:, None, :]  # [T, 1, rot/2]
    xf = x[..., :rot].astype(jnp.float32)
    x1, x2 = xf[..., : rot // 2], xf[..., rot // 2 :]  # [T, n, rot/2] each
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
    return jnp.concatenate([rotated, x[..., rot:]], axis=-1)  # [T, n, H]


# --- MLPs -----------------------------------------------------------------------------------


class GatedMLP(nn.Module):
    """LLaMA's MLP: down(act(gate(x)) * up(x))."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        D, F, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        with jax.named_scope("mlp"):
            gate = Einsum("td,df->tf", (D, F), ("embed", "mlp"), b, cfg, name="gate_proj")(x)  # [T, F]
            up = Einsum("td,df->tf", (D, F), ("embed", "mlp"), b, cfg, name="up_proj")(x)  # [T, F]
            h = ACTIVATIONS[cfg.activation](gate) * up
            return Einsum("tf,fd->td", (F, D), ("mlp", "embed"), b, cfg, name="down_proj")(h)  # [T, D]


class SparseMoeBlock(nn.Module):
    """Mixtral's / Qwen3-MoE's MLP: a router picks k of X SwiGLU experts per token, their outputs
    summed with the routing weights (models/moe.py has the math and its implementations)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, num_valid: jax.Array) -> jax.Array:
        """x [T, D] -> [T, D]; tokens at index >= num_valid are padding: routed nowhere, output 0."""
        cfg = self.config
        D, X, F = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
        init = nn.initializers.normal(INIT_STD)
        with jax.named_scope("moe"):
            logits = Einsum("td,dx->tx", (D, X), ("embed", None), name="gate")(x)  # [T, X] router, replicated
            weights, ids = moe.route(logits, cfg.num_experts_per_tok, cfg.norm_topk_prob)  # [T, k] each
            keep = jnp.broadcast_to((jnp.arange(x.shape[0]) < num_valid)[:, None], ids.shape)  # [T, k]
            shapes = {"gate_proj": (X, D, F), "up_proj": (X, D, F), "down_proj": (X, F, D)}
            scales = zeros = input_rows = block = None
            q = cfg.quantization
            if q is not None and q.quantizes_experts:  # e4m3 or uint4 codes, and their scales
                block, group = q.expert_block_size, q.expert_group_size  # (bn, bk) FP8 blocks; int4 K per group
                int4 = group is not None
                w = {n: self.param(f"experts_{n}", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                               moe.EXPERT_AXES[n]),
                                   shapes[n], jnp.uint4 if int4 else jnp.float8_e4m3fn) for n in shapes}
                # [X, KB, NB] block scales, [X, G, N] group scales (and zeros), else [X, out]
                scale_shapes = {n: (X, -(-s[1] // block[1]), -(-s[2] // block[0])) if block is not None else
                                (X, 1 if group == -1 else s[1] // group, s[2]) if int4 else (X, s[2])
                                for n, s in shapes.items()}
                grouped = block is not None or int4

                def quant_params(suffix, init, dtype):
                    return tuple(self.param(f"experts_{n}{suffix}", nn.with_logical_partitioning(
                        init, moe.expert_scale_axes(n, grouped)), scale_shapes[n], dtype) for n in shapes)

                scales = quant_params(moe.SCALE_SUFFIX, nn.initializers.ones, jnp.float16 if int4 else jnp.float32)
                if int4:
                    zeros = quant_params(moe.ZERO_SUFFIX, nn.initializers.zeros, jnp.uint8)
                if int4 and q.act_order:  # [X, in]: the stored (group-sorted) row of each input row
                    input_rows = tuple(self.param(f"experts_{n}{moe.ROWS_SUFFIX}", nn.with_logical_partitioning(
                        _identity_rows, moe.EXPERT_ROWS_AXES[n]), s[:2], jnp.int32) for n, s in shapes.items())
            else:
                w = {n: _param(self, f"experts_{n}", init, shapes[n], moe.EXPERT_AXES[n]) for n in shapes}
            return moe.sharded_expert_mlp(
                x, weights, ids, keep, w["gate_proj"], w["up_proj"], w["down_proj"], scales=scales, zeros=zeros,
                input_rows=input_rows, block_size=block, expert_parallel=cfg.expert_parallel,
                activation=ACTIVATIONS[cfg.activation],
                impl=moe.resolve_impl(cfg.moe_impl, x.shape[0], cfg.num_experts_per_tok, X,
                                      cfg.batch_invariant))  # [T, D]


def _identity_rows(key, shape, dtype) -> jax.Array:
    """Act-order experts' initial row order: every input row its own stored row."""
    del key
    return jnp.broadcast_to(jnp.arange(shape[-1], dtype=dtype), shape)


def feed_forward(cfg: ModelConfig, layer_idx: int, x: jax.Array, meta: AttentionMetadata,
                 name: str = "mlp") -> jax.Array:
    """The layer's MLP on x [T, D]: experts where cfg.is_moe_layer(layer_idx), else LLaMA's."""
    if cfg.is_moe_layer(layer_idx):
        return SparseMoeBlock(cfg, name=name)(x, meta.query_start_loc[-1])  # real tokens come first
    return GatedMLP(cfg, name=name)(x)


class MLP(nn.Module):
    """GPT-2 / NeoX / OPT MLP: fc_out(act(fc_in(x)))."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        D, F, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        with jax.named_scope("mlp"):
            h = Einsum("td,df->tf", (D, F), ("embed", "mlp"), b, cfg, name="fc_in")(x)  # [T, F]
            h = ACTIVATIONS[cfg.activation](h)
            return Einsum("tf,fd->td", (F, D), ("mlp", "embed"), b, cfg, name="fc_out")(h)  # [T, D]


# --- attention ------------------------------------------------------------------------------


class Attention(nn.Module):
    """qkv -> rotary -> write K/V into the pool -> paged attention -> output projection."""

    config: ModelConfig
    layer_idx: int
    attn_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, kv: tuple[jax.Array, jax.Array], meta: AttentionMetadata):
        """x [T, D], kv the layer's (k_pages, v_pages) [P, B, K, H]; returns ([T, D], new kv)."""
        cfg = self.config
        D, N, K, H, b = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.qkv_bias
        T = x.shape[0]
        chex.assert_shape(x, (T, D))
        impl = resolve_impl(self.attn_impl, head_dim=cfg.head_dim, kv_dtype=kv[0].dtype)
        # An fp8 pool (kv_cache_dtype="fp8") is written and read with per-kv-head scales: the
        # checkpoint's calibrated k_scale / v_scale, per tensor or per kv head, where it has them
        # (a quantization with kv_cache_scheme; unused by other pools, as in vLLM), else 1.0, as
        # vLLM without calibrated scales (e4m3 keeps ~2 significant digits over 2^-9..448).
        q_cfg = cfg.quantization
        scheme = q_cfg.kv_cache_scheme if q_cfg is not None else None
        if scheme == "tensor":
            ones = nn.initializers.ones
            kv_scales = [jnp.broadcast_to(_param(self, n, ones, (), ()), (K,)) for n in KV_SCALES]
        elif scheme == "attn_head":  # [K], sharded (and replicated) with the pool's kv heads
            kv_scales = [_param(self, n, nn.initializers.ones, (K,), ("kv_heads",)) for n in KV_SCALES]
        else:
            kv_scales = [jnp.ones((K,), jnp.float32)] * 2
        scales = dict(zip(KV_SCALES, kv_scales)) if is_fp8(kv[0].dtype) else {}
        with jax.named_scope("attention"):
            q = Einsum("td,dnh->tnh", (D, N, H), ("embed", "heads", "head_dim"), b, cfg, name="q_proj")(x)
            k = Einsum("td,dkh->tkh", (D, K, H), ("embed", "kv_heads", "head_dim"), b, cfg, name="k_proj")(x)
            v = Einsum("td,dkh->tkh", (D, K, H), ("embed", "kv_heads", "head_dim"), b, cfg, name="v_proj")(x)
            if cfg.qk_norm:  # per head, over head_dim: one [H] scale shared by the heads
                q = norm(cfg, "q_norm")(q)  # [T, N, H]
                k = norm(cfg, "k_norm")(k)  # [T, K, H]
            window = cfg.layer_window(self.layer_idx)
            if cfg.rotary_dim:
                cos, sin = rope_angles(cfg, meta, local=window is not None)  # [T, rot/2] each
                q = apply_rope(q, cos, sin)  # [T, N, H]
                k = apply_rope(k, cos, sin)  # [T, K, H]
            k_pages, v_pages = write_kv(*kv, k, v, meta.slot_mapping, impl="ffi" if impl == "ffi" else "xla",
                                        **scales)
            scale = (cfg.query_pre_attn_scalar or H) ** -0.5 if cfg.scale_attn_weights else 1.0
            if cfg.scale_attn_by_inverse_layer_idx:
                scale /= self.layer_idx + 1
            o = paged_attention(q, k_pages, v_pages, meta, scale=scale, impl=impl, sliding_window=window,
                                logit_softcap=cfg.attn_logit_softcap or None, batch_invariant=cfg.batch_invariant,
                                invariant_attention=cfg.invariant_attention, invariant_split=cfg.invariant_split,
                                **scales)  # [T, N, H]
            chex.assert_shape(o, (T, N, H))
            out = Einsum("tnh,nhd->td", (N, H, D), ("heads", "head_dim", "embed"), cfg.o_bias, cfg,
                         name="o_proj")(o)
        return out, (k_pages, v_pages)


def check_inputs(cfg: ModelConfig, tokens: jax.Array, pages) -> None:
    """Raises unless `tokens` is [T] int and `pages` has one (k, v) pair per layer."""
    chex.assert_rank(tokens, 1)
    chex.assert_type(tokens, int)
    if len(pages) != cfg.num_layers:
        raise ValueError(f"{cfg.name or cfg.architecture}: got {len(pages)} page-pool layers, "
                         f"the model has {cfg.num_layers}")


class DecoderBlock(nn.Module):
    """One decoder layer of a family: `x [T, D], (k, v) pages, meta -> (x [T, D], new (k, v))`.
    Subclasses write `__call__` (@nn.compact) from `attention` and the MLP / norms they need."""

    config: ModelConfig
    layer_idx: int
    attn_impl: str = "auto"

    def attention(self, x: jax.Array, kv, meta: AttentionMetadata):
        """This layer's paged self-attention of x [T, D] -> ([T, D], new kv)."""
        return Attention(self.config, self.layer_idx, self.attn_impl, name="attn")(x, kv, meta)


class DecoderLM(nn.Module):
    """A family's causal LM over a ragged flat batch with the paged KV pool as explicit state.

    Contract (every model): `logits [S, V] f32, pages = Model(cfg).apply(variables, tokens [T],
    pages, meta)`: the logits of the rows at meta.logits_indices; one param subtree `layers_{i}`
    and one (k, v) pool pair per layer, unrolled. A family names its `block` and, where it
    differs, how tokens become the first hidden state (`embed_tokens`: positions, scaling) and
    what runs on a row before the head (`head_in`: the final norm).
    """

    config: ModelConfig
    attn_impl: str = "auto"
    block: ClassVar[type[DecoderBlock]]

    def embed_tokens(self, embed: Embed, tokens: jax.Array, meta: AttentionMetadata) -> jax.Array:
        """tokens [T] -> x [T, D]."""
        return embed(tokens)

    def head_in(self) -> Callable[[jax.Array], jax.Array]:
        """[rows, D] -> [rows, E], row by row: the final norm."""
        return norm(self.config, "final_norm")

    @nn.compact
    def __call__(self, tokens: jax.Array, pages, meta: AttentionMetadata, all_hidden: bool = False):
        """tokens [T] -> (logits [S, V] f32 at meta.logits_indices, new pages); all_hidden: head_rows."""
        cfg = self.config
        check_inputs(cfg, tokens, pages)
        embed = Embed(cfg.vocab_size, cfg.embed_dim, name="embed")
        x = self.embed_tokens(embed, tokens, meta)  # [T, D]
        new_pages = []
        for i, kv in enumerate(pages):
            x, kv = self.block(cfg, i, self.attn_impl, name=f"layers_{i}")(x, kv, meta)
            new_pages.append(kv)
        x = head_rows(self, x, meta, all_hidden, self.head_in())  # [S, E]
        return lm_head(cfg, embed, x), new_pages  # soft-capped there where the config says so
