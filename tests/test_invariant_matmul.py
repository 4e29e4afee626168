"""The batch-invariant mode's one-launch GEMMs (models/invariant_matmul.py): Mosaic and cuBLASLt.

The kernels run on GPUs only; on the CPU the wrapper's views of each model eqn are checked
against numpy with a stand-in 2-D matmul, the tiling of every real architecture's projections
is checked against the Mosaic kernel's limits, and the model's matmul is lowered for an abstract
H200 to show that it reaches each kernel. On a GPU (`gpu` tests): the cuBLASLt GEMM against a
float64 oracle, and each row's bits whatever the number of rows. Speed:
`bash tools/gpu_stage.sh bi-lt` and `bi-mosaic`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import mesh as mesh_lib

from pagedjax.models import invariant_matmul as im
from pagedjax.models.layers import rows_matmul
from pagedjax.models.named import NAMED_CONFIGS
from tests.attention_cases import seed  # noqa: F401  (the seeded-test fixture)

# (eqn, x shape, w shape): every eqn the models send through rows_matmul
EQNS = [
    ("td,dnh->tnh", (5, 128), (128, 4, 16)),  # q/k/v projections
    ("tnh,nhd->td", (5, 4, 16), (4, 16, 128)),  # the attention output projection
    ("td,df->tf", (130, 64), (64, 192)),  # gate/up/fc_in, past one CTA's rows
    ("se,ev->sv", (1, 192), (192, 320)),  # an untied LM head
]


def _int_values(rng, shape):
    """bf16 arrays of -1, 0 and 1: every sum below is an integer under 256, exact in bf16."""
    return jnp.asarray(rng.integers(-1, 2, shape), jnp.bfloat16)


@pytest.mark.parametrize("eqn,x_shape,w_shape", EQNS)
def test_views_match_numpy(eqn, x_shape, w_shape):
    rng = np.random.default_rng(abs(hash(eqn)) % 2**32)
    x, w = _int_values(rng, x_shape), _int_values(rng, w_shape)
    seen = []

    def stand_in(a, b, tiles):  # the kernel's contract: [M, K] @ [K, N], M whole CTAs of rows
        seen.append((a.shape, b.shape, tiles))
        assert a.shape[0] % tiles.rows == 0 and a.shape[1] == b.shape[0]
        assert b.shape[0] % tiles.tile_k == 0 and b.shape[1] % tiles.tile_n == 0
        return jnp.dot(a, b, preferred_element_type=jnp.float32).astype(a.dtype)

    y = im.einsum(eqn, x, w, kernel=stand_in)
    expected = np.einsum(eqn, np.asarray(x, np.float64), np.asarray(w, np.float64))
    assert y.shape == expected.shape and y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y, np.float64), expected)
    assert len(seen) == 1
    # padded rows are zeros and sliced away: the first row alone gives the same first row
    alone = im.einsum(eqn, x[:1], w, kernel=stand_in)
    np.testing.assert_array_equal(np.asarray(alone), np.asarray(y[:1]))


@pytest.mark.parametrize("eqn,x_shape,w_shape,dtype,why", [
    ("se,ve->sv", (3, 64), (128, 64), jnp.bfloat16, "weights laid out [N, K] (a tied head)"),
    ("td,df->tf", (3, 64), (64, 128), jnp.float32, "float32 would be rounded to tf32"),
    ("td,df->tf", (3, 96), (96, 128), jnp.bfloat16, "K not a multiple of 64"),
    ("td,df->tf", (3, 64), (64, 72), jnp.bfloat16, "N not a multiple of 16"),
])
def test_falls_back_to_row_tiles(eqn, x_shape, w_shape, dtype, why):
    def never(*_):
        raise AssertionError(f"the kernel ran: {why}")

    x, w = jnp.ones(x_shape, dtype), jnp.ones(w_shape, dtype)
    assert im.einsum(eqn, x, w, kernel=never) is None, why


def _projections(cfg):
    """(name, K, N) of every matmul of a dense model that goes through rows_matmul."""
    D, H, F = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    shapes = [("q_proj", D, cfg.num_heads * H), ("k_proj", D, cfg.num_kv_heads * H),
              ("o_proj", cfg.num_heads * H, D), ("gate_up", D, F), ("down_proj", F, D)]
    if not cfg.tie_word_embeddings:
        shapes.append(("lm_head", D, cfg.vocab_size))
    return shapes


@pytest.mark.parametrize("name", sorted(n for n, c in NAMED_CONFIGS.items()
                                        if not n.startswith("tiny") and not c.num_experts))
def test_every_projection_of_real_models_is_tiled(name):
    for proj, k, n in _projections(NAMED_CONFIGS[name]):
        tiles = im.tiles_for(k, n)
        assert tiles is not None, (name, proj, k, n)
        assert k % tiles.tile_k == 0 and n % tiles.tile_n == 0
        assert tiles.smem_bytes(2) <= im.SMEM_BYTES, (name, proj, tiles)


def _lower_for_h200(f, *args) -> str:
    """StableHLO of jit(f)(*args) lowered for CUDA on an abstract H200 (no GPU needed)."""
    device = mesh_lib.AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("impl,eqn,w_shape,kernels", [
    ("mosaic", "td,df->tf", (576, 1536), 1),
    ("mosaic", "tnh,nhd->td", (9, 64, 576), 1),
    ("mosaic", "se,ve->sv", (1024, 576), 0),  # a tied head keeps the row tiles
    ("tiles", "td,df->tf", (576, 1536), 0),
    ("cublaslt", "td,df->tf", (576, 1536), 1),
    ("cublaslt", "td,dnh->tnh", (576, 9, 64), 1),
    ("cublaslt", "se,ve->sv", (1024, 576), 0),
    ("cublaslt_m", "td,dnh->tnh", (576, 9, 64), 1),
])
def test_model_matmul_lowers_to_the_kernel(monkeypatch, impl, eqn, w_shape, kernels):
    monkeypatch.setenv(im.IMPL_ENV, impl)
    cfg = NAMED_CONFIGS["smollm2-135m"].replace(batch_invariant=True)
    x_dims = eqn.split(",")[0]
    x_shape = (200,) + tuple(w_shape[eqn.split(",")[1].index(c)] for c in x_dims[1:])
    x = jax.ShapeDtypeStruct(x_shape, jnp.bfloat16)
    w = jax.ShapeDtypeStruct(w_shape, jnp.bfloat16)
    hlo = _lower_for_h200(lambda a, b: rows_matmul(cfg, eqn, a, b), x, w)
    target = "mosaic_gpu" if impl == "mosaic" else im.GEMM_TARGET
    assert hlo.count(f"stablehlo.custom_call @{target}") == kernels
    assert ("stablehlo.dot_general" in hlo) == (kernels == 0)  # the row tiles' cuBLAS dots
    if kernels and impl == "mosaic":  # 200 rows padded to two CTAs of 128
        assert "tensor<256x" in hlo
    if kernels and impl == "cublaslt":  # the 200 rows as they are, in one call
        assert "tensor<256x" not in hlo and f"reference_rows = {im.REFERENCE_ROWS} : i32" in hlo
    if kernels and impl == "cublaslt_m":  # the algorithm of the call's own 200 rows
        assert "tensor<256x" not in hlo and "reference_rows = 200 : i32" in hlo


def test_cublaslt_reference_rows_reach_the_call():
    """cublaslt_matmul(reference_rows=R) asks the handler for the algorithm of R rows (the kernel
    benchmark's `cublaslt@R`); the default is REFERENCE_ROWS."""
    x = jax.ShapeDtypeStruct((200, 576), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((576, 1536), jnp.bfloat16)
    assert "reference_rows = 2048 : i32" in _lower_for_h200(lambda a, b: im.cublaslt_matmul(a, b, reference_rows=2048), x, w)
    assert f"reference_rows = {im.REFERENCE_ROWS} : i32" in _lower_for_h200(im.cublaslt_matmul, x, w)


def test_choice_is_checked(monkeypatch):
    monkeypatch.setenv(im.IMPL_ENV, "cutlass")
    with pytest.raises(ValueError, match=im.IMPL_ENV):
        im.impl()
    monkeypatch.setenv(im.IMPL_ENV, "mosaic")
    with pytest.raises(ValueError, match="Hopper"):  # this machine has no sm_90 GPU
        im.check(1)
    monkeypatch.setenv(im.IMPL_ENV, "cublaslt")
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        im.check(1)
    monkeypatch.delenv(im.IMPL_ENV)
    assert im.impl() == "tiles"
    im.check(4)  # the row tiles run anywhere


def test_engine_chooses_the_gemm_that_runs_here(monkeypatch):
    from pagedjax.config import EngineConfig

    cfg = NAMED_CONFIGS["smollm2-135m"]
    monkeypatch.delenv(im.IMPL_ENV, raising=False)
    assert EngineConfig().model_config(cfg).invariant_gemm is None  # the mode off: nothing chosen
    assert EngineConfig(batch_invariant=True).model_config(cfg).invariant_gemm == "tiles"  # CPU
    # the one-launch GEMMs first, as on a GPU: neither runs on this CPU, so the row tiles
    monkeypatch.setattr(im, "DEFAULT_ORDER", ("cublaslt_m", "cublaslt", "mosaic", "tiles"))
    assert im.choose(1) == "tiles"
    assert "needs a CUDA GPU" in im.unfit("cublaslt_m", 1)
    assert im.unfit("tiles", 2) is None
    monkeypatch.setenv(im.IMPL_ENV, "cublaslt")  # asked for: refused here, not replaced
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        EngineConfig(batch_invariant=True).model_config(cfg)
    monkeypatch.setenv(im.IMPL_ENV, "tiles")
    assert im.choose(4) == "tiles"


def test_the_algorithm_by_row_count_is_the_default_on_hopper_only(monkeypatch):
    """cublaslt_m was verified invariant on sm_90: other CUDA GPUs get the fixed algorithm by default,
    and cublaslt_m asked for by name there is refused."""
    import types

    from pagedjax.quantization import kernels

    monkeypatch.delenv(im.IMPL_ENV, raising=False)
    monkeypatch.setattr(kernels, "has_handler", lambda target: target == im.GEMM_TARGET)
    for capability, default in (("9.0", "cublaslt_m"), ("8.0", "cublaslt"), ("10.0", "cublaslt")):
        gpu = types.SimpleNamespace(platform="gpu", compute_capability=capability, device_kind="a CUDA GPU")
        monkeypatch.setattr(im.jax, "devices", lambda gpu=gpu: [gpu])
        assert im.choose(1) == default, capability
        assert im.choose(2) == "tiles"
        if default == "cublaslt":
            assert "Hopper" in im.unfit("cublaslt_m", 1)
            monkeypatch.setenv(im.IMPL_ENV, "cublaslt_m")
            with pytest.raises(ValueError, match="use cublaslt"):
                im.choose(1)
            monkeypatch.delenv(im.IMPL_ENV)


def test_model_config_choice_wins_over_the_env(monkeypatch):
    monkeypatch.setenv(im.IMPL_ENV, "tiles")
    x = jax.ShapeDtypeStruct((200, 576), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((576, 1536), jnp.bfloat16)
    for gemm, kernels in (("cublaslt", 1), ("tiles", 0), (None, 0)):
        cfg = NAMED_CONFIGS["smollm2-135m"].replace(batch_invariant=True, invariant_gemm=gemm)
        hlo = _lower_for_h200(lambda a, b, cfg=cfg: rows_matmul(cfg, "td,df->tf", a, b), x, w)
        assert hlo.count(f"stablehlo.custom_call @{im.GEMM_TARGET}") == kernels, gemm


# (K, N): Llama-3-8B's q, k/v, gate and down projections, and a small odd one
GPU_SHAPES = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096), (200, 72)]


@pytest.mark.gpu
@pytest.mark.parametrize("k,n", GPU_SHAPES)
@pytest.mark.parametrize("dtype,out_f32", [(jnp.bfloat16, False), (jnp.float16, False), (jnp.bfloat16, True)])
def test_gpu_cublaslt_gemm_rows_are_invariant(seed, k, n, dtype, out_f32):
    """pagedjax_invariant_gemm: within rounding of a float64 oracle, and row by row the same bits
    at every number of rows (1 to 2048, rows drawn at random from one 2048-row input), where
    jnp.dot would switch algorithms with M."""
    rng = np.random.default_rng(seed)
    x_all = jnp.asarray(rng.standard_normal((2048, k)), dtype)
    w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), dtype)

    def gemm(x):
        y = im.cublaslt_matmul(x, w, jnp.float32 if out_f32 else None)
        return np.asarray(y.astype(jnp.float32))

    full = gemm(x_all)
    ref = np.asarray(x_all, np.float64) @ np.asarray(w, np.float64)
    out_eps = 2.0 ** -24 if out_f32 else float(jnp.finfo(dtype).eps)
    # f32 accumulation over K (about sqrt(K) * 2^-24 of the sum's scale) plus the output's rounding
    tol = 4 * np.sqrt(k) * 2.0 ** -24 * np.abs(ref).max() + out_eps * np.abs(ref)
    bad = np.abs(full - ref) > tol
    assert not bad.any(), f"seed={seed}: {bad.sum()} elements off the float64 oracle"
    for m in (1, 3, 16, 100, 128, 255, 256, 257, 1000):
        idx = np.sort(rng.choice(2048, m, replace=False))
        np.testing.assert_array_equal(gemm(x_all[idx]), full[idx], err_msg=f"seed={seed} M={m}: rows changed")



@pytest.mark.gpu
@pytest.mark.parametrize("k,n", GPU_SHAPES + [(4096, 128256)])
def test_gpu_cublaslt_algorithms_by_rows_agree(seed, k, n):
    """The algorithm cuBLASLt's heuristic picks for M rows (unsplit), run at those M rows, gives the
    same bits as the fixed one (REFERENCE_ROWS) on the same rows: the condition under which each
    row count could run its own algorithm and stay batch-invariant."""
    rng = np.random.default_rng(seed)
    x_all = jnp.asarray(rng.standard_normal((4096, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), jnp.bfloat16)
    full = np.asarray(im.cublaslt_matmul(x_all, w).astype(jnp.float32))
    differ = []
    for m in (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024, 2048, 4096):
        idx = np.sort(rng.choice(4096, m, replace=False))
        y = np.asarray(im.cublaslt_matmul(x_all[idx], w, reference_rows=m).astype(jnp.float32))
        if not np.array_equal(y, full[idx]):
            differ.append(m)
    assert not differ, f"seed={seed} K={k} N={n}: the algorithms of M={differ} rows give other bits"
