"""Attention metadata for one ragged step, and a host helper that builds it from lists.

Dims: T tokens in the flat batch, R requests, M max pages per request, S positions whose
logits are needed.

Request r owns the flat tokens [query_start_loc[r], query_start_loc[r+1]). Token j of its
query (0-based) sits at position seq_lens[r] - q_len_r + j and attends causally to positions
0..its own position of that request: the tokens cached by earlier steps and this step's own.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import struct


@struct.dataclass
class AttentionMetadata:
    """Where each token of the flat batch sits and which pages each request reads; all int32."""

    positions: jax.Array  # [T] position of each token in its sequence (padding tokens: 0)
    slot_mapping: jax.Array  # [T] pool slot page * page_size + offset (padding: distinct, >= P * page_size)
    block_tables: jax.Array  # [R, M] page ids per request; padded entries point at the null page 0
    seq_lens: jax.Array  # [R] context length including this step's tokens (padded requests: 0)
    query_start_loc: jax.Array  # [R+1] cumulative query lengths; padded requests repeat the last value
    logits_indices: jax.Array  # [S] flat token indices whose logits the model returns


def build_metadata(
    query_lens: Sequence[int],
    seq_lens: Sequence[int],
    block_tables: Sequence[Sequence[int]],
    *,
    page_size: int,
    num_pages: int,
    num_tokens: int | None = None,
    num_reqs: int | None = None,
    max_pages: int | None = None,
    logits_indices: Sequence[int] | None = None,
) -> AttentionMetadata:
    """Builds padded metadata (numpy int32) from per-request host lists, for tests and tools.

    Args:
      query_lens: new tokens of each request in this step.
      seq_lens: context length of each request including this step's tokens.
      block_tables: page ids of each request, in position order.
      num_tokens / num_reqs / max_pages: pad T, R and M up to these (default: no padding).
      logits_indices: flat token indices to return logits for (default: each request's last token).
    """
    if not (len(query_lens) == len(seq_lens) == len(block_tables)):
        raise ValueError("build_metadata: query_lens, seq_lens and block_tables differ in length")
    n_real = sum(query_lens)
    T = n_real if num_tokens is None else num_tokens
    R = len(query_lens) if num_reqs is None else num_reqs
    M = max(max((len(b) for b in block_tables), default=1), 1) if max_pages is None else max_pages
    if T < n_real or R < len(query_lens) or M < max((len(b) for b in block_tables), default=0):
        raise ValueError(f"build_metadata: padding ({T=}, {R=}, {M=}) is smaller than the batch")

    positions = np.zeros(T, np.int32)
    # padding tokens get distinct out-of-range slots, dropped by the write (never -1: it wraps)
    slot_mapping = np.arange(num_pages * page_size, num_pages * page_size + T, dtype=np.int32)
    tables = np.zeros((R, M), np.int32)  # page 0 is the null page
    lens = np.zeros(R, np.int32)
    starts = np.full(R + 1, n_real, np.int32)
    start = 0
    for r, (q_len, s_len, table) in enumerate(zip(query_lens, seq_lens, block_tables)):
        if not 0 < q_len <= s_len or s_len > len(table) * page_size:
            raise ValueError(f"build_metadata: request {r} has q_len {q_len}, seq_len {s_len}, "
                             f"{len(table)} pages of {page_size}")
        tables[r, : len(table)] = table
        lens[r] = s_len
        starts[r] = start
        pos = np.arange(s_len - q_len, s_len)
        positions[start : start + q_len] = pos
        slot_mapping[start : start + q_len] = tables[r, pos // page_size] * page_size + pos % page_size
        start += q_len
    if logits_indices is None:
        logits_indices = [int(starts[r + 1]) - 1 for r in range(len(query_lens))]
    return AttentionMetadata(
        positions=positions,
        slot_mapping=slot_mapping,
        block_tables=tables,
        seq_lens=lens,
        query_start_loc=starts,
        logits_indices=np.asarray(logits_indices, np.int32),
    )
