"""The model runner: owns the device state and runs one jitted step per engine step.

The scheduler's rows (`ScheduledRequest`s) come in, go down to the device once as padded arrays
(`prepare`), and the step -- the model with the pool donated, then on-device sampling -- sends
back only the sampled token ids (and logprobs when asked). Async scheduling's device half lives
here: a row whose last token is pending (-1, sampled by the step still in flight) reads it on
the device from that step's `Launched.next_tokens`.

A step with constrained rows (structured outputs, allowed_token_ids) is launched in two halves:
`launch(..., sample=False)` sends the model, and `sample(launched, token_bitmask)` the sampling
once the host has built the rows' bitmask -- which may need the previous step's tokens: the
host builds it while the device runs the model.

Dims: T tokens (padded to a bucket), R requests (padded: R = min(T, max_num_seqs)),
M max pages per request, P pages, C copy-on-write (or swapped) page copies, V vocab,
L layers, S host page slots, B page size, K kv heads, H head dim, W = ceil(V / 32).
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import os
import pathlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pagedjax import parallel, prompt_logprobs, sampler
from pagedjax.compile_cache import compile_cache_dir, executable_cache
from pagedjax.attention import AttentionMetadata, resolve_impl
from pagedjax.config import EngineConfig
from pagedjax.kv_cache import kv_dtype, page_pool, pool_ops
from pagedjax.models import get_model, head_logits
from pagedjax.params import Params
from pagedjax.sampling_metadata import make_sampling_metadata, static_flags
from pagedjax.scheduler import ScheduledRequest

logger = logging.getLogger("pagedjax")


@dataclass
class StepOutput:
    """What comes back to the host: one row per scheduled request (rows with sample=False are junk)."""

    token_ids: np.ndarray  # [R] int32
    logprobs: np.ndarray | None = None  # [R] f32, raw logprob of the sampled token
    top_logprobs: np.ndarray | None = None  # [R, k]
    top_token_ids: np.ndarray | None = None  # [R, k]
    ranks: np.ndarray | None = None  # [R]
    prompt_logprobs: prompt_logprobs.ScoredPrompts | None = None  # steps that scored prompt tokens


@dataclass
class Launched:
    """A step sent to the device and not read back yet (device arrays, host bookkeeping)."""

    out: Any  # SamplerOutput; None until sample() for a step launched with sample=False
    next_tokens: jax.Array | None  # [max_num_seqs] this step's sampled tokens, by row: the next step's prev_tokens
    scored: Any  # the prompt-logprob rows, or None
    spans: Any  # prompt_logprobs.Span list, or None
    rows: dict[str, int]  # request id -> its row: where the next step finds a pending token
    num_logprobs: int
    num_padded_rows: int = 0  # R: the bucket's rows (a bitmask has this many)
    pending_sample: Any = None  # (logits, sampling buffer, layout, flags) until sample()

    @property
    def num_rows(self) -> int:
        return len(self.rows)


def token_buckets(hi: int, factor: int = 4) -> list[int]:
    """1, 4, 16, ... below hi, and hi itself: few compiles, single-request decode unpadded."""
    out, b = [], 1
    while b < hi:
        out.append(b)
        b *= factor
    return out + [hi]


def fine_token_buckets(hi: int) -> list[int]:
    """token_buckets(hi) up to 256; above, 2^k and 1.5 * 2^k (384, 512, 768, 1024, 1536, ...) and
    hi: a step of more than 256 tokens, compute-bound, is padded by less than 1.5x rather than 4x
    (benchmarks/bucket_waste.py: W1's steps over 256 tokens carry 1.66x their tokens on the x4 grid)."""
    out, b = [t for t in token_buckets(min(hi, 256)) if t < hi], 256
    while b < hi:
        out += [t for t in (b, b * 3 // 2) if t < hi and t not in out]
        b *= 2
    return out + [hi]


# The smallest preset bucket on a GPU. XLA's GPU compiler rewrites a matmul of one row by a weight
# of fewer than 10M elements as a multiply and a reduction (its dot strength reduction: a one-row
# operand is a vector once its unit dim is dropped). Llama-3-8B's K and V projections at one token
# then wrote [4096, 8, 128] products and reduced them: 30 us a layer, 0.96 ms of a 5.9 ms batch-1
# step on the H200 (benchmarks/RESULTS.md), where a GEMM reads the 16 MB in 4 us. Two rows are a
# matrix, which stays a GEMM, and cost a memory-bound step nothing more.
GPU_SMALLEST_BUCKET = 2


def resolve_token_buckets(spec: str | Sequence[int], hi: int, smallest: int = 1) -> list[int]:
    """EngineConfig.token_buckets for a budget of hi tokens a step: the padded step sizes.
    `smallest`: the presets' first bucket (1 on the CPU, GPU_SMALLEST_BUCKET on a GPU); an
    explicit list is taken as it is."""
    if spec in ("coarse", "fine"):
        out = token_buckets(hi) if spec == "coarse" else fine_token_buckets(hi)
        return sorted({min(max(t, smallest), hi) for t in out})
    return [t for t in spec if t < hi] + [hi]


def pack(tree: Any) -> tuple[np.ndarray, Any]:
    """A pytree of 4-byte numpy arrays -> one int32 buffer and its (static, hashable) layout.

    A step's inputs go down as one transfer: as a tree of ~20 small arrays they took 1.2-1.7 ms
    of host time per step on the H100 (benchmarks/profile_step.py).
    """
    leaves, treedef = jax.tree.flatten(tree)
    parts, layout, offset = [], [], 0
    for x in leaves:
        x = np.asarray(x)  # (np.ascontiguousarray would make a 0-d array 1-d)
        if x.dtype.itemsize != 4:
            raise TypeError(f"pack takes 4-byte dtypes, got {x.dtype}")
        parts.append(np.ascontiguousarray(x.reshape(-1)).view(np.int32))
        layout.append((offset, x.shape, x.dtype.str))
        offset += x.size
    buf = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    return buf, (treedef, tuple(layout))


def unpack(buf: jax.Array, layout: Any) -> Any:
    """The inverse of `pack`, inside jit: static slices of `buf`, bitcast back."""
    treedef, leaves = layout
    out = []
    for offset, shape, dtype in leaves:
        x = jax.lax.slice(buf, (offset,), (offset + math.prod(shape),)).reshape(shape)
        if jnp.dtype(dtype) != jnp.int32:
            x = jax.lax.bitcast_convert_type(x, jnp.dtype(dtype))
        out.append(x)
    return jax.tree.unflatten(treedef, out)


def stage_inputs(buf: jax.Array) -> jax.Array:
    """A copy of the step's packed inputs made by one kernel, for every other kernel to read.

    `buf`'s last entry is a 0 from the host (`_step_inputs`); XLA cannot know that, so the add
    stays a kernel, and the optimization barrier keeps it from being fused into the consumers. The
    copy lives in the step's temporary buffer, whose address XLA's SKIP_TEMP command buffers keep:
    when the next step's inputs arrive at another address, XLA re-records only the commands that
    read the step's parameters, rather than each one that reads an input (the positions, slots and
    page tables of every layer).
    """
    return jax.lax.optimization_barrier(buf + buf[-1])


def _step_fn(config, attn_impl, variables, pages, buf, prev_tokens, logits_slot=None, *, layout, mesh=None,
             num_prompt_logprobs=0, staged=False):
    """The model's part of an engine step on device: logits [R, V] of each request (pool in, pool out).

    `buf` holds the step's inputs (`pack`ed): tokens [T], src_rows [T], the attention metadata
    and the prompt-logprob rows. A token whose src_row is >= 0 is the previous step's sampled
    token of that row, read from `prev_tokens` [max_num_seqs] on device (async scheduling).
    With a tensor-parallel `mesh` the model traces under it (the ambient mesh a custom call's
    shard_map uses), the logits are gathered once for sampling and the pool stays split.
    Steps that score prompt tokens (a variant of their own: static num_prompt_logprobs > 0)
    have the model sow every token's head input and return the scored rows as a third output
    (pagedjax/prompt_logprobs.py); the others return None there. `staged`: the inputs are read
    through `stage_inputs` (the default; PAGEDJAX_STAGED_INPUTS=0 turns it off).

    `logits_slot` [R, V] f32 (donated; its contents are never read): the logits are written into
    it. XLA then aliases the logits with a parameter, whose allocation no other value may share.
    Without it the logits are an output allocation of their own, fresh at every call, and XLA's
    buffer assignment packs the step's earlier temporaries into it (it is the largest buffer
    defined last): nearly every kernel of the step then reads or writes memory that moves at
    each call, and XLA re-records those commands of the step's CUDA graph before each launch.
    """
    if staged:
        buf = stage_inputs(buf)
    tokens, src_rows, meta, prompt_meta = unpack(buf, layout)
    tokens = jnp.where(src_rows >= 0, prev_tokens[jnp.maximum(src_rows, 0)], tokens)
    model = get_model(config, attn_impl=attn_impl)
    scored = None
    with parallel.use_mesh(mesh):
        if prompt_meta is None:
            logits, pages = model.apply(variables, tokens, pages, meta)  # [R, V]
        else:
            (logits, pages), sown = model.apply(variables, tokens, pages, meta, all_hidden=True,
                                                mutable=["intermediates"])
            hidden = sown["intermediates"]["head_input"][0]  # [T, E]
            with jax.named_scope("prompt_logprobs"):
                scored = prompt_logprobs.compute(lambda x: head_logits(config, variables, x), hidden,
                                                 prompt_meta, num_logprobs=num_prompt_logprobs)
        logits, pages = parallel.constrain_step(logits, pages, mesh)
    if logits_slot is not None:  # a full overwrite: XLA writes the logits in the slot's memory
        logits = jax.lax.dynamic_update_slice(logits_slot, logits, (0, 0))
    return logits, scored, pages


# One jit for every runner: engines of the same model share compiled steps. The pool is donated,
# so XLA updates it in place; so is the logits slot, which the logits overwrite.
_step = jax.jit(_step_fn, static_argnums=(0, 1), donate_argnums=(3, 6),
                static_argnames=("layout", "mesh", "num_prompt_logprobs", "staged"))


@functools.partial(jax.jit, static_argnames=("layout", "num_logprobs", "flags", "num_slots"))
def _sample(logits, buf, token_bitmask=None, *, layout, num_logprobs, flags, num_slots):
    """Sampling, a call of its own: its variants (flags, logprobs, penalty widths) compile in
    well under a second, where a variant of the whole step would recompile the model.
    `token_bitmask` is [R, W] i32 with flags.bitmask, else None (a variant without it).
    Also returns the sampled tokens padded to [num_slots] = max_num_seqs: the next step's
    `prev_tokens`, one shape for every bucket."""
    out = sampler.sample(logits, unpack(buf, layout), num_logprobs=num_logprobs, flags=flags,
                         token_bitmask=token_bitmask)
    next_tokens = jnp.zeros((num_slots,), jnp.int32).at[: out.token_ids.shape[0]].set(out.token_ids)
    return out, next_tokens


def cuda_mem_info() -> tuple[int, int] | None:
    """(free, total) bytes of the current CUDA device, from the CUDA runtime's cudaMemGetInfo
    (the nvidia-cuda-runtime wheel JAX's CUDA plugin installs, else the system's); None without one."""
    import ctypes
    import importlib.util

    names = []
    spec = importlib.util.find_spec("nvidia.cuda_runtime") if importlib.util.find_spec("nvidia") else None
    for folder in (spec and spec.submodule_search_locations) or []:
        names += sorted(str(p) for p in pathlib.Path(folder, "lib").glob("libcudart.so*"))
    for name in [*names, "libcudart.so.13", "libcudart.so.12", "libcudart.so"]:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        if lib.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)) == 0:
            return free.value, total.value
    return None


ALTERNATE_STEPS_ENV = "PAGEDJAX_ALTERNATE_STEPS"
COMPILE_WORKERS_ENV = "PAGEDJAX_COMPILE_WORKERS"
# An MoE model's steps on the GPU put loops and conditionals in XLA's command buffers (CUDA graphs
# with device-side control flow): the capacity layout's rounds loop otherwise has its trip count
# read back by the host at every MoE layer, which holds the host inside the step call until the
# device gets there (Qwen3-30B-A3B, FP8 experts, decode at batch 256 on an H100: engine step 35.5
# -> 31.4 ms, benchmarks/RESULTS.md). PAGEDJAX_LOOP_COMMAND_BUFFERS=0 keeps XLA's default kinds,
# =all puts them in every model's steps (to measure: e.g. the batch-invariant mode's norm-tile
# loops); an XLA_FLAGS that sets the kinds itself wins.
LOOP_COMMAND_BUFFERS_ENV = "PAGEDJAX_LOOP_COMMAND_BUFFERS"
LOOP_COMMAND_BUFFERS = "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"


def step_compiler_options(is_moe: bool, batch_invariant: bool, backend: str) -> dict[str, Any] | None:
    """XLA options of the step programs' compiles (None: XLA_FLAGS and XLA's defaults).

    Batch-invariant steps on the GPU: every GEMM through cuBLAS(Lt) with its heuristic's algorithm
    for the shape (XLA neither autotunes, which may pick differently in two compiles of the same
    tile shape, nor builds Triton GEMMs whose tiling follows the fusion), and no atomics (XLA's
    run-to-run deterministic mode). MoE steps on the GPU (every step's with
    PAGEDJAX_LOOP_COMMAND_BUFFERS=all): LOOP_COMMAND_BUFFERS."""
    if backend != "gpu":
        return None
    options: dict[str, Any] = {}
    if batch_invariant:
        options.update({"xla_gpu_enable_triton_gemm": False, "xla_gpu_autotune_level": 0,
                        "xla_gpu_deterministic_ops": True, "xla_gpu_exclude_nondeterministic_ops": True})
    loops = os.environ.get(LOOP_COMMAND_BUFFERS_ENV, "1")
    if loops not in ("0", "1", "all"):
        raise ValueError(f"{LOOP_COMMAND_BUFFERS_ENV}={loops!r}: expected 0, 1 (MoE models' steps) or all")
    if (((is_moe and loops == "1") or loops == "all")
            and "xla_gpu_enable_command_buffer" not in os.environ.get("XLA_FLAGS", "")):
        options["xla_gpu_enable_command_buffer"] = LOOP_COMMAND_BUFFERS
    return options or None


def compile_workers() -> int:
    """How many programs precompile gets at once: PAGEDJAX_COMPILE_WORKERS, else on the CPU the
    CPUs this process may use, at most 8 (each compile holds its own memory), and on a GPU 1: XLA
    times GEMM candidates on the device while it compiles, and two compiles timing at once would
    skew each other's choice (a speed-up there is for PAGEDJAX_COMPILE_WORKERS to measure)."""
    text = os.environ.get(COMPILE_WORKERS_ENV, "")
    if text:
        try:
            n = int(text)
        except ValueError:
            raise ValueError(f"{COMPILE_WORKERS_ENV} must be a positive integer, got {text!r}") from None
        if n < 1:
            raise ValueError(f"{COMPILE_WORKERS_ENV} must be a positive integer, got {text!r}")
        return n
    if jax.default_backend() != "cpu":
        return 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus))


def _compile_pool(jobs: int):
    """A thread pool for compiling `jobs` programs (`compile_workers()` threads at most)."""
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=max(1, min(jobs, compile_workers())), thread_name_prefix="pagedjax-compile")


STAGED_INPUTS_ENV = "PAGEDJAX_STAGED_INPUTS"
LOGITS_SLOT_ENV = "PAGEDJAX_LOGITS_SLOT"


def device_bytes_in_use(device) -> int:
    """Bytes of this process's live arrays on `device` (their shards there): what it holds when its
    allocator reports no figures, unlike cudaMemGetInfo's, which counts every process on the GPU."""
    used = 0
    for array in jax.live_arrays():  # (a shard's .data would be one more live array)
        if device in array.sharding.device_set:
            used += math.prod(array.sharding.shard_shape(array.shape)) * array.dtype.itemsize
    return used


# Memory this process holds on a GPU outside its arrays (the CUDA context, library workspaces): the
# share of cudaMemGetInfo's use taken as its own at most, beyond its arrays, when sizing the pool.
OWN_OVERHEAD_BYTES = 2**30


def client_memory_fraction() -> float:
    """The share of a GPU that JAX's client may take: XLA_PYTHON_CLIENT_MEM_FRACTION (JAX's
    default 0.75), or all of it under XLA_PYTHON_CLIENT_ALLOCATOR=platform."""
    if os.environ.get("XLA_PYTHON_CLIENT_ALLOCATOR", "").lower() == "platform":
        return 1.0
    text = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "")
    try:
        fraction = float(text) if text else 0.75
    except ValueError:
        return 0.75
    return fraction if 0.0 < fraction <= 1.0 else 0.75


class ModelRunner:
    """Owns params, the page pool and the compiled steps; `launch` sends a step, `fetch` reads it back.

    Options are EngineConfig's (`ModelRunner(params, max_model_len=..., num_pages=...)`, or a
    `config`); `mesh` splits the model over devices (tensor parallelism).
    """

    def __init__(self, params: Params, config: EngineConfig | None = None, *,
                 mesh: jax.sharding.Mesh | None = None, **options: Any):
        if config is not None and options:
            raise ValueError(f"ModelRunner: pass a config or options, not both (got {sorted(options)})")
        # Compiled steps are kept whole (tracing and lowering skipped too); XLA's own persistent
        # cache is left off: re-serializing an executable it loaded loses code on the CPU backend.
        self.executables = executable_cache(compile_cache_dir())
        self._executables: dict[tuple, Any] = {}  # this runner's, by its static key (see _compiled)
        # tensor parallel: params placed by parallel's rules (kv heads replicated when K < tp),
        # the pool split on kv heads, every step input replicated on the mesh
        self.mesh = mesh if parallel.tp_size(mesh) > 1 else None
        self.input_sharding = None if self.mesh is None else parallel.replicated(self.mesh)
        self.options = opts = (config or EngineConfig(**options)).resolve(params)
        params = Params(params.variables, opts.model_config(params.config), params.tokenizer)  # MoE options
        if self.mesh is not None:
            params = parallel.shard_params(params, self.mesh)
        self.params = params
        self.config = cfg = params.config
        self.page_size = opts.page_size
        self.max_model_len = opts.max_model_len
        self.max_num_seqs = opts.max_num_seqs
        self.max_num_batched_tokens = opts.max_num_batched_tokens
        self.max_pages_per_req = math.ceil(opts.max_model_len / opts.page_size)  # M
        self.token_buckets = resolve_token_buckets(opts.token_buckets, opts.max_num_batched_tokens,
                                                   GPU_SMALLEST_BUCKET if jax.default_backend() == "gpu" else 1)
        self.kv_dtype = kv_dtype.resolve_kv_cache_dtype(opts.kv_cache_dtype, params.dtype)
        self.attn_impl = opts.attn_impl
        # attn_impl="ffi" where the custom call cannot run: a ValueError here, not a failed step
        resolve_impl(opts.attn_impl, head_dim=cfg.head_dim, kv_dtype=self.kv_dtype)
        self.step_compiler_options = step_compiler_options(params.config.num_experts > 0, opts.batch_invariant,
                                                           jax.default_backend())
        # Experimental (PAGEDJAX_ALTERNATE_STEPS=1): successive steps alternate between two loaded
        # instances of each step program, so that preparing one's CUDA graph for a launch (XLA's
        # command-buffer update) need not wait for the other's run still in flight.
        self.step_copies = 2 if os.environ.get(ALTERNATE_STEPS_ENV, "") == "1" else 1
        self._step_launches = 0
        # The step reads its inputs from a copy made by its first kernel (stage_inputs), so that a
        # new step's input buffer touches one command of the step's CUDA graph: with the logits
        # slot, what XLA re-records before a launch at batch 256 fell from 69 commands (1.84 ms a
        # step, H100) to one (0.07 ms, H200; benchmarks/RESULTS.md). PAGEDJAX_STAGED_INPUTS=0
        # turns it off.
        self.staged_inputs = os.environ.get(STAGED_INPUTS_ENV, "1") != "0"
        # The step writes its logits into a donated slot (see _step_fn): the last step's logits
        # of the same rows, once its sampler is launched, else new zeros. PAGEDJAX_LOGITS_SLOT=0
        # turns it off (the logits then get an allocation of their own at every step).
        self.logits_slots = os.environ.get(LOGITS_SLOT_ENV, "1") != "0"
        self._free_slots: dict[int, jax.Array] = {}  # R -> logits [R, V] whose sampler was launched
        # On accelerators the sampled tokens start their copy to the host as soon as the sampler
        # ends (vLLM's non-blocking copy), not when fetch asks; a CPU's arrays are in host memory.
        self._copy_ahead = jax.default_backend() != "cpu"
        self._rng = np.random.default_rng(opts.seed)
        self._no_prev = jax.device_put(np.zeros(self.max_num_seqs, np.int32), self.input_sharding)
        self.num_pages = num_pages = opts.num_pages or self._auto_num_pages()
        if num_pages < 2:
            raise ValueError(f"the KV cache needs at least 2 pages, got {num_pages}: lower "
                             "max_model_len or max_num_batched_tokens, or give it more memory")
        self.host_pages: np.ndarray | None = None  # [S, L, 2, B, K, H]: init_swap_space()
        self.pages = page_pool.init_pages(cfg.num_layers, num_pages, self.page_size, cfg.num_kv_heads,
                                          cfg.head_dim, self.kv_dtype,
                                          sharding=self.mesh and parallel.pool_sharding(cfg, self.mesh))
        logger.info("KV cache: %d pages of %d tokens = %d tokens, %.1f MiB (%s, %d bytes a token)", num_pages - 1,
                    self.page_size, (num_pages - 1) * self.page_size, page_pool.pages_bytes(self.pages) / 2**20,
                    self.kv_dtype.name, self.page_bytes() // self.page_size)
        calibrated = cfg.quantization is not None and cfg.quantization.kv_cache_scheme is not None
        if kv_dtype.is_fp8(self.kv_dtype):
            ratio = params.dtype.itemsize // self.kv_dtype.itemsize
            logger.info("KV cache in fp8 (e4m3, %s): the pool holds %dx the pages of a %s pool in "
                        "the same memory (%d pages, a %s pool of these bytes: %d)",
                        "the checkpoint's k_scale / v_scale" if calibrated else "unit scales", ratio,
                        params.dtype.name, num_pages - 1, params.dtype.name, (num_pages - 1) // ratio)
        elif calibrated:
            logger.info("the checkpoint's FP8 KV-cache scales (kv_cache_scheme) go unused by a %s pool: "
                        "kv_cache_dtype='fp8' (--kv-cache-dtype fp8) stores the pool in e4m3 with them",
                        self.kv_dtype.name)
        seconds = self.executables.seconds
        if opts.precompile:
            self.precompile()
        self.compile_seconds = self.executables.seconds - seconds  # getting executables (compile or load)

    # -- sizing ------------------------------------------------------------------------------

    def page_bytes(self) -> int:
        """Bytes of one page across all layers, K and V."""
        c = self.config
        return 2 * c.num_layers * self.page_size * c.num_kv_heads * c.head_dim * self.kv_dtype.itemsize

    def _auto_num_pages(self) -> int:
        """Pages that fit: device memory x utilization, less weights and the largest step."""
        need = self.max_num_seqs * self.max_pages_per_req + 1  # enough for every sequence at full length
        device = jax.devices()[0]
        if device.platform != "gpu":
            return int(min(need, max(2, self.options.cpu_kv_cache_bytes // self.page_bytes())))
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:  # XLA's BFC allocator: its own limit and use
            limit, in_use = stats["bytes_limit"], stats.get("bytes_in_use", 0)
        else:  # other allocators (XLA's VMM one, which SKIP_TEMP command buffers need) report nothing
            info = cuda_mem_info()
            if info is None:
                raise RuntimeError("cannot size the KV pool: the device reports no memory figures; "
                                   "pass num_pages")
            free, total = info
            # The client's own cap (its physical allocation budget) is the same fraction of the
            # device as the BFC allocator's limit: a pool sized on the whole device leaves no room
            # to compile the next step (RESOURCE_EXHAUSTED: not enough PA budget). cudaMemGetInfo's
            # use counts other processes on the GPU too (engines or test workers sharing it, each
            # under its own cap): this process's is its arrays plus a context's worth at most, and
            # the pool must also fit in what is free.
            limit = int(total * client_memory_fraction())
            in_use = min(total - free, device_bytes_in_use(device) + OWN_OVERHEAD_BYTES)
            limit = min(limit, free + in_use)
        budget = limit * self.options.gpu_memory_utilization - in_use
        activations = self._activation_bytes()
        budget -= activations
        per_device = self.page_bytes() // parallel.tp_size(self.mesh)  # the pool is split on kv heads
        logger.info("KV pool sizing: device limit %.2f GiB x %.2f, in use %.2f GiB, the largest step's temporaries "
                    "%.2f GiB: %.2f GiB for pages", limit / 2**30, self.options.gpu_memory_utilization,
                    in_use / 2**30, activations / 2**30, max(0, budget) / 2**30)
        return int(min(need, max(0, budget) // per_device))

    def _activation_bytes(self) -> int:
        """Temporary memory of the largest step, from XLA's own analysis of a tiny-pool compile.

        The figure is kept in the compile cache (`traced`), keyed as the executables are (the
        program, its arguments' shapes and placement, versions, XLA_FLAGS, pagedjax's source):
        a warm start skips that compile, one of the largest step with its GEMM autotuning.
        """
        from pagedjax.compile_cache import traced

        cfg = self.config
        tiny = [(jax.ShapeDtypeStruct((2, self.page_size, cfg.num_kv_heads, cfg.head_dim), self.kv_dtype),) * 2
                for _ in range(cfg.num_layers)]
        T = self.token_buckets[-1]
        buf, layout = pack(self._dummy_inputs(T, num_pages=2)[0])
        rows = sorted({min(t, self.max_num_seqs) for t in self.token_buckets})
        sampling = 4 * rows[-1] * cfg.vocab_size * 4  # logits and a few [R, V] f32 temporaries
        args = (self.params.variables, tiny, buf, self._no_prev)
        if self.logits_slots:  # one kept per bucket's rows, and the largest step's in its args
            sampling += sum(rows) * cfg.vocab_size * 4
            args += (self._logits_slot_shape(rows[-1]),)

        def measure() -> int:
            compiled = _step.lower(cfg, self.attn_impl, *args, layout=layout, mesh=self.mesh).compile()
            return int(compiled.memory_analysis().temp_size_in_bytes)

        key = self.executables.key("step-temporaries", args, (cfg, self.attn_impl, layout, repr(self.mesh)))
        try:
            return traced("step-temporaries", key, measure) + sampling
        except Exception as e:  # an estimate only: fall back to a generous guess
            logger.warning("could not compile the largest step to measure its temporaries (%s: %s); guessing",
                           type(e).__name__, e)
            return T * cfg.vocab_size * 8 + sampling + (1 << 30)

    # -- the step ----------------------------------------------------------------------------

    def bucket(self, num_tokens: int) -> tuple[int, int]:
        """(T, R) padded sizes for a step of num_tokens tokens."""
        for t in self.token_buckets:
            if t >= num_tokens:
                return t, min(t, self.max_num_seqs)
        raise ValueError(f"{num_tokens} tokens exceed max_num_batched_tokens="
                         f"{self.max_num_batched_tokens}")

    def _dummy_inputs(self, T: int, num_pages: int | None = None):
        """An all-padding batch of bucket T (writes nothing, samples junk): (model inputs, smeta)."""
        R = min(T, self.max_num_seqs)
        P = num_pages or self.num_pages
        meta = AttentionMetadata(
            positions=np.zeros(T, np.int32),
            slot_mapping=page_pool.padding_slots(T, P, self.page_size),
            block_tables=np.zeros((R, self.max_pages_per_req), np.int32),
            seq_lens=np.zeros(R, np.int32),
            query_start_loc=np.zeros(R + 1, np.int32),
            logits_indices=np.zeros(R, np.int32),
        )
        smeta = make_sampling_metadata([], [], num_rows=R)
        return (np.zeros(T, np.int32), np.full(T, -1, np.int32), meta, None), smeta

    def precompile(self, run: bool | None = None) -> float:
        """Compiles (or loads) every token bucket's step, with the greedy and the plain random
        sampler (top-k / top-p variants compile on first use); returns the seconds spent.

        The programs are compiled several at a time (`compile_workers`): XLA compiles without
        the GIL, so one bucket's compile overlaps another's tracing and compile.

        run: also run each bucket's step once on padding, and both samplers on its logits. The
        default runs on accelerators, where a first run loads the kernels and records the step's
        CUDA graph, which the first requests would otherwise wait for. On the CPU nothing is left
        to do, and the runs were a quarter of a warm start.
        """
        run = jax.default_backend() != "cpu" if run is None else run
        t0 = time.perf_counter()
        samplers = (sampler.SampleFlags(random=False, top_k=False, top_p=False),
                    sampler.SampleFlags(random=True, top_k=False, top_p=False))
        dummies = [self._dummy_inputs(T) for T in self.token_buckets]  # (model inputs, smeta) of each
        inputs = [self._step_inputs(model_inputs, smeta, None, abstract_slot=True) for model_inputs, smeta in dummies]
        with _compile_pool(len(inputs)) as pool:
            steps = list(pool.map(lambda i: self._step_executable(i[0], i[1], 0, True), inputs))
            for step_args, mlayout, _, _ in inputs:  # further loaded copies (step_copies > 1)
                for c in range(1, self.step_copies):
                    self._step_executable(step_args, mlayout, 0, True, c)
            sampling = {}  # buckets with the same rows share a sampler: each compiled once
            for (_, _, sbuf, slayout), step in zip(inputs, steps):
                logits = step.out_info[0]  # the logits' shape, dtype and placement: what its key needs
                for flags in samplers:
                    sampling.setdefault((slayout, flags), ((logits, sbuf, None), slayout, flags))
            list(pool.map(lambda job: self._sample_executable(*job[:2], 0, job[2]), sampling.values()))
        for model_inputs, smeta in dummies if run else ():  # the model once (on each loaded copy), both
            for _ in range(self.step_copies):                # samplers on its logits
                launched = self._launch(model_inputs, smeta, None, {}, sample=False)
            logits, sbuf, slayout, _ = launched.pending_sample
            for flags in samplers:
                launched.pending_sample = (logits, sbuf, slayout, flags)
                self.sample(launched)
        jax.block_until_ready(self.pages)
        dt = time.perf_counter() - t0
        c = self.executables
        logger.info("compiled steps for %d buckets %s in %.1f s (executables: %d loaded from the cache, %d compiled)",
                    len(self.token_buckets), self.token_buckets, dt, c.disk_hits, c.misses)
        return dt

    def prepare(self, batch: Sequence[ScheduledRequest], prev: Launched | None = None):
        """The scheduler's rows -> padded numpy inputs of one step: (model inputs, sampling
        metadata, the prompt-logprob plan or None). Model inputs: tokens [T], src_rows [T] (a
        pending token's row in `prev`), attention metadata, prompt-logprob rows."""
        num_rows = len(batch)
        q_lens = np.fromiter((len(s.token_ids) for s in batch), np.int32, num_rows)  # [n]
        computed = np.fromiter((s.num_computed_tokens for s in batch), np.int32, num_rows)  # [n]
        num_tokens = int(q_lens.sum())
        T, R = self.bucket(num_tokens)
        if num_rows > R:
            raise ValueError(f"{num_rows} requests exceed max_num_seqs={self.max_num_seqs}")
        P, B, M = self.num_pages, self.page_size, self.max_pages_per_req

        tables = np.zeros((R, M), np.int32)  # page 0 is the null page
        num_pages = np.fromiter((len(s.block_table) for s in batch), np.int32, num_rows)  # [n]
        bad = np.flatnonzero((num_pages > M) | (num_pages * B < computed + q_lens))
        if bad.size:
            r = int(bad[0])
            raise ValueError(f"request {r}: {num_pages[r]} pages for {computed[r] + q_lens[r]} tokens")
        page_row = np.repeat(np.arange(num_rows, dtype=np.int32), num_pages)  # [sum pages] each page's row
        page_col = np.arange(page_row.size, dtype=np.int32) - np.repeat(np.cumsum(num_pages) - num_pages, num_pages)
        tables[page_row, page_col] = np.fromiter(itertools.chain.from_iterable(s.block_table for s in batch),
                                                 np.int32, page_row.size)
        starts = np.full(R + 1, num_tokens, np.int32)
        starts[0] = 0
        np.cumsum(q_lens, out=starts[1:num_rows + 1])
        row = np.repeat(np.arange(num_rows, dtype=np.int32), q_lens)  # [N] each token's row
        pos = np.arange(num_tokens, dtype=np.int32) - starts[row] + computed[row]  # [N]

        tokens = np.zeros(T, np.int32)
        tokens[:num_tokens] = list(itertools.chain.from_iterable(s.token_ids for s in batch))
        src_rows = np.full(T, -1, np.int32)
        pending = np.flatnonzero(tokens[:num_tokens] == -1)  # the previous step's tokens, on device
        if pending.size:
            src_rows[pending] = [prev.rows[batch[r].request_id] for r in row[pending].tolist()]
            tokens[pending] = 0
        positions = np.zeros(T, np.int32)
        positions[:num_tokens] = pos
        slots = page_pool.padding_slots(T, P, B)
        slots[:num_tokens] = tables[row, pos // B] * B + pos % B
        seq_lens = np.zeros(R, np.int32)
        seq_lens[:num_rows] = computed + q_lens
        logits_indices = np.zeros(R, np.int32)
        logits_indices[:num_rows] = starts[1:num_rows + 1] - 1
        meta = AttentionMetadata(positions=positions, slot_mapping=slots, block_tables=tables,
                                 seq_lens=seq_lens, query_start_loc=starts, logits_indices=logits_indices)
        reqs = [s.request for s in batch]
        smeta = make_sampling_metadata(
            [r.sampling_params for r in reqs], [r.output_token_ids for r in reqs], num_rows=R,
            num_pending=[r.num_pending for r in reqs], prompt_token_ids=[r.prompt_token_ids for r in reqs],
            eos_token_id=(self.config.eos_token_ids or (None,))[0], rng=self._rng)
        plp = prompt_logprobs.plan(batch, T)
        return (tokens, src_rows, meta, plp and plp.metadata), smeta, plp

    def launch(self, batch: Sequence[ScheduledRequest], copies: Sequence[tuple[int, int]] = (),
               num_logprobs: int = 0, prev: Launched | None = None, *, sample: bool = True) -> Launched:
        """Sends one step to the device and returns at once: page copies, the model over
        `batch`, sampling (with sample=False, later: `self.sample(launched, token_bitmask)`).
        Rows whose last token is pending read it from `prev`'s."""
        model_inputs, smeta, plp = self.prepare(batch, prev)
        if copies:
            src = pool_ops.padded([s for s, _ in copies], 0)
            dst = pool_ops.padded([d for _, d in copies], self.num_pages)  # out of range: dropped
            self.pages = pool_ops.copy_pages(self.pages, *jax.device_put((src, dst), self.input_sharding))
        rows = {s.request_id: r for r, s in enumerate(batch)}
        return self._launch(model_inputs, smeta, plp, rows, num_logprobs=num_logprobs,
                            prev_tokens=None if prev is None else prev.next_tokens, sample=sample)

    def _launch(self, model_inputs, smeta, plp, rows: dict[str, int], *, num_logprobs: int = 0,
                prev_tokens=None, flags: sampler.SampleFlags | None = None, sample: bool = True) -> Launched:
        step_args, mlayout, sbuf, slayout = self._step_inputs(model_inputs, smeta, prev_tokens)
        copy, self._step_launches = self._step_launches % self.step_copies, self._step_launches + 1
        step = self._step_executable(step_args, mlayout, plp.num_logprobs if plp else 0, prev_tokens is None, copy)
        logits, scored, self.pages = step(*step_args)
        launched = Launched(None, None, scored, plp and plp.spans, rows, num_logprobs,
                            num_padded_rows=logits.shape[0],
                            pending_sample=(logits, sbuf, slayout, flags or static_flags(smeta)))
        if sample:
            self.sample(launched)
        return launched

    def sample(self, launched: Launched, token_bitmask: np.ndarray | None = None) -> None:
        """Sends a launched step's sampling, constrained by `token_bitmask` [R, W] i32 when given
        (a compiled variant of its own: steps without one never see it)."""
        if launched.pending_sample is None:
            raise ValueError("this step's sampling was already launched")
        logits, sbuf, slayout, flags = launched.pending_sample
        launched.pending_sample = None
        flags = flags._replace(bitmask=token_bitmask is not None)
        if token_bitmask is not None:
            W = -(-self.config.vocab_size // 32)
            if token_bitmask.shape != (launched.num_padded_rows, W) or token_bitmask.dtype != np.int32:
                raise ValueError(f"token_bitmask must be int32 [{launched.num_padded_rows}, {W}], "
                                 f"got {token_bitmask.dtype} {list(token_bitmask.shape)}")
            token_bitmask = jax.device_put(token_bitmask, self.input_sharding)
        args = (logits, sbuf, token_bitmask)
        sample = self._sample_executable(args, slayout, launched.num_logprobs, flags)
        launched.out, launched.next_tokens = sample(*args)
        if self.logits_slots:  # the next step of these rows overwrites them (after this sampler: one stream)
            self._free_slots[logits.shape[0]] = logits
        if self._copy_ahead:  # the copy to the host starts when the sampler ends, so that fetch
            for x in self._fetched(launched):  # (after the next step's launch) finds it there
                x.copy_to_host_async()

    def _step_inputs(self, model_inputs, smeta, prev_tokens, abstract_slot: bool = False):
        """The step's arguments on the device (one buffer each for the model and the sampler):
        (step args, model layout, sampling buffer, sampling layout). `abstract_slot`: the logits
        slot as its shape only (for compiling)."""
        (mbuf, mlayout), (sbuf, slayout) = pack(model_inputs), pack(smeta)
        if self.staged_inputs:  # the 0 stage_inputs adds (after the layout's last entry)
            mbuf = np.append(mbuf, np.int32(0))
        mbuf, sbuf = jax.device_put((mbuf, sbuf), self.input_sharding)
        step_args = (self.params.variables, self.pages, mbuf, self._no_prev if prev_tokens is None else prev_tokens)
        if self.logits_slots:
            rows = model_inputs[2].logits_indices.shape[0]
            step_args += (self._logits_slot_shape(rows) if abstract_slot else self._logits_slot(rows),)
        return step_args, mlayout, sbuf, slayout

    def _logits_slot_shape(self, rows: int) -> jax.ShapeDtypeStruct:
        """The logits slot of a step with `rows` rows: [rows, V] f32, placed as the step's inputs
        (XLA aliases the logits with it only if shape, dtype and placement match; without a mesh,
        the executable cache keys it as an array on the default device, as a run's slot is)."""
        return jax.ShapeDtypeStruct((rows, self.config.vocab_size), jnp.float32, sharding=self.input_sharding)

    def _logits_slot(self, rows: int) -> jax.Array:
        """A donated buffer for the step's logits: the last ones of these rows, once sampled, else zeros."""
        slot = self._free_slots.pop(rows, None)
        if slot is None:  # a copy from the host, once per rows: jnp.zeros would compile a program per shape
            shape = self._logits_slot_shape(rows)
            slot = jax.device_put(np.zeros(shape.shape, shape.dtype), shape.sharding)
        return slot

    def _step_executable(self, step_args: tuple, mlayout, num_prompt_logprobs: int, first: bool, copy: int = 0):
        """The model step's executable for these arguments (first: no previous step's tokens;
        copy: which loaded instance, see step_copies)."""
        return self._compiled(("step", mlayout, num_prompt_logprobs, first, copy), lambda: self.executables.get(
            "step", _step, step_args, static_args=(self.config, self.attn_impl),
            static_kwargs=dict(layout=mlayout, mesh=self.mesh, num_prompt_logprobs=num_prompt_logprobs,
                               staged=self.staged_inputs),
            compiler_options=self.step_compiler_options, copy=copy))

    def _sample_executable(self, args: tuple, slayout, num_logprobs: int, flags: sampler.SampleFlags):
        """The sampler's executable for (logits, sampling buffer, token bitmask or None)."""
        return self._compiled(("sample", slayout, num_logprobs, flags), lambda: self.executables.get(
            "sample", _sample, args, static_kwargs=dict(
                layout=slayout, num_logprobs=num_logprobs, flags=flags, num_slots=self.max_num_seqs),
            compiler_options=self.step_compiler_options))

    def _compiled(self, key: tuple, get):
        """The executable for `key`, remembered by this runner: everything else that decides it
        (the weights', the pool's and prev_tokens' shapes and placement) is fixed for a runner, so
        the step skips the executable cache's full key (a walk over every argument) after the first."""
        compiled = self._executables.get(key)
        if compiled is None:
            compiled = self._executables[key] = get()
        return compiled

    @staticmethod
    def _fetched(launched: Launched) -> tuple:
        """The sampler's outputs that fetch brings to the host."""
        out = launched.out
        if launched.num_logprobs:
            return out.token_ids, out.logprobs, out.top_logprobs, out.top_token_ids, out.ranks
        return out.token_ids, out.logprobs

    def fetch(self, launched: Launched) -> StepOutput:
        """Waits for a launched step and brings its sampled tokens (and logprobs) to the host."""
        if launched.out is None:
            raise ValueError("fetch before the step's sampling was launched (runner.sample)")
        n = launched.num_rows
        prompt = prompt_logprobs.fetch(launched.scored, launched.spans)
        host = [x[:n] for x in jax.device_get(self._fetched(launched))]
        if launched.num_logprobs:
            return StepOutput(*host, prompt_logprobs=prompt)
        token_ids, logprobs = host
        return StepOutput(token_ids=token_ids, logprobs=logprobs, prompt_logprobs=prompt)

    # -- preemption by swap ------------------------------------------------------------------

    def init_swap_space(self, num_host_pages: int) -> None:
        """Allocates the host pool for swapped pages, [S, L, 2, B, K, H] in the pool's dtype
        (numpy; the OS commits its memory only as slots are first written)."""
        B, K, H = self.pages[0][0].shape[1:]
        self.host_pages = np.empty((num_host_pages, len(self.pages), 2, B, K, H), self.kv_dtype)

    def swap_out(self, copies: Sequence[tuple[int, int]]) -> None:
        """Copies (device page, host slot) pages to the host as the steps launched so far leave
        them; call it before launching the step that may reuse the pages. Waits for the device
        (preemption is rare). Under tensor parallelism device_get assembles the kv-head shards."""
        if self.host_pages is None:
            raise RuntimeError("swap_out before init_swap_space()")
        for i in range(0, len(copies), pool_ops.SWAP_CHUNK):
            chunk = copies[i:i + pool_ops.SWAP_CHUNK]
            src = pool_ops.padded([page for page, _ in chunk], 0)  # padding reads page 0
            rows = jax.device_get(pool_ops.gather_pages(self.pages, jax.device_put(src, self.input_sharding)))
            self.host_pages[[slot for _, slot in chunk]] = rows[:len(chunk)]

    def swap_in(self, copies: Sequence[tuple[int, int]]) -> None:
        """Copies (host slot, device page) pages into the pool, in place, before the next step."""
        if self.mesh is None:
            sharding = self.pages[0][0].sharding
        else:  # the pool's split on kv heads, for [C, L, 2, B, K, H]
            spec = parallel.pool_sharding(self.config, self.mesh).spec
            sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(None, None, *spec))
        for i in range(0, len(copies), pool_ops.SWAP_CHUNK):
            chunk = copies[i:i + pool_ops.SWAP_CHUNK]
            dst = pool_ops.padded([page for _, page in chunk], self.num_pages)  # out of range: dropped
            rows = np.zeros((len(dst), *self.host_pages.shape[1:]), self.host_pages.dtype)  # a copy: slots may be reused
            rows[:len(chunk)] = self.host_pages[[slot for slot, _ in chunk]]
            self.pages = pool_ops.scatter_pages(self.pages, jax.device_put(rows, sharding),
                                                jax.device_put(dst, self.input_sharding))
