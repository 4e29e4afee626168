"""Batch-invariant matmuls on the GPU in one launch: cuBLASLt with one algorithm per weight
shape, or JAX's Mosaic GPU matmul with fixed tiles.

Dims: T rows (tokens), K contracted, N output features.

The engine picks the batch-invariant mode's GEMM at start-up (`choose`, into
ModelConfig.invariant_gemm): PAGEDJAX_BATCH_INVARIANT_MATMUL where set, else cuBLASLt where it
can run (a CUDA GPU with the extension's handler, tensor-parallel size 1; its algorithm by row
count on sm_90), else the row tiles.

"tiles" (`layers.row_tiled`) runs one GEMM per tile of 128 rows (16 on the CPU), so every call
has the same shape and algorithm. Each call reads the whole weight: a 2048-token prefill chunk
reads it 16 times.

"cublaslt": the custom call `pagedjax_invariant_gemm` (xla_kernels/invariant_gemm.cu) runs every
row in one cuBLASLt launch on an algorithm fixed per (K, N) and types: the heuristic's choice for
REFERENCE_ROWS rows, unsplit over K, used at every T (cuBLASLt checks it for each new T; a refusal
is an error). Each output element is then one CTA's sum over K in the same order whatever T is.
Verified on an H100 (tests/test_invariant_matmul.py, tests/test_batch_invariance_gpu.py:
`bash tools/gpu_stage.sh bi-lt`). Weights laid out [N, K] (a tied embedding as the LM head) and
float32 models keep the row tiles.

"cublaslt_m" (the default on sm_90): the same custom call on the algorithm the heuristic picks
for each call's own row count T, unsplit over K, so each step's shape gets a fitting tile. It is
batch-invariant where those algorithms give the same bits as each other: each sums K in one CTA
(split-K and its reductions are switched off here) on tensor-core instructions that add up K in
the same order, whatever its tile shape. Verified on an H100 (`bash tools/gpu_stage.sh bi-lt-m`): for Llama-3-8B's
projections, its LM head and a small odd shape, the algorithms of 1 to 4096 rows agree bit for bit
with the fixed one (`test_gpu_cublaslt_algorithms_by_rows_agree`), and the engine's bi tests pass
on it. Other GPUs keep the fixed algorithm ("cublaslt"), where this was not measured.

"mosaic" (experimental, sm_90 at tensor-parallel size 1, only when asked for): the kernel
(`jax.experimental.pallas.ops.gpu.hopper_matmul_mgpu`) covers all row tiles in one persistent
launch. Its tile shape, K loop and wgmma sequence are fixed per (K, N), with no split-K, so a row's
sums run in the same order whatever T is. The row tiles of one weight column block run side by
side, so the weight is read from HBM about once and the other tiles find it in L2. Shapes it
cannot tile keep the row tiles. Its speed and invariance: `benchmarks/kernels/invariant_matmul.py`
and `tests/test_batch_invariance_gpu.py` (`bash tools/gpu_stage.sh bi-mosaic`).
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

IMPL_ENV = "PAGEDJAX_BATCH_INVARIANT_MATMUL"
IMPLS = ("tiles", "mosaic", "cublaslt", "cublaslt_m")
CUBLASLT = ("cublaslt", "cublaslt_m")  # the custom call's two ways to pick its algorithm
SMEM_BYTES = 227 * 1024  # shared memory a block can use on sm_90
GEMM_TARGET = "pagedjax_invariant_gemm"
REFERENCE_ROWS = 256  # the cuBLASLt algorithm of a weight shape is the heuristic's for this many rows
GEMM_WORKSPACE_BYTES = 32 << 20


# The engine's GEMM where PAGEDJAX_BATCH_INVARIANT_MATMUL is unset, in the order tried: the first
# that can run here (see `unfit`). cuBLASLt at tensor-parallel size 1, its algorithm by row count on
# sm_90, fixed on other CUDA GPUs (tests and the engine's bi tests passed on an H100:
# `bash tools/gpu_stage.sh bi-lt`, `bi-lt-m`); "tiles" runs everywhere.
DEFAULT_ORDER = ("cublaslt_m", "cublaslt", "tiles")


def impl() -> str:
    """The batch-invariant GEMM chosen by PAGEDJAX_BATCH_INVARIANT_MATMUL ("tiles" unless set)."""
    name = os.environ.get(IMPL_ENV, "tiles")
    if name not in IMPLS:
        raise ValueError(f"{IMPL_ENV}={name!r}: expected one of {', '.join(IMPLS)}")
    return name


def unfit(name: str, tensor_parallel_size: int) -> str | None:
    """Why GEMM `name` cannot run here (mosaic: an sm_90 GPU, one device; cublaslt: a CUDA GPU,
    the extension's handler, one device; cublaslt_m: the same on sm_90), or None where it can."""
    if name == "tiles":
        return None
    device = jax.devices()[0]
    capability = getattr(device, "compute_capability", None)
    if name in CUBLASLT:
        from pagedjax.quantization import kernels

        if device.platform != "gpu" or not kernels.has_handler(GEMM_TARGET):
            return (f"{IMPL_ENV}={name} needs a CUDA GPU and the extension's {GEMM_TARGET} handler "
                    f"(built where cublasLt.h is found); this device is {device.device_kind!r} ({device.platform})")
        if name == "cublaslt_m" and capability != "9.0":
            return (f"{IMPL_ENV}=cublaslt_m is verified invariant on Hopper (compute capability 9.0) only; "
                    f"this device is {device.device_kind!r} (capability {capability}): use cublaslt")
    else:
        if device.platform != "gpu" or capability != "9.0":
            return (f"{IMPL_ENV}=mosaic needs a Hopper GPU (compute capability 9.0); this device "
                    f"is {device.device_kind!r} ({device.platform}, capability {capability})")
    if tensor_parallel_size != 1:
        return f"{IMPL_ENV}={name} runs at tensor_parallel_size 1, got {tensor_parallel_size}"
    return None


def check(tensor_parallel_size: int) -> None:
    """A ValueError unless the GEMM PAGEDJAX_BATCH_INVARIANT_MATMUL chooses can run here."""
    reason = unfit(impl(), tensor_parallel_size)
    if reason:
        raise ValueError(reason)


def choose(tensor_parallel_size: int) -> str:
    """The engine's batch-invariant GEMM at this tensor-parallel size: PAGEDJAX_BATCH_INVARIANT_MATMUL
    where set (a ValueError unless it can run here), else the first of DEFAULT_ORDER that can."""
    if IMPL_ENV in os.environ:
        check(tensor_parallel_size)
        return impl()
    return next(name for name in DEFAULT_ORDER if unfit(name, tensor_parallel_size) is None)


@dataclasses.dataclass(frozen=True)
class Tiles:
    """One launch's fixed tiling. Each CTA owns a (2 * tile_m) x tile_n block of the output (two
    warpgroups of tile_m rows) and walks K in steps of tile_k, `stages` of them in flight."""

    tile_m: int = 64
    tile_n: int = 64
    tile_k: int = 64
    stages: int = 4

    @property
    def rows(self) -> int:
        """Rows per CTA: T is padded to a multiple of this."""
        return 2 * self.tile_m

    def smem_bytes(self, itemsize: int) -> int:
        """Shared memory of a CTA: the pipeline's A and B slots plus the epilogue's two slots."""
        pipeline = self.stages * (self.rows * self.tile_k + self.tile_k * self.tile_n) * itemsize
        epilogue = 2 * 2 * 64 * min(64, self.tile_n) * itemsize
        return pipeline + epilogue


def tiles_for(k: int, n: int, dtype=jnp.bfloat16) -> Tiles | None:
    """The tiling for a [T, k] @ [k, n] matmul, fixed per (k, n), never by T; None where the kernel
    does not apply (the caller keeps the row tiles): a float32 model (Hopper's tensor cores would
    round it to tf32), or k or n not a multiple of 64 (Mosaic's 128-byte swizzle: narrower tile_n
    fail to lower). tile_n is 128 for wide outputs (n >= 8192: gate/up, the LM head), 64 below: on
    an H200 (benchmarks/kernels/invariant_matmul.py) 128 ran Llama-3-8B's gate 1.25-1.35x faster
    than 64 at every M, and 64 ran q, k/v and down faster at M <= 256, where decode steps are."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return None
    if n % 64 or k % 64:
        return None
    return Tiles(tile_n=128 if n >= 8192 and n % 128 == 0 else 64)


def _kernel_config(tiles: Tiles):
    from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as mgpu

    return mgpu.TuningConfig(tile_m=tiles.tile_m, tile_n=tiles.tile_n, tile_k=tiles.tile_k,
                             max_concurrent_steps=tiles.stages, epi_tile_m=64, epi_tile_n=min(64, tiles.tile_n),
                             wg_dimension=mgpu.MatmulDimension.M, grid_minor_dim=mgpu.MatmulDimension.M)


def _mosaic_matmul(x: jax.Array, w: jax.Array, tiles: Tiles) -> jax.Array:
    from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as mgpu

    return mgpu.matmul(x, w, None, _kernel_config(tiles))


def matmul(x: jax.Array, w: jax.Array, tiles: Tiles, kernel=_mosaic_matmul) -> jax.Array:
    """x [T, K] @ w [K, N] -> [T, N] on `tiles`, T zero-padded to whole CTA rows."""
    T = x.shape[0]
    padded = -(-T // tiles.rows) * tiles.rows
    y = kernel(jnp.pad(x, [(0, padded - T), (0, 0)]), w, tiles)  # [padded, N]
    return y[:T]


def cublaslt_matmul(x: jax.Array, w: jax.Array, out_dtype=None, reference_rows: int = REFERENCE_ROWS) -> jax.Array:
    """x [T, K] @ w [K, N] -> [T, N] (out_dtype: x's, or float32) through `pagedjax_invariant_gemm`:
    one cuBLASLt algorithm per (K, N), the heuristic's for `reference_rows` rows, so row t of the
    result depends on row t of x and on w alone."""
    if jax.default_backend() == "gpu":  # (lowering alone, for an abstract GPU, needs no handler)
        from pagedjax import _ffi
        from pagedjax.quantization import kernels

        _ffi.require(GEMM_TARGET, "cuda")
        kernels.preload_cublaslt()
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), out_dtype or x.dtype)
    ws = jax.ShapeDtypeStruct((GEMM_WORKSPACE_BYTES,), jnp.uint8)
    y, _ = jax.ffi.ffi_call(GEMM_TARGET, (out, ws))(x, w, reference_rows=np.int32(reference_rows))
    return y


def einsum(eqn: str, x: jax.Array, w: jax.Array, kernel=_mosaic_matmul, method: str = "mosaic") -> jax.Array | None:
    """jnp.einsum(eqn, x, w) through the kernel, for an eqn whose x is rows then contracted dims
    and whose w is those contracted dims then output dims ("td,dnh->tnh", "tnh,nhd->td",
    "se,ev->sv"); None for any other eqn or shape (the caller keeps the row tiles). method:
    "mosaic" (`kernel` on tiles_for's tiles), "cublaslt" (cublaslt_matmul: bf16 or f16 with K
    and N multiples of 8) or "cublaslt_m" (the same, on the algorithm chosen for this call's own
    row count)."""
    inputs, out = eqn.split("->")
    xs, ws = inputs.split(",")
    row, contracted = xs[0], xs[1:]
    if not contracted or ws[: len(contracted)] != contracted or out != row + ws[len(contracted):]:
        return None
    k = math.prod(x.shape[1:])
    out_dims = w.shape[len(contracted):]
    n = math.prod(out_dims)
    if method in CUBLASLT:
        if (jnp.dtype(x.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) or w.dtype != x.dtype
                or k % 8 or n % 8):
            return None
        rows = max(1, x.shape[0]) if method == "cublaslt_m" else REFERENCE_ROWS
        y = cublaslt_matmul(x.reshape(x.shape[0], k), w.reshape(k, n), reference_rows=rows)
        return y.reshape(x.shape[0], *out_dims)
    tiles = tiles_for(k, n, x.dtype)
    if tiles is None or w.dtype != x.dtype:
        return None
    y = matmul(x.reshape(x.shape[0], k), w.reshape(k, n), tiles, kernel)  # [T, N]
    return y.reshape(x.shape[0], *out_dims)
