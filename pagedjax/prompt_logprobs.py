"""Prompt logprobs (vLLM's `SamplingParams.prompt_logprobs`): each prompt token's logprob given
the tokens before it, its rank, and the top-k alternatives, computed inside the jitted step.

Dims: T tokens in the step (its bucket), E head input width, V vocab, Q = T scored rows (packed
first, then padding), C rows per chunk, k top logprobs (a static width).

The logits at position p predict token p + 1. A step that computes positions [c, c + n) of a
request whose prompt has P tokens scores the rows of positions c .. min(c + n, P - 1) - 1, which
give the entries of prompt positions c + 1 .. min(c + n, P - 1); position 0 has none (None, as
in vLLM). Only requests without output tokens ask: once the first token is sampled, every entry
is in (so a request resumed after preemption asks nothing again, and one preempted mid-prompt
recomputes rows whose entries the engine already has, and skips them). The scheduler does not
let such a request read the prefix cache (`Request.skip_reading_prefix_cache`), so every
position is computed at least once.

On device this is a second compiled variant of the step, used only on steps that score some
row (the static `num_prompt_logprobs`; steps without keep the usual variant): the model sows
the head input of every token (`all_hidden`), and `compute` scores the rows of `rows`.

Memory: the logits of every position would be T x V f32, 1 GiB at T = 2048, V = 128256. So the
scored rows are packed first and the head runs C rows at a time in a `lax.map`, C chosen so that
one chunk's logits are at most `CHUNK_ELEMENTS` (128 MiB; C = 256 rows at V = 128256); chunks
past the last scored row are skipped (`lax.cond`), so a step pays the head for the rows it
scores, rounded up to C; the other rows cost only the final norm (and its [T, E] output). The
variant is compiled on the first step that needs it, not at start-up. On a GPU the cond's
predicate is read back to the host, which waits for the forward there: a cost these steps alone
pay (the usual variant has none; tests/test_engine.py checks).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from pagedjax import sampler

CHUNK_ELEMENTS = 1 << 25  # logits computed at once: 128 MiB of f32


@struct.dataclass
class PromptLogprobsMetadata:
    """Which token rows of the step to score, packed first (numpy from `plan`, or device)."""

    rows: jax.Array  # [Q] i32       token rows of the flat batch; pads repeat row 0
    target_ids: jax.Array  # [Q] i32 the prompt token each row predicts (0 pads)
    num_rows: jax.Array  # [1] i32   rows[:num_rows[0]] are real; chunks past them are skipped


@dataclass
class Span:
    """The scored rows of one request of the step (host)."""

    batch_row: int  # the request's index in the step's batch
    first: int  # its first row in the packed order (of `rows` and the outputs)
    position: int  # the prompt position of that row's entry (token position + 1)
    count: int


@dataclass
class Plan:
    """A step's prompt-logprob inputs (host): the metadata, its spans and the static width."""

    metadata: PromptLogprobsMetadata
    spans: list[Span]
    num_logprobs: int  # k: the width of the top logprobs computed (>= 1, so ranks are too)


@dataclass
class ScoredPrompts:
    """What came back (host): per packed row, the prompt token's logprob, rank and top-k."""

    spans: list[Span]
    logprobs: np.ndarray  # [Q] f32
    ranks: np.ndarray  # [Q] i32
    top_logprobs: np.ndarray  # [Q, k] f32, descending
    top_token_ids: np.ndarray  # [Q, k] i32


def plan(batch: Sequence[Any], num_tokens: int) -> Plan | None:
    """The rows to score in a step of `batch` (ScheduledRequests) padded to `num_tokens`, or None if none.

    A request asks when its sampling_params.prompt_logprobs is set and it has no output token.
    """
    asks = [getattr(req.sampling_params, "prompt_logprobs", None) for req in batch]
    if all(k is None for k in asks):  # the usual step: nobody asks
        return None
    rows, targets, spans, width = [], [], [], 0
    t = 0
    for b, (req, k) in enumerate(zip(batch, asks)):
        n, c = len(req.token_ids), req.num_computed_tokens
        prompt = req.prompt_token_ids
        end = min(c + n, len(prompt) - 1)  # the last prompt token predicts an output, not the prompt
        if k is not None and not req.output_token_ids and end > c:
            spans.append(Span(b, len(rows), c + 1, end - c))
            rows.extend(range(t, t + end - c))
            targets.extend(prompt[c + 1:end + 1])
            width = max(width, k)
        t += n
    if not spans:
        return None
    Q = num_tokens
    meta = PromptLogprobsMetadata(
        rows=np.pad(np.asarray(rows, np.int32), (0, Q - len(rows))),
        target_ids=np.pad(np.asarray(targets, np.int32), (0, Q - len(targets))),
        num_rows=np.asarray([len(rows)], np.int32),
    )
    return Plan(meta, spans, num_logprobs=1 << max(width - 1, 0).bit_length())  # 1, 2, 4, 8, ...


def compute(head: Callable[[jax.Array], jax.Array], hidden: jax.Array, meta: PromptLogprobsMetadata, *,
            num_logprobs: int, chunk_rows: int | None = None) -> sampler.SamplerOutput:
    """Scores the rows of `meta` (inside the jitted step); returns a SamplerOutput over Q rows.

    Args:
      head: head inputs [C, E] -> logits [C, V] f32 (a pure function: it runs inside lax.map).
      hidden: the head input of every token of the step, [T, E].
      num_logprobs: k, static; >= 1 so that ranks are computed.
      chunk_rows: C (default: as many rows as CHUNK_ELEMENTS logits allow, at most Q).
    Returns:
      token_ids [Q] (the targets), logprobs [Q], ranks [Q], top_logprobs / top_token_ids [Q, k];
      rows past num_rows (rounded up to C) are zeros.
    """
    Q = meta.rows.shape[0]
    V = jax.eval_shape(head, jax.ShapeDtypeStruct((1, hidden.shape[1]), hidden.dtype)).shape[1]
    C = min(chunk_rows or max(CHUNK_ELEMENTS // V, 1), Q)
    num_chunks = -(-Q // C)
    pad = num_chunks * C - Q
    x = hidden[jnp.pad(meta.rows, (0, pad))].reshape(num_chunks, C, -1)  # [Q/C, C, E]
    targets = jnp.pad(meta.target_ids, (0, pad)).reshape(num_chunks, C)  # [Q/C, C]
    starts = jnp.arange(num_chunks, dtype=jnp.int32) * C

    def score(xc, tc):  # [C, E], [C] -> the chunk's SamplerOutput
        return sampler.compute_logprobs(head(xc), tc, num_logprobs=num_logprobs)

    def one_chunk(args):
        xc, tc, start = args
        skipped = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(score, xc, tc))
        return lax.cond(start < meta.num_rows[0], score, lambda *_: skipped, xc, tc)

    out = lax.map(one_chunk, (x, targets, starts))  # leaves [Q/C, C, ...]
    return jax.tree.map(lambda a: a.reshape(num_chunks * C, *a.shape[2:])[:Q], out)


# ------------------------------------------------------------------------------ runner glue


def fetch(scored: sampler.SamplerOutput | None, spans: list[Span] | None) -> ScoredPrompts | None:
    """The scored rows of a step (the step's `scored` output) on the host; None on steps that scored none."""
    if spans is None or scored is None:
        return None
    p = scored
    return ScoredPrompts(spans, *jax.device_get((p.logprobs, p.ranks, p.top_logprobs, p.top_token_ids)))
