"""Mixture-of-experts math: top-k routing, and the expert MLPs run over the tokens routed to each.

Dims: T tokens in the flat batch, D hidden, E experts (on this device), k experts per token,
F expert MLP width, A = T * k (token, expert) assignments, C capacity (rows per expert and round).

Four exact implementations of the expert MLPs, chosen by a static `impl` (MOE_IMPLS):
  "ragged"    the assignments sorted by expert, `jax.lax.ragged_dot` with the group sizes
              (a grouped GEMM: each expert multiplies only its own rows), unsorted, combined.
  "capacity"  the same sorted assignments laid out in a padded [E, C, D] buffer (gathered from
              the tokens, the results gathered back: no [A, D] copy is sorted or scattered), one
              batched einsum per projection. C is static (`capacity`); an expert with more than C rows
              takes further rounds (a while loop until every row is done), so no token is ever
              dropped; each such round serves only the HOT_EXPERTS experts with the most rows left
              (their weights gathered), so an uneven load does not cost rounds over all E. C = T
              (a step of at most MIN_CAPACITY tokens) needs no loop at all; a loop's trip count is
              read back by the host on a GPU.
  "dense"     every token through every expert, weighted by a dense [T, E] combine matrix (E / k
              times the FLOPs: the baseline the others are measured against).
  "gather"    each assignment's own expert weights gathered ([A, D, F]: the weights of at most A
              experts, where the others read all E) and applied to its token: for steps of a few
              tokens, where reading every expert's weights is the whole cost of the layer.
"auto" picks by the step's size T (static: a step's size is its bucket), as measured on an H100
(benchmarks/RESULTS.md, benchmarks/kernels/moe.py, bf16 and e4m3 experts):
  T * k * GATHER_RATIO <= E   "gather": a batch-1 decode step of Qwen3-30B-A3B reads 8 of its 128
                              experts' weights, not all of them (0.078 against 0.41-0.55 ms a layer)
  T <= DENSE_MAX_TOKENS       "dense": 2-18% faster at T 2-64 than the capacity layout with C = T
                              (the same FLOPs, plus its dispatch), both models, bf16 and e4m3
                              experts
  above                       "capacity": on the CPU 1.5-40x faster than ragged_dot and 2-10x
                              faster than dense from 256 tokens (8 and 32 experts); on the H200
                              2.6-7.5x faster than ragged_dot (notes/h200_probes.md)
Under batch-invariant numerics "auto" is always "capacity": the implementation may not depend on
the step's size.

Quantized experts (weight-only; QuantConfig.quantizes_experts) hold their codes in
"experts_<proj>" and their scales in "experts_<proj>_scale" (SCALE_SUFFIX): e4m3 codes with a
scale per expert and output channel [E, out] (applied to each GEMM's output) or per block [E, KB, NB]
(block FP8), or, from an AWQ / GPTQ checkpoint, its own uint4 codes [E, K, N] with zero points
("experts_<proj>_zero", ZERO_SUFFIX, uint8) and scales per group of K / G rows [E, G, N]:
w = (q - zero) * scale. A GPTQ checkpoint with act order (desc_act) gives each expert's rows in
its own group order: its codes are held with the rows sorted by group (so a group is K / G
contiguous rows, as without act order) and "experts_<proj>_rows" (ROWS_SUFFIX, int32 [E, K]) the
stored row of each input row (the inverse of the group order, computed at load); the dequantized weight's rows are put back in input order (a gather
over K) before its GEMM, so every implementation reads weights in the input order. Block and group
weights are dequantized to x's dtype in the step: only the gathered experts' with "gather", every
expert's otherwise.

Assignments that are not computed here (padding tokens; under expert parallelism the tokens
routed to another device's experts) are masked by `keep` and contribute zero.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from pagedjax.models.config import MOE_IMPLS
from pagedjax.quantization.fp8 import expand_block_scale

CAPACITY_FACTOR = 1.5  # capacity rows per expert and round, over the mean (T * k / E)
# C is a multiple of CAPACITY_TILE rows up to 128, of twice it above (the GEMMs' row tiles: C 160
# was slower than 192), and at least MIN_CAPACITY (unless T is less): on an H100, Qwen3-30B-A3B's
# layer (e4m3 experts) was fastest at C 64, 96 and 192 for 512, 1024 and 2048 tokens; at 256
# tokens C 32 was faster still with even routing but slower with a skewed router than C 64, which
# beat the former C of 128 in both (benchmarks/RESULTS.md)
CAPACITY_TILE = 32
MIN_CAPACITY = 64
# Rounds after the first serve this many experts: those with the most rows left, their weights
# gathered, so an uneven load costs rounds over a few experts, not over all E
HOT_EXPERTS = 16
# "auto" gathers while the step's assignments, times this, are at most the experts: the gathered
# [A, D, F] weights are read, written and read again by the GEMMs (~3 A experts' bytes), where the
# capacity layout reads each of the E experts once.
GATHER_RATIO = 4
DENSE_MAX_TOKENS = 64  # "auto" runs every expert on every token up to this many tokens


def resolve_impl(impl: str, num_tokens: int | None = None, top_k: int = 1, num_experts: int = 1,
                 batch_invariant: bool = False) -> str:
    """The implementation a step of num_tokens runs (static: a step's size is its bucket).

    "auto" -> "gather" for a step of few enough tokens (num_tokens * top_k * GATHER_RATIO <= E),
    "dense" up to DENSE_MAX_TOKENS, else "capacity"; always "capacity" under batch_invariant or
    without num_tokens. Others are checked and kept."""
    if impl not in MOE_IMPLS:
        raise ValueError(f"moe_impl must be one of {MOE_IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    if num_tokens is None or batch_invariant:
        return "capacity"
    if num_tokens * top_k * GATHER_RATIO <= num_experts:
        return "gather"
    return "dense" if num_tokens <= DENSE_MAX_TOKENS else "capacity"


def route(router_logits: jax.Array, top_k: int, renormalize: bool) -> tuple[jax.Array, jax.Array]:
    """HF's top-k router: softmax over all E logits in float32, the top k, optionally renormalized.

    router_logits [T, E] -> (weights [T, k] f32, expert ids [T, k] int32). With renormalize this
    equals a softmax over the k chosen logits (Mixtral); Qwen3-MoE makes it `norm_topk_prob`.
    """
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)  # [T, E]
    weights, ids = jax.lax.top_k(probs, top_k)  # [T, k] each, largest first
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, ids.astype(jnp.int32)


def capacity(num_tokens: int, top_k: int, num_experts: int, factor: float | None = None) -> int:
    """Static rows per expert and round: factor x the mean load, rounded up to a multiple of
    CAPACITY_TILE (of twice it over 128 rows), at least MIN_CAPACITY, at most T (an expert gets
    each token at most once, so C = T always fits in one round)."""
    mean = num_tokens * top_k / num_experts
    factor = CAPACITY_FACTOR if factor is None else factor
    rows = factor * mean
    tile = CAPACITY_TILE if rows <= 128 else 2 * CAPACITY_TILE
    return min(num_tokens, max(MIN_CAPACITY, tile * math.ceil(rows / tile)))


def expert_mlp(
    x: jax.Array,  # [T, D]
    weights: jax.Array,  # [T, k] f32 routing weights
    ids: jax.Array,  # [T, k] int32 expert of each assignment, in [0, E) for the kept ones
    keep: jax.Array,  # [T, k] bool: assignments computed here
    w_gate: jax.Array,  # [E, D, F]
    w_up: jax.Array,  # [E, D, F]
    w_down: jax.Array,  # [E, F, D]
    *,
    activation: Callable[[jax.Array], jax.Array],
    impl: str,
    capacity_rows: int | None = None,
    scales: tuple[jax.Array, jax.Array, jax.Array] | None = None,
    block_size: tuple[int, int] | None = None,
    zeros: tuple[jax.Array, jax.Array, jax.Array] | None = None,
    input_rows: tuple[jax.Array, jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """sum_k weights[t, k] * down(act(gate(x_t)) * up(x_t)) of expert ids[t, k]: [T, D] float32.

    SwiGLU experts in x's dtype, combined in float32; `impl` is one of MOE_IMPLS ("auto" picks by
    T, resolve_impl);
    capacity_rows: the capacity layout's C (default `capacity(T, k, E)`; any C >= 1 is exact).
    scales: FP8 experts (weight-only): the weights are e4m3 codes, converted to x's dtype in the
    matmuls, and each projection's output column of expert e is multiplied by its scale
    (s_gate [E, F], s_up [E, F], s_down [E, D], f32), as the dense FP8 weight-only path does.
    With block_size (block_n, block_k) the scales are per expert and block instead ([E, KB, NB]
    each, over the weight's [in, out]) and each weight is dequantized to x's dtype before its
    matmul: only the gathered experts' weights with "gather", every expert's otherwise.
    With zeros, int4 experts: the weights are uint4 codes [E, K, N], zeros (uint8) and scales
    [E, G, N] per group of K / G rows, dequantized as block weights are.
    With input_rows (act-order int4, [E, K] int32 each), the codes' rows are sorted by group: input
    row i of expert e is stored row input_rows[e, i]; each dequantized weight's rows are put back in
    input order by it.
    """
    T, k = ids.shape
    E = w_gate.shape[0]
    impl = resolve_impl(impl, T, k, E)
    if scales is None:
        scales = (None, None, None)
    weights = jnp.where(keep, weights, 0.0)
    if impl == "gather":  # before any conversion: FP8 codes are gathered as they are, then converted
        return _gather(x, weights, ids, keep, w_gate, w_up, w_down, activation, scales, block_size, zeros,
                       input_rows)
    ws = _loaders((w_gate, w_up, w_down), scales, zeros, block_size, x.dtype, input_rows)
    if block_size is not None or zeros is not None:  # applied by the loaders
        scales = (None, None, None)
    if impl == "dense":
        return _dense(x, weights, jnp.where(keep, ids, E), E, ws, activation, scales)
    flat = jnp.where(keep, ids, E).reshape(T * k)  # [A]; dropped assignments sort last, as expert E
    order = jnp.argsort(flat, stable=True)  # [A] assignment at each sorted row
    counts = jnp.bincount(flat, length=E + 1)[:E].astype(jnp.int32)  # [E] rows of each expert
    if impl == "capacity":
        C = capacity_rows or capacity(T, k, E)
        y = _capacity(x, flat, order, counts, k, ws, activation, C, single=C >= T,
                      scales=[None if s is None else s[:, None, :] for s in scales])  # [E, 1, out] each
    elif impl == "ragged":
        expert = flat[order]  # [A] non-decreasing
        rows = [None if s is None else s[jnp.minimum(expert, E - 1)] for s in scales]  # [A, out] each
        y = _ragged(x[order // k], counts, ws, activation, rows)  # [A, D] in sorted order
        y = jnp.where((expert < E)[:, None], y, 0)  # rows of dropped assignments: whatever came out
        y = y[_sorted_rows(order)]  # back in assignment order
    else:
        raise ValueError(f"unknown moe impl {impl!r} (have {MOE_IMPLS[1:]})")
    y = y.reshape(T, k, -1).astype(jnp.float32)  # [T, k, D]
    # a gather and a sum over k, not a scatter-add: the same sums in the same order every time
    return jnp.einsum("tkd,tk->td", y, weights)


def _sorted_rows(order: jax.Array) -> jax.Array:
    """The inverse of the permutation `order` [A]: the sorted row of each assignment."""
    return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))


def _swiglu(h_gate: jax.Array, h_up: jax.Array, activation) -> jax.Array:
    return activation(h_gate) * h_up


def dequantize_block(w: jax.Array, scale: jax.Array, block_size: tuple[int, int], dtype) -> jax.Array:
    """e4m3 expert weights [..., K, N] times their block scales [..., KB, NB] (block_size (bn, bk)),
    in f32, as `dtype`."""
    K, N = w.shape[-2:]
    bn, bk = block_size
    return (w.astype(jnp.float32) * expand_block_scale(scale, K, N, (bk, bn))).astype(dtype)


def dequantize_group(q: jax.Array, zero: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """int4 codes [..., K, N] with zero points and scales [..., G, N] (group g: rows g*K/G..),
    (q - zero) * scale in f32, as `dtype`."""
    *lead, K, N = q.shape
    G = scale.shape[-2]
    q = q.astype(jnp.float32).reshape(*lead, G, K // G, N)  # [..., G, K/G, N]
    w = (q - zero.astype(jnp.float32)[..., None, :]) * scale.astype(jnp.float32)[..., None, :]
    return w.reshape(*lead, K, N).astype(dtype)


def _in_input_order(w: jax.Array, rows: jax.Array | None) -> jax.Array:
    """Act-order weights [..., K, N] stored by group, with their rows put back in input order:
    input row i is stored row rows[..., i] (rows [..., K]); w itself without rows."""
    return w if rows is None else jnp.take_along_axis(w, rows[..., None], axis=-2)


def _as_dtype(w: jax.Array, scale, zero, rows, block_size, dtype) -> jax.Array:
    """One projection's weights [..., in, out] in `dtype`: int4 (zero) dequantized by groups, its
    act-order rows put back in input order; block FP8 (block_size) dequantized by blocks; others
    (float, per-channel FP8 codes, whose scales apply to the GEMM's output) converted."""
    if zero is not None:
        return _in_input_order(dequantize_group(w, zero, scale, dtype), rows)
    if block_size is not None:
        return dequantize_block(w, scale, block_size, dtype)
    return w.astype(dtype)


def _loaders(ws, scales, zeros, block_size, dtype, rows=None) -> tuple[Callable[..., jax.Array], ...]:
    """One thunk per projection giving its weight [E, in, out] in `dtype` (_as_dtype), or, given
    expert ids of any shape [...], those experts' [..., in, out] (the codes gathered before they
    are converted).

    Each GEMM calls its own, so the conversion is traced beside the GEMM that reads it and XLA can
    fuse the two: one conversion shared by several GEMMs (the capacity layout's rounds) would be
    written to memory whole, in bf16 twice an FP8 weight's bytes and four times an int4 one's,
    and read again (on an H100, the largest part of a Qwen3-30B-A3B decode step's time)."""
    def load(w, s, z, r, experts=None):
        if experts is not None:
            w, s, z, r = (None if a is None else a[experts] for a in (w, s, z, r))
        return _as_dtype(w, s, z, r, block_size, dtype)

    none = (None,) * len(ws)
    return tuple(functools.partial(load, w, s, z, r) for w, s, z, r in zip(ws, scales, zeros or none, rows or none))


def _scaled(y: jax.Array, scale: jax.Array | None) -> jax.Array:
    """y times an FP8 weight's output-channel scales (broadcast to y), in f32; y itself without."""
    return y if scale is None else (y.astype(jnp.float32) * scale).astype(y.dtype)


def _ragged(xs, counts, ws, activation, scales=(None, None, None)) -> jax.Array:
    """Grouped GEMMs over the sorted rows xs [A, D]: rows past sum(counts) are not computed.
    ws: the projections' loaders (_loaders)."""
    w_gate, w_up, w_down = ws
    s_gate, s_up, s_down = scales
    gate = _scaled(jax.lax.ragged_dot(xs, w_gate(), counts), s_gate)  # [A, F]
    up = _scaled(jax.lax.ragged_dot(xs, w_up(), counts), s_up)  # [A, F]
    return _scaled(jax.lax.ragged_dot(_swiglu(gate, up, activation), w_down(), counts), s_down)  # [A, D]


def _capacity(x, flat, order, counts, k: int, ws, activation, C: int, single: bool,
              scales=(None, None, None)) -> jax.Array:
    """Batched einsums over a padded [E, C, D] layout: each expert's first C rows, then rounds
    over the HOT_EXPERTS experts with the most rows left, C more rows each, until none is left.

    The assignments sorted by expert (order, stable) give each expert's rows; the layout is
    gathered from the tokens x [T, D] (row c of expert e: the token of sorted row starts[e] +
    done[e] + c) and each assignment's result gathered from the output, so no [A, D] copy of the
    tokens is sorted, scattered or put back. Result: [A, D] in assignment order (flat's), zero
    where dropped (flat = E).
    single (static): C is at least the most rows an expert can get (T: each token picks an
    expert once), so no loop is traced.
    """
    A, E, D = flat.shape[0], counts.shape[0], x.shape[1]
    starts = jnp.cumsum(counts) - counts  # [E] first sorted row of each expert
    rank = _sorted_rows(order) - jnp.append(starts, A)[flat]  # [A] row within its expert (dropped: < 0)

    def run(experts, done):
        """Rows done[h]..done[h] + C of each expert experts[h] ([H] each; None: all E from row 0),
        as [A, D]: the results of the assignments among them, zero for the others."""
        pick = (lambda a: a) if experts is None else (lambda a: a[experts])
        H = E if experts is None else experts.shape[0]
        row = (0 if done is None else done[:, None]) + jnp.arange(C, dtype=jnp.int32)[None, :]  # [H, C]
        filled = row < pick(counts)[:, None]
        token = order[jnp.minimum(pick(starts)[:, None] + row, A - 1)] // k  # [H, C]
        buf = jnp.where(filled[..., None], x[token], 0)  # [H, C, D]
        w_gate, w_up, w_down = (load(experts) for load in ws)
        s_gate, s_up, s_down = (None if s is None else pick(s) for s in scales)
        h = _swiglu(_scaled(jnp.einsum("ecd,edf->ecf", buf, w_gate), s_gate),
                    _scaled(jnp.einsum("ecd,edf->ecf", buf, w_up), s_up), activation)
        y = _scaled(jnp.einsum("ecf,efd->ecd", h, w_down), s_down).reshape(H * C, D)
        if experts is None:
            slot, first = jnp.where(flat < E, flat, -1), jnp.zeros_like(rank)
        else:  # each assignment's place among the chosen experts (-1: not chosen), and its rows' start
            slot = jnp.full((E + 1,), -1, jnp.int32).at[experts].set(jnp.arange(H, dtype=jnp.int32))[flat]
            first = jnp.zeros((E + 1,), rank.dtype).at[experts].set(done.astype(rank.dtype))[flat]
        r = rank - first
        mine = (slot >= 0) & (r >= 0) & (r < C)  # the assignments this round computed
        return jnp.where(mine[:, None], y[jnp.where(mine, slot * C + r, 0)], 0)  # [A, D]

    y = run(None, None)
    if single:
        return y
    H = min(E, HOT_EXPERTS)

    def body(carry):
        done, acc = carry  # [E] rows of each expert computed so far
        _, hot = jax.lax.top_k(counts - done, H)  # [H] the experts with the most rows left
        hot = hot.astype(jnp.int32)
        start = done[hot]
        return done.at[hot].set(jnp.minimum(counts[hot], start + C)), acc + run(hot, start)

    done = jnp.minimum(counts, C)
    return jax.lax.while_loop(lambda c: jnp.any(c[0] < counts), body, (done, y))[1]


def _gather(x, weights, ids, keep, w_gate, w_up, w_down, activation, scales=(None, None, None),
            block_size=None, zeros=None, rows=None) -> jax.Array:
    """Each assignment's expert weights gathered and applied to its token alone: [T, D] float32.

    An assignment not computed here takes token 0's expert in its slot (its weight is zero), so a
    padded step gathers no expert that its real tokens do not; ids are clipped into [0, E) (under
    expert parallelism, another device's expert). Block-scaled FP8 and int4 weights are
    dequantized once gathered (act-order int4: their rows put back by their experts' `rows`)."""
    E = w_gate.shape[0]
    ids = jnp.clip(jnp.where(keep, ids, ids[:1]), 0, E - 1)  # [T, k]
    # [T, k, in, out] each, from the gathered codes and their scales / zeros / act-order rows
    w_gate, w_up, w_down = (load(ids) for load in _loaders((w_gate, w_up, w_down), scales, zeros, block_size,
                                                          x.dtype, rows))
    # per-channel FP8: [T, k, out] each, on the GEMMs' outputs (the others' were applied above)
    s_gate, s_up, s_down = ((None,) * 3 if block_size is not None or zeros is not None else
                            (None if s is None else s[ids] for s in scales))
    h = _swiglu(_scaled(jnp.einsum("td,tkdf->tkf", x, w_gate), s_gate),
                _scaled(jnp.einsum("td,tkdf->tkf", x, w_up), s_up), activation)  # [T, k, F]
    y = _scaled(jnp.einsum("tkf,tkfd->tkd", h, w_down), s_down)  # [T, k, D]
    return jnp.einsum("tkd,tk->td", y.astype(jnp.float32), weights)


def _dense(x, weights, ids, E: int, ws, activation, scales=(None, None, None)) -> jax.Array:
    """Every expert on every token; the combine matrix [T, E] holds each token's k weights.
    ws: the projections' loaders (_loaders)."""
    w_gate, w_up, w_down = (load() for load in ws)
    s_gate, s_up, s_down = (None if s is None else s[:, None, :] for s in scales)  # [E, 1, out]
    combine = jnp.einsum("tke,tk->te", jax.nn.one_hot(ids, E, dtype=jnp.float32), weights)  # [T, E]
    h = _swiglu(_scaled(jnp.einsum("td,edf->etf", x, w_gate), s_gate),
                _scaled(jnp.einsum("td,edf->etf", x, w_up), s_up), activation)  # [E, T, F]
    y = _scaled(jnp.einsum("etf,efd->etd", h, w_down), s_down)  # [E, T, D]
    return jnp.einsum("etd,te->td", y.astype(jnp.float32), combine)


# --- under tensor / expert parallelism ------------------------------------------------------

# Logical axes of the stacked expert weights (pagedjax.parallel maps them: "moe_mlp" over the
# tp devices by default, "experts" instead under expert parallelism).
EXPERT_AXES = {
    "gate_proj": ("experts", "embed", "moe_mlp"),  # [E, D, F]
    "up_proj": ("experts", "embed", "moe_mlp"),  # [E, D, F]
    "down_proj": ("experts", "moe_mlp", "embed"),  # [E, F, D]
}
# FP8 experts' scales, one per expert and output channel: [E, F] for gate / up, [E, D] for down;
# block scales [E, KB, NB] and int4 group scales and zeros [E, G, N] take their weights' axes
# (EXPERT_AXES), whole blocks or groups on each device
SCALE_SUFFIX = "_scale"  # the param "experts_<proj>_scale" beside the codes "experts_<proj>"
ZERO_SUFFIX = "_zero"  # int4 experts: the param "experts_<proj>_zero" (uint8 zero points)
ROWS_SUFFIX = "_rows"  # act-order int4 experts: "experts_<proj>_rows", the stored row of each input row
EXPERT_SCALE_AXES = {n: (a[0], a[2]) for n, a in EXPERT_AXES.items()}
EXPERT_ROWS_AXES = {n: a[:2] for n, a in EXPERT_AXES.items()}  # [E, K]: split with the weight's rows


def expert_scale_axes(name: str, blocks: bool) -> tuple[str | None, ...]:
    """The logical axes of expert projection `name`'s scales (or zeros): per block or group
    (`blocks`), or per output channel."""
    return EXPERT_AXES[name] if blocks else EXPERT_SCALE_AXES[name]


def sharded_expert_mlp(x, weights, ids, keep, w_gate, w_up, w_down, *, expert_parallel: bool,
                       scales: tuple[jax.Array, jax.Array, jax.Array] | None = None,
                       zeros: tuple[jax.Array, jax.Array, jax.Array] | None = None,
                       input_rows: tuple[jax.Array, jax.Array, jax.Array] | None = None, **opts) -> jax.Array:
    """`expert_mlp` per device when the step is traced under a tensor-parallel mesh: [T, D] in x's dtype.

    Each device computes its slice of the experts (its F columns of every expert, or, under
    expert parallelism, whole experts of its own, skipping the assignments of the others) on
    the replicated tokens and routing; one all-reduce of [T, D] sums the slices, as after a
    dense MLP. Without a mesh it is `expert_mlp` itself. Quantized experts' `scales` (and int4
    `zeros`) split with their experts and output columns, or blocks or groups; act-order
    `input_rows` with their experts and rows (whole experts only: parallel.check_tensor_parallel).
    """
    from pagedjax.mesh import match_spec, tp_mesh

    mesh = tp_mesh()
    if mesh is None:
        return expert_mlp(x, weights, ids, keep, w_gate, w_up, w_down, scales=scales, zeros=zeros,
                          input_rows=input_rows,
                          **opts).astype(x.dtype)
    from pagedjax import parallel  # late: parallel imports the models

    rules = parallel.axis_rules(expert_parallel)
    specs = [parallel.logical_spec(EXPERT_AXES[n], w.shape, mesh, rules)
             for n, w in (("gate_proj", w_gate), ("up_proj", w_up), ("down_proj", w_down))]
    split = tuple(sorted({a for s in specs for a in s if a is not None}))
    if not split:
        return expert_mlp(x, weights, ids, keep, w_gate, w_up, w_down, scales=scales, zeros=zeros,
                          input_rows=input_rows,
                          **opts).astype(x.dtype)
    experts_axis = specs[0][0]  # the mesh axis whole experts are split over, or None
    w_gate, w_up, w_down = (match_spec(w, mesh, s) for w, s in zip((w_gate, w_up, w_down), specs))
    quant = (*(scales or ()), *(zeros or ()), *(input_rows or ()))  # [scales (3)[, zeros (3)[, input_rows (3)]]]
    blocks = opts.get("block_size") is not None or zeros is not None
    quant_axes = [expert_scale_axes(n, blocks) for n in EXPERT_AXES] * 2 + list(EXPERT_ROWS_AXES.values())
    quant_specs = tuple(parallel.logical_spec(a, s.shape, mesh, rules) for a, s in zip(quant_axes, quant))
    quant = tuple(match_spec(s, mesh, p) for s, p in zip(quant, quant_specs))

    def body(x, weights, ids, keep, w_gate, w_up, w_down, *quant):
        if experts_axis is not None:  # this device's experts are [first, first + E_local)
            first = jax.lax.axis_index(experts_axis) * w_gate.shape[0]
            ids = ids - first
            keep = keep & (ids >= 0) & (ids < w_gate.shape[0])
        y = expert_mlp(x, weights, ids, keep, w_gate, w_up, w_down, scales=quant[:3] or None,
                       zeros=quant[3:6] or None, input_rows=quant[6:] or None, **opts).astype(x.dtype)
        return jax.lax.psum(y, split)

    rep = jax.sharding.PartitionSpec()
    return jax.shard_map(body, mesh=mesh, in_specs=(rep,) * 4 + tuple(specs) + quant_specs, out_specs=rep,
                         axis_names=set(split), check_vma=False)(x, weights, ids, keep, w_gate, w_up, w_down, *quant)
