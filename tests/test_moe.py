"""The MoE block's math (pagedjax/models/moe.py) against a float64 numpy computation.

Random inputs with deliberately uneven routing (one expert gets most tokens, some get none),
every implementation (ragged_dot, the padded capacity layout in one round and in many, the dense
all-experts einsum, the per-assignment gather of expert weights), "auto" at each step size,
padding tokens that must contribute nothing, and the Flax block as the models use it. Seeds are
in the failure messages.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagedjax.models import get_config, moe
from pagedjax.models.config import ModelConfig
from pagedjax.models.layers import SparseMoeBlock

IMPLS = ("ragged", "capacity", "dense", "gather")
TOL = 1e-5  # max |ours - reference| / max |reference| (float32 against float64)


def silu(x):
    return x / (1 + np.exp(-x))


def reference(x, router, wg, wu, wd, k, renormalize, valid=None):
    """The MoE block in float64, one token at a time: HF's router (softmax, top-k, renormalize)."""
    x, router, wg, wu, wd = (np.asarray(a, np.float64) for a in (x, router, wg, wu, wd))
    T = x.shape[0]
    logits = x @ router  # [T, X]
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.zeros_like(x)
    counts = np.zeros(router.shape[1], int)
    for t in range(T if valid is None else valid):
        chosen = np.argsort(-p[t], kind="stable")[:k]
        w = p[t, chosen] / (p[t, chosen].sum() if renormalize else 1.0)
        for e, we in zip(chosen, w):
            out[t] += we * ((silu(x[t] @ wg[e]) * (x[t] @ wu[e])) @ wd[e])
            counts[e] += 1
    return out, counts


def uneven_case(seed: int, T=40, D=32, X=8, F=24):
    """Inputs whose router sends most tokens to expert 0 and none to experts 5-7."""
    rng = np.random.default_rng(seed)
    u = rng.standard_normal(D)
    u /= np.linalg.norm(u)
    x = rng.standard_normal((T, D)) + 3 * u  # a shared direction the router reads
    router = 0.3 * rng.standard_normal((D, X))
    router[:, 0] += 2.0 * u
    router[:, 5:] -= 3.0 * u[:, None]
    wg, wu = rng.standard_normal((X, D, F)) / np.sqrt(D), rng.standard_normal((X, D, F)) / np.sqrt(D)
    wd = rng.standard_normal((X, F, D)) / np.sqrt(F)
    return tuple(a.astype(np.float32) for a in (x, router, wg, wu, wd))


@functools.partial(jax.jit, static_argnames=("k", "renormalize", "impl", "capacity_rows"))
def ours(x, router, wg, wu, wd, num_valid, *, k, renormalize, impl, capacity_rows=None):
    weights, ids = moe.route(x @ router, k, renormalize)
    keep = jnp.broadcast_to((jnp.arange(x.shape[0]) < num_valid)[:, None], ids.shape)
    return moe.expert_mlp(x, weights, ids, keep, wg, wu, wd, activation=jax.nn.silu, impl=impl,
                          capacity_rows=capacity_rows)


def rel_err(got, ref) -> float:
    return float(np.abs(np.asarray(got, np.float64) - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("impl,capacity_rows", [("ragged", None), ("dense", None), ("capacity", None),
                                                ("capacity", 4), ("capacity", 7), ("gather", None)])
@pytest.mark.parametrize("k,renormalize", [(2, True), (3, False)])
@pytest.mark.parametrize("seed", [0, 1])
def test_expert_mlp_matches_float64(impl, capacity_rows, k, renormalize, seed):
    x, router, wg, wu, wd = uneven_case(seed)
    ref, counts = reference(x, router, wg, wu, wd, k, renormalize)
    T = x.shape[0]
    # the routing is as uneven as intended: one expert takes most tokens, some take none
    assert counts.max() >= 0.8 * T and (counts == 0).sum() >= 2, (seed, counts)
    got = ours(x, router, wg, wu, wd, T, k=k, renormalize=renormalize, impl=impl, capacity_rows=capacity_rows)
    assert got.shape == (T, x.shape[1]) and got.dtype == jnp.float32
    err = rel_err(got, ref)
    assert err < TOL, f"seed {seed} impl {impl} C={capacity_rows} k={k}: relative error {err:.2e}"


@pytest.mark.parametrize("impl", IMPLS)
def test_padding_tokens_are_not_routed(impl):
    """Tokens past num_valid give zeros and change nothing for the others (capacity: 3 rounds of 16)."""
    seed = 2
    x, router, wg, wu, wd = uneven_case(seed, T=48)
    ref, _ = reference(x, router, wg, wu, wd, 2, True, valid=30)
    got = np.asarray(ours(x, router, wg, wu, wd, 30, k=2, renormalize=True, impl=impl, capacity_rows=16))
    assert np.all(got[30:] == 0), f"seed {seed} impl {impl}: padding rows are not zero"
    err = rel_err(got[:30], ref[:30])
    assert err < TOL, f"seed {seed} impl {impl}: relative error {err:.2e}"


def test_route_is_hf_softmax_topk_renormalize():
    """Weights are the top-k of the float32 softmax over all logits, renormalized when asked."""
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((16, 8)).astype(np.float32) * 3
    for renormalize in (True, False):
        w, ids = moe.route(jnp.asarray(logits, jnp.bfloat16), 3, renormalize)
        assert w.dtype == jnp.float32 and ids.dtype == jnp.int32
        lg = np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float64)
        p = np.exp(lg - lg.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        want_ids = np.argsort(-p, axis=-1, kind="stable")[:, :3]
        want = np.take_along_axis(p, want_ids, -1)
        if renormalize:
            want /= want.sum(-1, keepdims=True)
        np.testing.assert_array_equal(np.asarray(ids), want_ids)
        np.testing.assert_allclose(np.asarray(w), want, rtol=1e-5)


def test_auto_picks_by_the_step_size():
    """"auto" gathers while T * k * GATHER_RATIO <= E, runs every expert up to DENSE_MAX_TOKENS,
    the capacity layout above, and only that under batch-invariant numerics (the implementation
    may not depend on the step's size)."""
    assert (moe.GATHER_RATIO, moe.DENSE_MAX_TOKENS) == (4, 64)
    assert moe.resolve_impl("auto", 1, 8, 128) == "gather"  # Qwen3-30B-A3B's batch-1 decode step
    assert moe.resolve_impl("auto", 4, 8, 128) == "gather"
    assert moe.resolve_impl("auto", 5, 8, 128) == "dense"
    assert moe.resolve_impl("auto", 64, 8, 128) == "dense"
    assert moe.resolve_impl("auto", 65, 8, 128) == "capacity"
    assert moe.resolve_impl("auto", 1, 2, 8) == "gather"  # Mixtral: one token
    assert moe.resolve_impl("auto", 2, 2, 8) == "dense"
    assert moe.resolve_impl("auto", 2048, 2, 8) == "capacity"
    for T in (1, 16, 2048):
        assert moe.resolve_impl("auto", T, 8, 128, batch_invariant=True) == "capacity"
    assert moe.resolve_impl("auto") == "capacity"
    for impl in IMPLS:
        assert moe.resolve_impl(impl, 1, 8, 128) == impl
    with pytest.raises(ValueError, match="moe_impl"):
        moe.resolve_impl("grouped")


@pytest.mark.parametrize("T", [1, 2, 40, 80])
def test_auto_block_matches_float64(T):
    """The Flax block with moe_impl "auto" at a step that gathers (T = 1: 1 * 2 * 4 <= 8 experts), a
    padded one (T = 2 with one real token), one that runs every expert (T = 40) and one that runs
    the capacity layout (T = 80)."""
    seed = 5
    x, router, wg, wu, wd = uneven_case(seed, T=T)
    cfg = get_config("tiny-mixtral").replace(hidden_size=32, num_experts=8, num_experts_per_tok=2,
                                             moe_intermediate_size=24, moe_impl="auto")
    variables = {"params": {"gate": {"kernel": router}, "experts_gate_proj": wg, "experts_up_proj": wu,
                            "experts_down_proj": wd}}
    valid = 1 if T == 2 else T
    ref, _ = reference(x, router, wg, wu, wd, 2, True, valid=valid)
    got = np.asarray(jax.jit(SparseMoeBlock(cfg).apply)(variables, x, valid))
    assert np.all(got[valid:] == 0), (seed, T)
    assert rel_err(got[:valid], ref[:valid]) < TOL, (seed, T, rel_err(got[:valid], ref[:valid]))


def test_capacity_sizes():
    assert moe.capacity(1, 2, 8) == 1  # never more rows than tokens: one round, no loop
    assert moe.capacity(16, 8, 128) == 16
    assert moe.capacity(40, 8, 128) == 40  # at most T
    assert moe.capacity(100, 8, 128) == 64  # at least MIN_CAPACITY
    assert moe.capacity(256, 8, 128) == 64  # 1.5 x the mean of 16, at least MIN_CAPACITY
    assert moe.capacity(256, 2, 8) == 96  # 1.5 x 64, a multiple of 32
    assert moe.capacity(1024, 8, 128) == 96  # 1.5 x 64
    assert moe.capacity(2048, 8, 128) == 192  # 1.5 x 128
    assert moe.capacity(2048, 2, 8) == 768  # 1.5 x the mean of 512
    assert moe.capacity(8192, 8, 128) == 768
    assert moe.capacity(1000, 2, 8, factor=1.0) == 256  # 250 rounded up to a multiple of 64
    assert moe.capacity(700, 2, 8, factor=1.0) == 192  # 175 rounded up to a multiple of 64


def hot_case(seed: int, T: int, D=16, X=48, F=8):
    """Inputs whose router favours expert 0 (about half the tokens or more) over 47 others, many
    of which still get several tokens."""
    rng = np.random.default_rng(seed)
    u = rng.standard_normal(D)
    u /= np.linalg.norm(u)
    x = rng.standard_normal((T, D)) + 2 * u
    router = rng.standard_normal((D, X))
    router[:, 0] += 4.0 * u
    wg, wu = rng.standard_normal((X, D, F)) / np.sqrt(D), rng.standard_normal((X, D, F)) / np.sqrt(D)
    wd = rng.standard_normal((X, F, D)) / np.sqrt(F)
    return tuple(a.astype(np.float32) for a in (x, router, wg, wu, wd))


@pytest.mark.parametrize("T,k,capacity_rows", [(64, 4, 2), (64, 4, 3), (48, 3, 1), (80, 8, 5)])
def test_capacity_rounds_over_the_hot_experts(T, k, capacity_rows):
    """More experts than an overflow round serves (HOT_EXPERTS), uneven routing and a small C:
    the rounds after the first pick the experts with the most rows left, some many times, others
    (more than HOT_EXPERTS of them over C) in later rounds; every assignment is computed once."""
    x, router, wg, wu, wd = hot_case(T + k, T)
    assert router.shape[1] > moe.HOT_EXPERTS
    ref, counts = reference(x, router, wg, wu, wd, k, True)
    over = counts > capacity_rows
    assert counts.max() >= T // 2 and over.sum() > moe.HOT_EXPERTS, counts  # hot rounds, several sets
    got = ours(x, router, wg, wu, wd, T, k=k, renormalize=True, impl="capacity", capacity_rows=capacity_rows)
    err = rel_err(got, ref)
    assert err < TOL, f"T {T} k {k} C {capacity_rows}: relative error {err:.2e}"
    # a padded step: the last tokens not routed, and the others unchanged
    valid = T - 5
    ref, _ = reference(x, router, wg, wu, wd, k, True, valid=valid)
    got = np.asarray(ours(x, router, wg, wu, wd, valid, k=k, renormalize=True, impl="capacity",
                          capacity_rows=capacity_rows))
    assert np.all(got[valid:] == 0) and rel_err(got[:valid], ref[:valid]) < TOL


def test_block_matches_float64_with_bf16_close():
    """The Flax block (router kernel + stacked expert params) in float32 and bfloat16."""
    seed = 4
    x, router, wg, wu, wd = uneven_case(seed)
    cfg = get_config("tiny-mixtral").replace(hidden_size=32, num_experts=8, num_experts_per_tok=2,
                                             moe_intermediate_size=24)
    variables = {"params": {"gate": {"kernel": router}, "experts_gate_proj": wg, "experts_up_proj": wu,
                            "experts_down_proj": wd}}
    ref, _ = reference(x, router, wg, wu, wd, 2, True)
    block = SparseMoeBlock(cfg)
    shapes = nn.unbox(jax.eval_shape(block.init, jax.random.key(0), x, 40)["params"])
    assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(np.shape, variables["params"])
    for impl in IMPLS:
        blk = SparseMoeBlock(cfg.replace(moe_impl=impl))
        got = jax.jit(blk.apply)(variables, x, 40)
        assert got.dtype == jnp.float32
        assert rel_err(got, ref) < TOL, (seed, impl, rel_err(got, ref))
        bf = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), variables)
        got16 = jax.jit(blk.apply)(bf, jnp.asarray(x, jnp.bfloat16), 40)
        assert got16.dtype == jnp.bfloat16
        assert rel_err(got16, ref) < 3e-2, (seed, impl, rel_err(got16, ref))


def test_moe_options_are_checked():
    cfg = get_config("tiny-mixtral")
    with pytest.raises(ValueError, match="moe_impl"):
        cfg.replace(moe_impl="grouped")
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        cfg.replace(num_experts_per_tok=cfg.num_experts + 1)
    with pytest.raises(ValueError, match="dense_layers"):
        cfg.replace(dense_layers=(5,))
    with pytest.raises(ValueError, match="num_experts=4 is not implemented for llama"):
        ModelConfig(**{**get_config("tiny-llama").__dict__, "num_experts": 4})
    with pytest.raises(ValueError, match="expert_parallel=True is not implemented for llama"):
        get_config("tiny-llama").replace(expert_parallel=True)


@pytest.mark.gpu
@pytest.mark.parametrize("impl,capacity_rows", [("ragged", None), ("dense", None), ("capacity", None),
                                                ("capacity", 4), ("gather", None)])
def test_expert_mlp_on_the_gpu(impl, capacity_rows):
    """The same float64 comparison on the GPU (float32 at the conftest's highest matmul precision),
    and bfloat16 within its rounding."""
    assert jax.default_backend() == "gpu"
    for seed in (0, 1):
        x, router, wg, wu, wd = uneven_case(seed, T=200)
        ref, _ = reference(x, router, wg, wu, wd, 2, True)
        got = ours(x, router, wg, wu, wd, 200, k=2, renormalize=True, impl=impl, capacity_rows=capacity_rows)
        assert rel_err(got, ref) < 1e-4, (seed, impl, rel_err(got, ref))
        bf = [jnp.asarray(a, jnp.bfloat16) for a in (x, router, wg, wu, wd)]
        got16 = ours(*bf, 200, k=2, renormalize=True, impl=impl, capacity_rows=capacity_rows)
        assert rel_err(got16, ref) < 5e-2, (seed, impl, rel_err(got16, ref))


def block_fp8_case(seed: int, D=40, X=8, F=24, block=(16, 16)):
    """e4m3 expert codes [X, in, out] and random block scales [X, KB, NB] (partial blocks at the
    edges: D and F are not multiples of the block), with their float64 dequantized weights."""
    import ml_dtypes

    rng = np.random.default_rng(seed)
    bn, bk = block
    codes, deq = [], []
    for K, N in ((D, F), (D, F), (F, D)):
        c = np.clip(rng.standard_normal((X, K, N)) * 100, -448, 448).astype(ml_dtypes.float8_e4m3fn)
        s = rng.uniform(0.2, 2.0, (X, -(-K // bk), -(-N // bn))) / (100 * np.sqrt(K))
        full = np.repeat(np.repeat(s, bk, axis=1)[:, :K], bn, axis=2)[:, :, :N]
        codes.append((jnp.asarray(c), jnp.asarray(s, jnp.float32)))
        deq.append(c.astype(np.float64) * full.astype(np.float32))
    return codes, deq


@pytest.mark.parametrize("impl,capacity_rows", [("ragged", None), ("dense", None), ("capacity", None),
                                                ("capacity", 4), ("gather", None)])
def test_block_fp8_experts_match_float64(impl, capacity_rows):
    """FP8 experts with per-block scales (as block-FP8 checkpoints hold them) against the float64
    block with the dequantized weights: every implementation, partial edge blocks included."""
    seed = 3
    x, router, *_ = uneven_case(seed, D=40)
    (g, sg), (u, su), (d, sd) = (codes := block_fp8_case(seed))[0]
    ref, _ = reference(x, router, *codes[1], 2, True)

    @jax.jit
    def run(x, router, g, u, d, sg, su, sd):
        weights, ids = moe.route(x @ router, 2, True)
        keep = jnp.ones(ids.shape, bool)
        return moe.expert_mlp(x, weights, ids, keep, g, u, d, activation=jax.nn.silu, impl=impl,
                              capacity_rows=capacity_rows, scales=(sg, su, sd), block_size=(16, 16))

    err = rel_err(run(x, router, g, u, d, sg, su, sd), ref)
    assert err < TOL, f"seed {seed} impl {impl} C={capacity_rows}: relative error {err:.2e}"
    # the block scales matter: one block's scale changed moves the result
    bumped = sg.at[:, 1, 0].multiply(2.0)
    assert rel_err(run(x, router, g, u, d, bumped, su, sd), ref) > 100 * TOL


def test_quantize_experts_fp8_blocks_match_numpy():
    """quantize_experts_fp8 with block_size: each scale its block's amax / 448 (partial blocks
    too), each code the weight over its block's scale rounded to nearest even on the e4m3 grid."""
    from pagedjax.quantization.fp8 import quantize_experts_fp8
    from tests.quant_oracle import check_e4m3_codes

    rng = np.random.default_rng(11)
    E, K, N, (bn, bk) = 3, 40, 24, (16, 8)
    w = rng.standard_normal((E, K, N)) * rng.uniform(0.01, 3.0, (E, 1, N))
    q, s = quantize_experts_fp8(jnp.asarray(w, jnp.float32), (bn, bk))
    KB, NB = -(-K // bk), -(-N // bn)
    assert q.dtype == jnp.float8_e4m3fn and q.shape == (E, K, N) and s.shape == (E, KB, NB)
    w32 = w.astype(np.float32).astype(np.float64)
    want = np.zeros((E, KB, NB))
    for kb in range(KB):
        for nb in range(NB):
            want[:, kb, nb] = np.abs(w32[:, kb * bk:(kb + 1) * bk, nb * bn:(nb + 1) * bn]).max(axis=(1, 2)) / 448
    np.testing.assert_allclose(np.asarray(s), want, rtol=1e-6)
    full = np.repeat(np.repeat(np.asarray(s, np.float64), bk, axis=1)[:, :K], bn, axis=2)[:, :, :N]
    check_e4m3_codes(np.asarray(q), w32 / full, "expert block codes")


def int4_case(seed: int, D=64, X=8, F=32, group=16):
    """uint4 expert codes [X, in, out], zero points in [0, 16] (GPTQ v1's 15 + 1 included) and f16
    scales [X, G, out] per group of `group` input rows, with their float64 dequantized weights."""
    rng = np.random.default_rng(seed)
    experts, deq = [], []
    for K, N in ((D, F), (D, F), (F, D)):
        G = K // group
        q = rng.integers(0, 16, (X, K, N), dtype=np.uint8)
        z = rng.integers(0, 17, (X, G, N), dtype=np.uint8)
        s = (rng.uniform(0.5, 1.5, (X, G, N)) / (4 * np.sqrt(K))).astype(np.float16)
        rows = np.arange(K) // group  # the group of each input row
        deq.append((q.astype(np.float64) - z[:, rows].astype(np.float64)) * s[:, rows].astype(np.float64))
        experts.append((jnp.asarray(q, jnp.uint4), jnp.asarray(z), jnp.asarray(s)))
    return experts, deq


@pytest.mark.parametrize("impl,capacity_rows", [("ragged", None), ("dense", None), ("capacity", None),
                                                ("capacity", 4), ("gather", None), ("auto", None)])
def test_int4_experts_match_float64(impl, capacity_rows):
    """int4 experts (uint4 codes, zeros and scales per group, as AWQ / GPTQ checkpoints hold them)
    against the float64 block with the dequantized weights, every implementation."""
    seed = 6
    x, router, *_ = uneven_case(seed, T=40, D=64)
    experts, deq = int4_case(seed)
    ref, _ = reference(x, router, *deq, 2, True)

    @jax.jit
    def run(x, router, experts):
        (g, zg, sg), (u, zu, su), (d, zd, sd) = experts
        weights, ids = moe.route(x @ router, 2, True)
        keep = jnp.ones(ids.shape, bool)
        return moe.expert_mlp(x, weights, ids, keep, g, u, d, activation=jax.nn.silu, impl=impl,
                              capacity_rows=capacity_rows, scales=(sg, su, sd), zeros=(zg, zu, zd))

    err = rel_err(run(x, router, experts), ref)
    assert err < TOL, f"seed {seed} impl {impl} C={capacity_rows}: relative error {err:.2e}"
    # each group's zero and scale matter: one of down_proj's groups moved moves the result
    (g, u, (d, zd, sd)) = experts
    assert rel_err(run(x, router, (g, u, (d, zd.at[:, 1, :].add(1), sd))), ref) > 100 * TOL
    assert rel_err(run(x, router, (g, u, (d, zd, sd.at[:, 1, :].multiply(2)))), ref) > 100 * TOL


def act_order_case(seed: int, deq):
    """Act order: each expert's stored (group-sorted) rows in a random order of its own. rows
    [X, K] int32 (input row i of expert e is stored row rows[e, i]) and the float64 weights
    [X, K, N] in input order, for each of deq's projections."""
    rng = np.random.default_rng(seed)
    rows, weights = [], []
    for w in deq:
        X, K, _ = w.shape
        p = np.stack([rng.permutation(K) for _ in range(X)]).astype(np.int32)  # [X, K]
        u, r = np.empty_like(w), np.empty_like(p)
        for e in range(X):
            u[e, p[e]] = w[e]  # stored row j is input row p[e, j]
            r[e, p[e]] = np.arange(K)
        rows.append(jnp.asarray(r))
        weights.append(u)
    return rows, weights


@pytest.mark.parametrize("impl,capacity_rows", [("ragged", None), ("dense", None), ("capacity", None),
                                                ("capacity", 4), ("gather", None)])
def test_act_order_int4_experts_match_float64(impl, capacity_rows):
    """Act-order int4 experts (GPTQ desc_act: codes with their rows sorted by group, and each
    expert's permutation) against the float64 block with the weights in input order."""
    seed = 9
    x, router, *_ = uneven_case(seed, T=40, D=64)
    experts, deq = int4_case(seed)
    rows, deq = act_order_case(seed, deq)
    ref, _ = reference(x, router, *deq, 2, True)

    @jax.jit
    def run(x, router, rows):
        (g, zg, sg), (u, zu, su), (d, zd, sd) = experts
        weights, ids = moe.route(x @ router, 2, True)
        return moe.expert_mlp(x, weights, ids, jnp.ones(ids.shape, bool), g, u, d, activation=jax.nn.silu,
                              impl=impl, capacity_rows=capacity_rows, scales=(sg, su, sd), zeros=(zg, zu, zd),
                              input_rows=tuple(rows))

    err = rel_err(run(x, router, rows), ref)
    assert err < TOL, f"seed {seed} impl {impl} C={capacity_rows}: relative error {err:.2e}"
    # each projection's row order matters: the stored order read as the input order is far off
    for i in range(3):
        identity = [jnp.broadcast_to(jnp.arange(r.shape[1], dtype=jnp.int32), r.shape) if j == i else r
                    for j, r in enumerate(rows)]
        assert rel_err(run(x, router, identity), ref) > 100 * TOL, i


def test_int4_experts_gather_a_decode_step():
    """A decode-sized step ("auto" gathers: 1 token x 2 experts x 4 <= 8) with int4 experts in
    bfloat16, against float64."""
    x, router, *_ = uneven_case(8, T=1, D=64)
    experts, deq = int4_case(8)
    assert moe.resolve_impl("auto", 1, 2, 8) == "gather"
    ref, _ = reference(x, router, *deq, 2, True)
    (g, zg, sg), (u, zu, su), (d, zd, sd) = experts
    xb = jnp.asarray(x, jnp.bfloat16)
    weights, ids = moe.route(xb @ jnp.asarray(router, jnp.bfloat16), 2, True)
    got = moe.expert_mlp(xb, weights, ids, jnp.ones(ids.shape, bool), g, u, d, activation=jax.nn.silu,
                         impl="auto", scales=(sg, su, sd), zeros=(zg, zu, zd))
    assert rel_err(got, ref) < 3e-2, rel_err(got, ref)


def test_moe_steps_put_loops_in_command_buffers(monkeypatch):
    """On the GPU an MoE model's steps compile with loops and conditionals in XLA's command buffers
    (the capacity rounds' trip count is then not read back by the host), unless turned off or set by
    XLA_FLAGS; dense models (unless asked for with "all") and the CPU keep XLA's defaults;
    batch-invariant options are kept; a bad value is refused. The
    option string is one XLA accepts (compiled here, on any backend)."""
    from pagedjax import model_runner as mr

    monkeypatch.delenv(mr.LOOP_COMMAND_BUFFERS_ENV, raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_command_buffer_update_mode=SKIP_TEMP")
    opts = mr.step_compiler_options(True, False, "gpu")
    assert opts == {"xla_gpu_enable_command_buffer": mr.LOOP_COMMAND_BUFFERS}
    assert {"WHILE", "CONDITIONAL"} <= set(mr.LOOP_COMMAND_BUFFERS.split(","))
    assert mr.step_compiler_options(False, False, "gpu") is None
    assert mr.step_compiler_options(True, False, "cpu") is None
    both = mr.step_compiler_options(True, True, "gpu")
    assert both["xla_gpu_deterministic_ops"] and both["xla_gpu_enable_command_buffer"] == mr.LOOP_COMMAND_BUFFERS
    monkeypatch.setenv(mr.LOOP_COMMAND_BUFFERS_ENV, "0")
    assert mr.step_compiler_options(True, False, "gpu") is None
    monkeypatch.setenv(mr.LOOP_COMMAND_BUFFERS_ENV, "all")  # every model's steps, the bi options kept
    assert mr.step_compiler_options(False, False, "gpu") == {"xla_gpu_enable_command_buffer": mr.LOOP_COMMAND_BUFFERS}
    dense_bi = mr.step_compiler_options(False, True, "gpu")
    assert dense_bi["xla_gpu_autotune_level"] == 0 and dense_bi["xla_gpu_enable_command_buffer"] == mr.LOOP_COMMAND_BUFFERS
    assert mr.step_compiler_options(False, True, "cpu") is None
    monkeypatch.setenv(mr.LOOP_COMMAND_BUFFERS_ENV, "yes")
    with pytest.raises(ValueError, match=mr.LOOP_COMMAND_BUFFERS_ENV):
        mr.step_compiler_options(True, False, "gpu")
    monkeypatch.delenv(mr.LOOP_COMMAND_BUFFERS_ENV)
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_command_buffer=FUSION")
    assert mr.step_compiler_options(True, False, "gpu") is None

    def rounds(x):
        return jax.lax.while_loop(lambda c: c[0] < c[1].sum(), lambda c: (c[0] + 1, c[1]), (0, x))[0]

    compiled = jax.jit(rounds).lower(jnp.ones(3)).compile(opts)
    assert int(compiled(jnp.ones(3))) == 3
    with pytest.raises(Exception, match="not a valid enum value"):
        jax.jit(rounds).lower(jnp.ones(3)).compile({"xla_gpu_enable_command_buffer": "FUSION,LOOPS"})
