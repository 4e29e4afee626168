"""Hardware ceilings, measured in the run they judge, and the fraction of them a run reaches.

Ceilings (`measure_ceilings`, or `measure_ceilings_torch` in a torch process): a device copy of
1 GiB counted as bytes read + written over its time (the copy bandwidth, as in
notes/gpu_baseline.md and benchmarks/kernels), and a bf16 8192^3 matmul in FLOP/s. On CPU the
sizes shrink and the dtype is float32, so the smoke test runs in a second (the figures then mean
little).

The roofline of one engine step, for rows r = 1..R each computing n_r new tokens after c_r
cached ones (T = sum n_r tokens in the step):

    bytes(step) = W + kv * (sum_r (c_r + n_r) + T)    # weights once; each row reads its K/V, T written
    flops(step) = 2 * P_layers * T + 2 * P_head * R + A * sum_r (n_r * c_r + n_r * (n_r + 1) / 2)
    t(step)     = max(bytes / copy_bw, flops / matmul_rate)

W is every weight a step multiplies (the layers, the final norm, the lm_head), not the embedding
table, which is only gathered (tied, it is the lm_head and counts). Of an MoE layer's experts a
token multiplies k of E (P_layers counts k / E of them), and a step of T tokens reads the
expected share 1 - (1 - k / E)^T of their bytes (uniform routing). kv is the K+V bytes of one
token over all layers; A = 4 * layers * q_heads * head_dim is QK^T plus PV for one (query, key)
pair. Activations, the sampler and the step's host work are left out, so t(step) is a floor.

`StepLog` records (rows, contexts, seconds) per step by wrapping the runner's step calls, and
`summarize` reports, against the measured time:
- decode: steps where every row computes one token. roofline = sum of t(step) (memory-bound
  here, so bytes / copy_bw), frac = roofline / measured time of those steps.
- prefill: steps where some row computes more than one token (a prompt chunk, or a recompute
  after preemption), decode rows riding along included in their tokens. mfu = sum flops /
  matmul_rate over their measured time; frac uses t(step).
- run: sum of t(step) over all steps against the run's wall time; the gap includes host time
  outside the steps (scheduling, detokenization), reported as host_outside_steps_s.
This judges each step the scheduler chose, not the schedule: an engine taking more, smaller
steps pays the weights more often and is not penalised for it here. For a baseline with no step
log (HF `generate_batch`) there is no roofline; for HF static `generate`, `static_batches_log`
builds the steps its batches must run (real prompt and output lengths, padding not counted).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable


def _median_time(call: Callable[[], Any], sync: Callable[[Any], Any], target_s: float = 0.05,
                 repeats: int = 5) -> float:
    """Median seconds per call after a warm-up; calls are queued back to back, then synced."""
    sync(call())
    t = time.perf_counter()
    sync(call())
    iters = int(min(max(target_s / max(time.perf_counter() - t, 1e-6), 1), 200))
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(iters):
            out = call()
        sync(out)
        samples.append((time.perf_counter() - t) / iters)
    return statistics.median(samples)


def measure_ceilings() -> dict:
    """Copy bandwidth (bytes/s, read + written) and matmul rate (FLOP/s) of jax's first device."""
    import jax
    import jax.numpy as jnp

    gpu = jax.default_backend() == "gpu"
    nbytes, n, dtype = (1 << 30, 8192, jnp.bfloat16) if gpu else (32 << 20, 512, jnp.float32)
    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    copy = jax.jit(jnp.copy)
    bw = 2 * x.nbytes / _median_time(lambda: copy(x), jax.block_until_ready)
    del x
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    mm = jax.jit(jnp.matmul)
    rate = 2 * n**3 / _median_time(lambda: mm(a, b), jax.block_until_ready)
    return {"copy_bw": bw, "matmul_rate": rate, "via": "jax", "copy_bytes": nbytes,
            "matmul_n": n, "matmul_dtype": jnp.dtype(dtype).name,
            "device": str(jax.devices()[0].device_kind)}


def measure_ceilings_torch() -> dict:
    """The same two ceilings through torch (for the HF baselines' own process)."""
    import torch

    gpu = torch.cuda.is_available()
    dev = "cuda" if gpu else "cpu"
    nbytes, n, dtype = (1 << 30, 8192, torch.bfloat16) if gpu else (32 << 20, 512, torch.float32)
    sync = (lambda _: torch.cuda.synchronize()) if gpu else (lambda _: None)
    x = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=dev)
    bw = 2 * nbytes / _median_time(lambda: x.clone(), sync)
    del x
    a = torch.randn(n, n, dtype=dtype, device=dev)
    b = torch.randn(n, n, dtype=dtype, device=dev)
    rate = 2 * n**3 / _median_time(lambda: a @ b, sync)
    return {"copy_bw": bw, "matmul_rate": rate, "via": "torch", "copy_bytes": nbytes,
            "matmul_n": n, "matmul_dtype": str(dtype).removeprefix("torch."),
            "device": torch.cuda.get_device_name() if gpu else "cpu"}


@dataclass(frozen=True)
class ModelCost:
    """What one token costs a model: weights streamed per step, K/V bytes, FLOPs."""

    weight_bytes: int  # W: layers + final norm + lm_head, read once per step (MoE experts apart)
    layer_params: int  # P_layers: multiplied once per token (of the experts, the k a token is routed to)
    head_params: int  # P_head: the lm_head, multiplied once per row
    kv_bytes_per_token: int  # K and V of one token, all layers
    attn_flops_per_pair: int  # A: QK^T and PV of one (query, key) pair, all layers
    expert_bytes: int = 0  # MoE: every expert's weights, all layers; a step reads those its tokens hit
    expert_hit: float = 0.0  # MoE: the chance one token hits a given expert (k / E)

    @classmethod
    def from_config(cls, config, dtype: Any, kv_dtype: Any = None) -> ModelCost:
        """From a pagedjax ModelConfig: counts the params of its abstract tree (no device memory).

        Quantized linears (config.quantization) count their stored bytes (e4m3 values, packed
        int4 codes, scales and zeros) and their unquantized sizes in FLOPs.
        """
        import math

        import jax
        import jax.numpy as jnp

        from pagedjax.models import abstract_params
        from pagedjax.params import array_bytes

        dtype = jnp.dtype(dtype)
        kv_dtype = jnp.dtype(kv_dtype or dtype)
        def count(cfg) -> list[int]:
            """[layer params, head params, expert params, layer bytes, head bytes, expert bytes]."""
            shapes, _ = abstract_params(cfg, dtype)
            out = [0] * 6
            for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
                name = ".".join(str(getattr(k, "key", k)) for k in path)
                size = math.prod(leaf.shape)
                if ".mlp.experts_" in name:  # stacked [E, ...] expert weights
                    i = 2
                elif name.startswith("lm_head") or (name == "embed.embedding" and cfg.tie_word_embeddings):
                    i = 1
                elif name == "embed.embedding" or name.startswith("pos_embed"):
                    continue  # gathered only
                else:
                    i = 0
                out[i] += size
                out[3 + i] += array_bytes(leaf)
            return out

        layers, head, experts = count(config.replace(quantization=None))[:3]
        layer_bytes, head_bytes, expert_bytes = count(config)[3:]
        c = config
        hit = c.num_experts_per_tok / c.num_experts if c.num_experts else 0.0
        return cls(weight_bytes=layer_bytes + head_bytes, layer_params=layers + round(hit * experts),
                   head_params=head,
                   kv_bytes_per_token=2 * c.num_layers * c.num_kv_heads * c.head_dim * kv_dtype.itemsize,
                   attn_flops_per_pair=4 * c.num_layers * c.num_heads * c.head_dim,
                   expert_bytes=expert_bytes, expert_hit=hit)

    def step(self, tokens: int, rows: int, kv_tokens: int, pairs: int) -> tuple[float, float]:
        """(bytes, flops) of one step; kv_tokens = sum_r (c_r + n_r), pairs as in the module doc.
        MoE experts: the expected share the step's tokens hit, routed uniformly at random."""
        hit = 1.0 - (1.0 - self.expert_hit) ** tokens if self.expert_bytes else 0.0
        nbytes = self.weight_bytes + hit * self.expert_bytes + self.kv_bytes_per_token * (kv_tokens + tokens)
        flops = 2 * self.layer_params * tokens + 2 * self.head_params * rows + self.attn_flops_per_pair * pairs
        return float(nbytes), float(flops)


@dataclass
class StepLog:
    """Per-step (tokens, rows, kv tokens, pairs, decode?, seconds), host ints only."""

    steps: list[tuple[int, int, int, int, bool, float | None]] = field(default_factory=list)

    def add(self, rows: list[tuple[int, int]], seconds: float | None = None) -> None:
        """One step from its rows' (c_r cached tokens, n_r new tokens)."""
        T = kv = pairs = 0
        decode = True
        for c, n in rows:
            T += n
            kv += c + n
            pairs += n * c + n * (n + 1) // 2
            decode = decode and n == 1
        self.steps.append((T, len(rows), kv, pairs, decode, seconds))

    def wrap(self, runner) -> Callable[[], None]:
        """Records every step the runner runs from now on; returns a function that stops it.

        Steps may overlap (async scheduling): each is timed from its launch, or the previous
        step's fetch if later, to its own fetch.
        """
        launch, fetch = runner.launch, runner.fetch
        pending: list[tuple[list[tuple[int, int]], float]] = []  # launched, not fetched: FIFO
        last_end = [0.0]

        def timed_launch(batch, *args, **kwargs):
            pending.append(([(s.num_computed_tokens, len(s.token_ids)) for s in batch], time.perf_counter()))
            return launch(batch, *args, **kwargs)

        def timed_fetch(launched, *args, **kwargs):
            out = fetch(launched, *args, **kwargs)  # host token ids: the step is done
            end = time.perf_counter()
            rows, start = pending.pop(0)
            self.add(rows, end - max(start, last_end[0]))
            last_end[0] = end
            return out

        runner.launch, runner.fetch = timed_launch, timed_fetch
        return lambda: [runner.__dict__.pop(n, None) for n in ("launch", "fetch")]


def static_batches_log(batches: list[list[tuple[int, int]]]) -> StepLog:
    """The steps HF static `generate` runs: per batch of (prompt len, output len), one prefill
    of every prompt, then max(output) - 1 decode steps over every row (rows past their own
    output still run; only their real context is counted)."""
    log = StepLog()
    for batch in batches:
        log.add([(0, p) for p, _ in batch])
        for j in range(1, max(o for _, o in batch)):
            log.add([(p + j - 1, 1) for p, _ in batch])
    return log


def summarize(log: StepLog, cost: ModelCost, ceilings: dict, elapsed: float) -> dict:
    """Decode, prefill and whole-run roofline fractions (see the module docstring)."""
    bw, rate = ceilings["copy_bw"], ceilings["matmul_rate"]
    agg = {k: dict(steps=0, tokens=0, rows=0, kv=0, measured=0.0, roof=0.0, flops_s=0.0, timed=True)
           for k in ("decode", "prefill")}
    for T, R, kv, pairs, decode, seconds in log.steps:
        nbytes, flops = cost.step(T, R, kv, pairs)
        a = agg["decode" if decode else "prefill"]
        a["steps"] += 1
        a["tokens"] += T
        a["rows"] += R
        a["kv"] += kv
        a["roof"] += max(nbytes / bw, flops / rate)
        a["flops_s"] += flops / rate
        if seconds is None:
            a["timed"] = False
        else:
            a["measured"] += seconds

    def phase(a: dict) -> dict:
        out = {"steps": a["steps"], "tokens": a["tokens"], "roofline_s": round(a["roof"], 3)}
        if a["steps"]:
            out["mean_rows"] = round(a["rows"] / a["steps"], 1)
            out["mean_context"] = round(a["kv"] / max(a["rows"], 1), 1)
        if a["timed"] and a["measured"] > 0:
            out["measured_s"] = round(a["measured"], 3)
            out["frac"] = round(a["roof"] / a["measured"], 3)
            out["mfu"] = round(a["flops_s"] / a["measured"], 3)
        return out

    roof = agg["decode"]["roof"] + agg["prefill"]["roof"]
    res = {"copy_bw_GBps": round(bw / 1e9, 1), "matmul_TFLOPps": round(rate / 1e12, 1),
           "weight_GB": round(cost.weight_bytes / 1e9, 3), "kv_bytes_per_token": cost.kv_bytes_per_token,
           "decode": phase(agg["decode"]), "prefill": phase(agg["prefill"]),
           "run": {"elapsed_s": round(elapsed, 3), "roofline_s": round(roof, 3),
                   "frac": round(roof / elapsed, 3) if elapsed > 0 else None}}
    if agg["decode"]["timed"] and agg["prefill"]["timed"]:
        in_steps = agg["decode"]["measured"] + agg["prefill"]["measured"]
        res["run"]["in_steps_s"] = round(in_steps, 3)
        res["run"]["host_outside_steps_s"] = round(elapsed - in_steps, 3)
    return res


def decode_step_roofline(cost: ModelCost, ceilings: dict, batch: int, context: int) -> float:
    """Seconds of one decode step of `batch` rows at `context` tokens each (memory floor)."""
    nbytes, flops = cost.step(batch, batch, batch * context, batch * context)
    return max(nbytes / ceilings["copy_bw"], flops / ceilings["matmul_rate"])


if __name__ == "__main__":
    import json

    print(json.dumps(measure_ceilings(), indent=1))
