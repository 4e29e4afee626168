"""The model runner: owns the device state and runs one jitted step per engine step.

Host lists come in (`StepRequest`s), go down to the device once as padded arrays (`prepare`),
and the step -- the model with the pool donated, then on-device sampling -- sends back
only the sampled token ids (and logprobs when asked).

Dims: T tokens (padded to a bucket), R requests (padded: R = min(T, max_num_seqs)),
M max pages per request, P pages, C copy-on-write (or swapped) page copies, V vocab,
L layers, S host page slots, B page size, K kv heads, H head dim.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pagedjax import parallel, prompt_logprobs, sampler
from pagedjax.attention import AttentionMetadata
from pagedjax.kv_cache import page_pool
from pagedjax.models import get_model
from pagedjax.params import Params

logger = logging.getLogger("pagedjax")


@dataclass
class StepRequest:
    """One request's share of a step, as the engine hands it to the runner (host only)."""

    token_ids: list[int]  # the tokens computed this step
    num_computed_tokens: int  # position of token_ids[0]: tokens already in the pages
    block_table: list[int]  # page ids, covering every position up to the last new token
    sample: bool  # the chunk reaches the request's end: sample a token from its last position
    sampling_params: Any = None
    output_token_ids: list[int] = field(default_factory=list)
    prompt_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None  # overrides sampling_params.seed (the i-th of n samples)
    prev_row: int = -1  # >= 0: token_ids[-1] is pending, the previous step's sampled token of this row
    num_pending: int = 0  # sampled tokens not in output_token_ids yet (they count for seeds, min_tokens)


@dataclass
class StepOutput:
    """What comes back to the host: one row per StepRequest (rows with sample=False are junk)."""

    token_ids: np.ndarray  # [R] int32
    logprobs: np.ndarray | None = None  # [R] f32, raw logprob of the sampled token
    top_logprobs: np.ndarray | None = None  # [R, k]
    top_token_ids: np.ndarray | None = None  # [R, k]
    ranks: np.ndarray | None = None  # [R]
    prompt_logprobs: prompt_logprobs.ScoredPrompts | None = None  # steps that scored prompt tokens


def token_buckets(hi: int, factor: int = 4) -> list[int]:
    """1, 4, 16, ... below hi, and hi itself: few compiles, single-request decode unpadded."""
    out, b = [], 1
    while b < hi:
        out.append(b)
        b *= factor
    return out + [hi]


def compile_cache_dir() -> str | None:
    """Where compiled steps persist across processes (PAGEDJAX_COMPILE_CACHE; empty = off)."""
    d = os.environ.get("PAGEDJAX_COMPILE_CACHE")
    if d is None:
        d = os.path.join(os.path.expanduser("~"), ".cache", "pagedjax", "jax-compile")
    return d or None


def enable_compile_cache() -> None:
    """Turns on JAX's persistent compilation cache (once; keeps a directory set elsewhere)."""
    d = compile_cache_dir()
    if d and not jax.config.jax_compilation_cache_dir:
        try:
            os.makedirs(d, exist_ok=True)
        except OSError:
            return
        jax.config.update("jax_compilation_cache_dir", d)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _copy_pages(k, v, src, dst):
    """Copies pages src -> dst [C] of one layer's pools [P, B, K, H] (dst >= P: dropped).

    A row scatter into the pool viewed as [P * B, K, H], like the KV write, after a barrier
    that ends the reads: otherwise XLA fuses read and write and copies the whole pool per step.
    """
    P, B, K, H = k.shape
    offs = jnp.arange(B, dtype=jnp.int32)
    src_rows = (src[:, None] * B + offs).reshape(-1)  # [C * B]
    dst_rows = (dst[:, None] * B + offs).reshape(-1)  # [C * B]; >= P * B when dst is padding

    flat = [pool.reshape(P * B, K, H) for pool in (k, v)]
    rows = [f[src_rows] for f in flat]  # [C * B, K, H]
    # The barrier finishes the reads before the writes, so the scatters can run in place.
    rows, flat = jax.lax.optimization_barrier((rows, flat))
    return tuple(f.at[dst_rows].set(r, mode="drop", unique_indices=True).reshape(P, B, K, H)
                 for f, r in zip(flat, rows))


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


def _padded(values: list[int], fill: int) -> np.ndarray:
    """int32 `values` padded with `fill` to a power of two: page copies and swaps compile a few sizes."""
    out = np.full(1 << max(len(values) - 1, 0).bit_length(), fill, np.int32)
    out[:len(values)] = values
    return out


def _step_fn(config, attn_impl, variables, pages, buf, prev_tokens, *, layout, mesh=None,
             num_prompt_logprobs=0):
    """The model's part of an engine step on device: logits [R, V] of each request (pool in, pool out).

    `buf` holds the step's inputs (`pack`ed): tokens [T], src_rows [T], the attention metadata
    and the prompt-logprob rows. A token whose src_row is >= 0 is the previous step's sampled
    token of that row, read from `prev_tokens` [max_num_seqs] on device (async scheduling).
    With a tensor-parallel `mesh` the model traces under it (the ambient mesh a custom call's
    shard_map uses), the logits are gathered once for sampling and the pool stays split.
    With prompt metadata (a variant of its own: static num_prompt_logprobs) it also scores
    prompt tokens (pagedjax/prompt_logprobs.py).
    """
    tokens, src_rows, meta, prompt_meta = unpack(buf, layout)
    tokens = jnp.where(src_rows >= 0, prev_tokens[jnp.maximum(src_rows, 0)], tokens)
    model = get_model(config, attn_impl=attn_impl)
    with parallel.use_mesh(mesh):
        logits, pages, scored = prompt_logprobs.apply_model(  # logits [R, V]
            model, variables, tokens, pages, meta, prompt_meta, num_logprobs=num_prompt_logprobs)
        logits, pages = parallel.constrain_step(logits, pages, mesh)
    return logits, scored, pages


# One jit for every runner: engines of the same model share compiled steps. The pool is donated,
# so XLA updates it in place (DESIGN 3.3).
_step = jax.jit(_step_fn, static_argnums=(0, 1), donate_argnums=(3,),
                static_argnames=("layout", "mesh", "num_prompt_logprobs"))


@functools.partial(jax.jit, static_argnames=("layout", "num_logprobs", "flags", "num_slots"))
def _sample(logits, buf, *, layout, num_logprobs, flags, num_slots):
    """Sampling, a call of its own: its variants (flags, logprobs, penalty widths) compile in
    well under a second, where a variant of the whole step would recompile the model.
    Also returns the sampled tokens padded to [num_slots] = max_num_seqs: the next step's
    `prev_tokens`, one shape for every bucket."""
    with jax.named_scope("sample"):
        out = sampler.sample(logits, unpack(buf, layout), num_logprobs=num_logprobs, flags=flags)
    next_tokens = jnp.zeros((num_slots,), jnp.int32).at[: out.token_ids.shape[0]].set(out.token_ids)
    return out, next_tokens


@dataclass
class Launched:
    """A step sent to the device and not read back yet (device arrays, host bookkeeping)."""

    out: Any  # SamplerOutput
    next_tokens: jax.Array  # [S] this step's sampled tokens, by row: the next step's prev_tokens
    scored: Any  # the prompt-logprob rows, or None
    spans: Any  # prompt_logprobs.Span list, or None
    num_rows: int
    num_logprobs: int


@functools.partial(jax.jit, donate_argnums=(0,))
def _copy_step(pages, src, dst):
    """Copy-on-write before a step: pages src -> dst [C] in every layer (dst >= P: dropped).

    A separate call, run only on steps that have copies: fused into the step, XLA copied the
    whole pool every step to read and write it in one fusion.
    """
    with jax.named_scope("copy_pages"):
        return [_copy_pages(k, v, src, dst) for k, v in pages]


_SWAP_CHUNK = 64  # pages per swap call: bounds its device temporaries


@jax.jit
def _gather_pages(pages, src):
    """Swap-out: pages src [C] of every layer, K and V -> [C, L, 2, B, K, H] (read only)."""
    with jax.named_scope("swap_out"):
        return jnp.stack([jnp.stack([k[src], v[src]], axis=1) for k, v in pages], axis=1)


@functools.partial(jax.jit, donate_argnums=(0,))
def _scatter_pages(pages, rows, dst):
    """Swap-in: rows [C, L, 2, B, K, H] into pages dst [C] of every layer (dst >= P: dropped).

    A row scatter into each pool viewed as [P * B, K, H], like _copy_pages, in place (donated).
    """
    with jax.named_scope("swap_in"):
        out = []
        for layer, (k, v) in enumerate(pages):
            P, B, K, H = k.shape
            dst_rows = (dst[:, None] * B + jnp.arange(B, dtype=jnp.int32)).reshape(-1)  # [C * B]
            out.append(tuple(
                pool.reshape(P * B, K, H).at[dst_rows].set(rows[:, layer, j].reshape(-1, K, H), mode="drop",
                                                           unique_indices=True).reshape(P, B, K, H)
                for j, pool in enumerate((k, v))))
        return out


class ModelRunner:
    """Owns params, the page pool and the compiled steps; `execute(batch)` runs one step."""

    def __init__(
        self,
        params: Params,
        *,
        max_model_len: int,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 512,
        page_size: int = 16,
        num_pages: int | None = None,
        gpu_memory_utilization: float = 0.9,
        cpu_kv_cache_bytes: int = 2 << 30,
        kv_cache_dtype: Any = None,
        attn_impl: str = "auto",
        precompile: bool = True,
        seed: int = 0,
        mesh: jax.sharding.Mesh | None = None,
    ):
        enable_compile_cache()
        # tensor parallel: params placed by parallel's rules (kv heads replicated when K < tp),
        # the pool split on kv heads, every step input replicated on the mesh
        self.mesh = mesh if parallel.tp_size(mesh) > 1 else None
        self.input_sharding = None if self.mesh is None else parallel.replicated(self.mesh)
        if self.mesh is not None:
            params = parallel.shard_params(params, self.mesh)
        self.params = params
        self.config = cfg = params.config
        self.page_size = page_size
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_pages_per_req = math.ceil(max_model_len / page_size)  # M
        self.token_buckets = token_buckets(max_num_batched_tokens)
        leaves = jax.tree.leaves(params.variables)
        self.kv_dtype = jnp.dtype(kv_cache_dtype or leaves[0].dtype)
        self._rng = np.random.default_rng(seed)
        self._no_prev = jax.device_put(np.zeros(max_num_seqs, np.int32), self.input_sharding)  # prev_tokens of a first step
        self.attn_impl = attn_impl

        if num_pages is None:
            num_pages = self._auto_num_pages(gpu_memory_utilization, cpu_kv_cache_bytes)
        if num_pages < 2:
            raise ValueError(f"the KV cache needs at least 2 pages, got {num_pages}: lower "
                             "max_model_len or max_num_batched_tokens, or give it more memory")
        self.num_pages = num_pages
        self.host_pages: np.ndarray | None = None  # [S, L, 2, B, K, H]: init_swap_space()
        self.pages = page_pool.init_pages(cfg.num_layers, num_pages, page_size, cfg.num_kv_heads,
                                          cfg.head_dim, self.kv_dtype,
                                          sharding=self.mesh and parallel.pool_sharding(cfg, self.mesh))
        logger.info("KV cache: %d pages of %d tokens = %d tokens, %.1f MiB (%s)", num_pages - 1,
                    page_size, (num_pages - 1) * page_size,
                    page_pool.pages_bytes(self.pages) / 2**20, self.kv_dtype.name)
        if precompile:
            self.precompile()

    # -- sizing ------------------------------------------------------------------------------

    def page_bytes(self) -> int:
        """Bytes of one page across all layers, K and V."""
        c = self.config
        return 2 * c.num_layers * self.page_size * c.num_kv_heads * c.head_dim * self.kv_dtype.itemsize

    def _auto_num_pages(self, utilization: float, cpu_bytes: int) -> int:
        """Pages that fit: device memory x utilization, less weights and the largest step."""
        need = self.max_num_seqs * self.max_pages_per_req + 1  # enough for every sequence at full length
        device = jax.devices()[0]
        stats = device.memory_stats() if device.platform == "gpu" else None
        if not stats or "bytes_limit" not in stats:
            return int(min(need, max(2, cpu_bytes // self.page_bytes())))
        budget = stats["bytes_limit"] * utilization - stats.get("bytes_in_use", 0)
        budget -= self._activation_bytes()
        per_device = self.page_bytes() // parallel.tp_size(self.mesh)  # the pool is split on kv heads
        return int(min(need, max(0, budget) // per_device))

    def _activation_bytes(self) -> int:
        """Temporary memory of the largest step, from XLA's own analysis of a tiny-pool compile."""
        cfg = self.config
        tiny = [(jax.ShapeDtypeStruct((2, self.page_size, cfg.num_kv_heads, cfg.head_dim), self.kv_dtype),) * 2
                for _ in range(cfg.num_layers)]
        T = self.token_buckets[-1]
        buf, layout = pack(self._dummy_inputs(T, num_pages=2)[0])
        sampling = 4 * min(T, self.max_num_seqs) * cfg.vocab_size * 4  # logits and a few [R, V] f32 temporaries
        try:
            compiled = _step.lower(cfg, self.attn_impl, self.params.variables, tiny, buf, self._no_prev,
                                   layout=layout, mesh=self.mesh).compile()
            return int(compiled.memory_analysis().temp_size_in_bytes) + sampling
        except Exception:  # an estimate only: fall back to a generous guess
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
        smeta = sampler.make_sampling_metadata([], [], num_rows=R)
        return (np.zeros(T, np.int32), np.full(T, -1, np.int32), meta, None), smeta

    def precompile(self) -> float:
        """Compiles (and runs once, on padding) every token bucket, with the greedy and the plain
        random sampler (top-k / top-p variants compile on first use); returns the seconds spent."""
        t0 = time.perf_counter()
        for T in self.token_buckets:
            model_inputs, smeta = self._dummy_inputs(T)
            for flags in (sampler.SampleFlags(False, False, False), sampler.SampleFlags(True, False, False)):
                self._launch(model_inputs, smeta, None, 0, flags=flags)
        jax.block_until_ready(self.pages)
        dt = time.perf_counter() - t0
        logger.info("compiled %d step buckets %s in %.1f s", len(self.token_buckets),
                    self.token_buckets, dt)
        return dt

    def prepare(self, batch: list[StepRequest]):
        """Host lists -> padded numpy inputs of one step: (model inputs, sampling metadata, the
        prompt-logprob plan or None). Model inputs: tokens [T], src_rows [T], attention metadata,
        prompt-logprob rows."""
        num_tokens = sum(len(r.token_ids) for r in batch)
        T, R = self.bucket(num_tokens)
        if len(batch) > R:
            raise ValueError(f"{len(batch)} requests exceed max_num_seqs={self.max_num_seqs}")
        P, B, M = self.num_pages, self.page_size, self.max_pages_per_req
        tokens = np.zeros(T, np.int32)
        src_rows = np.full(T, -1, np.int32)
        positions = np.zeros(T, np.int32)
        slots = page_pool.padding_slots(T, P, B)
        tables = np.zeros((R, M), np.int32)  # page 0 is the null page
        seq_lens = np.zeros(R, np.int32)
        starts = np.full(R + 1, num_tokens, np.int32)
        logits_indices = np.zeros(R, np.int32)
        t = 0
        for r, req in enumerate(batch):
            n, c = len(req.token_ids), req.num_computed_tokens
            if len(req.block_table) > M or len(req.block_table) * B < c + n:
                raise ValueError(f"request {r}: {len(req.block_table)} pages for {c + n} tokens")
            tokens[t:t + n] = req.token_ids
            if req.prev_row >= 0:  # pending: the device has it
                tokens[t + n - 1], src_rows[t + n - 1] = 0, req.prev_row
            pos = np.arange(c, c + n, dtype=np.int32)
            positions[t:t + n] = pos
            table = np.asarray(req.block_table, np.int32)
            tables[r, :len(table)] = table
            slots[t:t + n] = table[pos // B] * B + pos % B
            seq_lens[r] = c + n
            starts[r] = t
            logits_indices[r] = t + n - 1
            t += n
        meta = AttentionMetadata(positions=positions, slot_mapping=slots, block_tables=tables,
                                 seq_lens=seq_lens, query_start_loc=starts,
                                 logits_indices=logits_indices)
        smeta = sampler.make_sampling_metadata(
            [r.sampling_params for r in batch], [r.output_token_ids for r in batch], num_rows=R,
            num_pending=[r.num_pending for r in batch],
            prompt_token_ids=[r.prompt_token_ids for r in batch],
            seeds=[r.seed if r.seed is not None else getattr(r.sampling_params, "seed", None)
                   for r in batch],
            eos_token_id=(self.config.eos_token_ids or (None,))[0], rng=self._rng)
        plp = prompt_logprobs.plan(batch, T)
        return (tokens, src_rows, meta, plp and plp.metadata), smeta, plp

    def _copy(self, copies: list[tuple[int, int]]) -> None:
        """Runs the copy-on-write page copies."""
        src = _padded([s for s, _ in copies], 0)
        dst = _padded([d for _, d in copies], self.num_pages)  # out of range: dropped
        src, dst = jax.device_put((src, dst), self.input_sharding)
        self.pages = _copy_step(self.pages, src, dst)

    # -- preemption by swap ------------------------------------------------------------------

    def init_swap_space(self, num_host_pages: int) -> None:
        """Allocates the host pool for swapped pages, [S, L, 2, B, K, H] in the pool's dtype
        (numpy; the OS commits its memory only as slots are first written)."""
        B, K, H = self.pages[0][0].shape[1:]
        self.host_pages = np.empty((num_host_pages, len(self.pages), 2, B, K, H), self.kv_dtype)

    def swap_out(self, copies: list[tuple[int, int]]) -> None:
        """Copies (device page, host slot) pages to the host as the steps launched so far leave
        them; call it before launching the step that may reuse the pages. Waits for the device
        (preemption is rare). Under tensor parallelism device_get assembles the kv-head shards."""
        if self.host_pages is None:
            raise RuntimeError("swap_out before init_swap_space()")
        for i in range(0, len(copies), _SWAP_CHUNK):
            chunk = copies[i:i + _SWAP_CHUNK]
            src = _padded([page for page, _ in chunk], 0)  # padding reads page 0
            rows = jax.device_get(_gather_pages(self.pages, jax.device_put(src, self.input_sharding)))
            self.host_pages[[slot for _, slot in chunk]] = rows[:len(chunk)]

    def swap_in(self, copies: list[tuple[int, int]]) -> None:
        """Copies (host slot, device page) pages into the pool, in place, before the next step."""
        if self.mesh is None:
            sharding = self.pages[0][0].sharding
        else:  # the pool's split on kv heads, for [C, L, 2, B, K, H]
            spec = parallel.pool_sharding(self.config, self.mesh).spec
            sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(None, None, *spec))
        for i in range(0, len(copies), _SWAP_CHUNK):
            chunk = copies[i:i + _SWAP_CHUNK]
            dst = _padded([page for _, page in chunk], self.num_pages)  # out of range: dropped
            rows = np.zeros((len(dst), *self.host_pages.shape[1:]), self.host_pages.dtype)  # a copy: slots may be reused
            rows[:len(chunk)] = self.host_pages[[slot for slot, _ in chunk]]
            self.pages = _scatter_pages(self.pages, jax.device_put(rows, sharding),
                                        jax.device_put(dst, self.input_sharding))

    def launch(self, batch: list[StepRequest], copies: list[tuple[int, int]] = (),
               num_logprobs: int = 0, prev: Launched | None = None) -> Launched:
        """Sends one step to the device and returns at once: page copies, the model over
        `batch`, sampling. Rows with a `prev_row` read their pending token from `prev`'s."""
        model_inputs, smeta, plp = self.prepare(batch)
        if copies:
            self._copy(copies)
        return self._launch(model_inputs, smeta, plp, len(batch), num_logprobs=num_logprobs,
                            prev_tokens=None if prev is None else prev.next_tokens)

    def _launch(self, model_inputs, smeta, plp, num_rows: int, *, num_logprobs: int = 0, prev_tokens=None,
                flags: sampler.SampleFlags | None = None) -> Launched:
        (mbuf, mlayout), (sbuf, slayout) = pack(model_inputs), pack(smeta)
        mbuf, sbuf = jax.device_put((mbuf, sbuf), self.input_sharding)
        logits, scored, self.pages = _step(
            self.config, self.attn_impl, self.params.variables, self.pages, mbuf,
            self._no_prev if prev_tokens is None else prev_tokens, layout=mlayout, mesh=self.mesh,
            num_prompt_logprobs=plp.num_logprobs if plp else 0)
        out, next_tokens = _sample(logits, sbuf, layout=slayout, num_logprobs=num_logprobs,
                                   flags=flags or sampler.static_flags(smeta), num_slots=self.max_num_seqs)
        return Launched(out, next_tokens, scored, plp and plp.spans, num_rows, num_logprobs)

    def fetch(self, launched: Launched) -> StepOutput:
        """Waits for a launched step and brings its sampled tokens (and logprobs) to the host."""
        out, n = launched.out, launched.num_rows
        prompt = prompt_logprobs.fetch(launched.scored, launched.spans)
        if launched.num_logprobs:
            host = jax.device_get((out.token_ids, out.logprobs, out.top_logprobs,
                                   out.top_token_ids, out.ranks))
            return StepOutput(*(x[:n] for x in host), prompt_logprobs=prompt)
        token_ids, logprobs = jax.device_get((out.token_ids, out.logprobs))
        return StepOutput(token_ids=token_ids[:n], logprobs=logprobs[:n], prompt_logprobs=prompt)
