"""Host side of sampling: each row's SamplingParams -> `SamplingMetadata` (numpy, fixed shapes),
and the static flags of a batch. Plain numpy; the device side is pagedjax/sampler.py.

Dims: R rows (padded to the step's bucket), L penalty tokens per row, B banned tokens per row,
G logit_bias tokens per row.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import numpy as np

from pagedjax.sampler import SampleFlags, SamplingMetadata
from pagedjax.sampling_params import SAMPLING_EPS, BeamSearchParams, SamplingParams

# The per-row scalar parameters: (SamplingParams field = SamplingMetadata field, dtype, neutral
# value). Padding rows and beam-search rows take the neutral values: greedy, nothing filtered,
# no penalty.
ROW_FIELDS: tuple[tuple[str, type, float], ...] = (
    ("temperature", np.float32, 0.0),
    ("top_k", np.int32, 0),
    ("top_p", np.float32, 1.0),
    ("min_p", np.float32, 0.0),
    ("presence_penalty", np.float32, 0.0),
    ("frequency_penalty", np.float32, 0.0),
    ("repetition_penalty", np.float32, 1.0),
)
_row_values = operator.attrgetter(*(name for name, _, _ in ROW_FIELDS))
_ROW_WIDTH = len(ROW_FIELDS) + 2
_NEUTRAL_ROW = np.array([*(neutral for _, _, neutral in ROW_FIELDS), 0, 0], np.float64).tobytes()


def _host_row(sp: SamplingParams | BeamSearchParams) -> bytes:
    """What a row's metadata takes from its params every step, worked out once per params object
    (they are frozen): the ROW_FIELDS values, the seed mod 2**32 (-1: none, drawn each step) and
    1 if the row has token lists, as float64 bytes (exact for these floats and ints), so that a
    step's rows become one array by joining bytes. Beam-search rows: the neutral values, seed 0,
    no lists."""
    row = sp.__dict__.get("_host_row")  # cached beside the fields, as functools.cached_property does
    if row is None:
        if isinstance(sp, BeamSearchParams):
            row = _NEUTRAL_ROW
        else:
            seed = -1 if sp.seed is None else sp.seed % 2**32
            row = np.array([*_row_values(sp), seed, sp.needs_token_lists], np.float64).tobytes()
        sp.__dict__["_host_row"] = row
    return row


def has_penalties(sp: SamplingParams | BeamSearchParams) -> bool:
    """Whether a row has a repetition, frequency or presence penalty."""
    return isinstance(sp, SamplingParams) and sp.has_penalties


def needs_token_history(sp: SamplingParams | BeamSearchParams) -> bool:
    """Whether a row's sampling reads its earlier tokens (penalties, bad words of several tokens)."""
    return isinstance(sp, SamplingParams) and sp.needs_token_history


def bad_word_bans(bad_words_token_ids: Sequence[Sequence[int]], output_token_ids: Sequence[int]) -> list[int]:
    """vLLM's bad words: a word's last token is banned when the output ends with the rest of it
    (a one-token word always)."""
    banned = []
    for word in bad_words_token_ids:
        prefix = len(word) - 1
        if prefix > len(output_token_ids):
            continue
        if prefix == 0 or list(output_token_ids[-prefix:]) == list(word[:-1]):
            banned.append(word[-1])
    return banned


def static_flags(meta: SamplingMetadata) -> SampleFlags:
    """The flags of numpy metadata: which parts of sampling some row uses."""
    random = bool(np.any(np.asarray(meta.temperature) >= SAMPLING_EPS))
    return SampleFlags(random=random, top_k=random and bool(np.any(np.asarray(meta.top_k) > 0)),
                       top_p=random and bool(np.any(np.asarray(meta.top_p) < 1)))


def make_sampling_metadata(
    sampling_params: Sequence[SamplingParams | BeamSearchParams],
    output_token_ids: Sequence[Sequence[int]],
    *,
    num_rows: int,
    prompt_token_ids: Sequence[Sequence[int]] | None = None,
    num_pending: Sequence[int] | None = None,
    eos_token_id: int | None = None,
    penalty_width: int | None = None,
    banned_width: int | None = None,
    bias_width: int | None = None,
    rng: np.random.Generator | None = None,
) -> SamplingMetadata:
    """Builds numpy `SamplingMetadata` for the rows' params, padded to `num_rows` greedy rows.

    Args:
      sampling_params: one per row; a BeamSearchParams row samples greedily with nothing banned
        (beam search picks its tokens from the row's top logprobs on the host).
      output_token_ids: each row's generated tokens so far (its step is their number).
      num_rows: R, the bucket; rows past len(sampling_params) are greedy padding.
      prompt_token_ids: each row's prompt; needed only by rows with repetition_penalty != 1.
      num_pending: per row, outputs sampled but not in output_token_ids yet (async scheduling):
        they count for the step and min_tokens; a row with penalties cannot have any.
      eos_token_id: banned with stop_token_ids while a row has fewer than min_tokens outputs
        (unless ignore_eos). Bad words (`_bad_words_token_ids`) are banned tokens too.
      penalty_width, banned_width, bias_width: L, B and G. None picks the smallest power of two >= 16 that fits,
        or 0 when no row needs it, so that few widths (compiled variants) ever occur.
      rng: draws a fresh seed every step for rows without one. Seeds are taken mod 2**32; the
        i-th of n samples has seed + i already (SamplingParams.for_sample).
    """
    n = len(sampling_params)
    if n > num_rows or len(output_token_ids) != n:
        raise ValueError(f"{n} params and {len(output_token_ids)} output lists for {num_rows} rows")
    rng = rng if rng is not None else _host_rng
    R = num_rows
    pending = list(num_pending) if num_pending is not None else [0] * n
    step_list = [len(out) + p for out, p in zip(output_token_ids, pending)]
    steps = np.zeros(R, np.int32)
    steps[:n] = step_list
    # Beam-search rows keep the neutral values: greedy, nothing banned.
    columns = {name: np.full(R, neutral, dtype) for name, dtype, neutral in ROW_FIELDS}
    seeds = np.zeros(R, np.uint32)
    listed: list[int] = []
    if n:
        table = np.frombuffer(b"".join([_host_row(sp) for sp in sampling_params]), np.float64).reshape(n, _ROW_WIDTH)
        for j, (name, dtype, _) in enumerate(ROW_FIELDS):
            columns[name][:n] = table[:, j].astype(dtype)
        seed_column = table[:, len(ROW_FIELDS)]
        unseeded = np.flatnonzero(seed_column < 0)
        seeds[:n] = np.maximum(seed_column, 0).astype(np.uint32)
        if unseeded.size:
            seeds[unseeded] = rng.integers(0, 2**32, size=unseeded.size)
        listed = np.flatnonzero(table[:, len(ROW_FIELDS) + 1]).tolist()
    # The rows with token lists (penalties, banned tokens, logit_bias): usually few or none.
    penalty_rows: dict[int, tuple[list[int], list[int]]] = {}  # row: (distinct prompt, output)
    banned_rows: dict[int, list[int]] = {}
    bias_rows: dict[int, dict[int, float]] = {}
    for r in listed:
        sp = sampling_params[r]
        out = output_token_ids[r]
        if pending[r] and sp.needs_token_history:
            raise ValueError("a row with penalties or bad words needs all its output tokens (none pending)")
        if sp.has_penalties:
            prompt: list[int] = []
            if sp.repetition_penalty != 1:
                if prompt_token_ids is None:
                    raise ValueError("repetition_penalty needs prompt_token_ids")
                prompt = sorted(set(prompt_token_ids[r]))
            penalty_rows[r] = (prompt, list(out))
        banned: list[int] = []
        if step_list[r] < sp.min_tokens:
            banned = list(sp.stop_token_ids)
            if eos_token_id is not None and not sp.ignore_eos:
                banned.append(eos_token_id)
        if sp._bad_words_token_ids:
            banned += bad_word_bans(sp._bad_words_token_ids, out)
        if banned:
            banned_rows[r] = banned
        if sp.logit_bias:
            bias_rows[r] = sp.logit_bias

    L = _width(max((len(p) + len(o) for p, o in penalty_rows.values()), default=0), penalty_width, "penalty")
    B = _width(max(map(len, banned_rows.values()), default=0), banned_width, "banned")
    G = _width(max(map(len, bias_rows.values()), default=0), bias_width, "bias")
    penalty_ids = np.full((R, L), -1, np.int32)
    num_prompt = np.zeros(R, np.int32)
    for r, (prompt, out) in penalty_rows.items():
        penalty_ids[r, : len(prompt) + len(out)] = prompt + out
        num_prompt[r] = len(prompt)
    banned_ids = np.full((R, B), -1, np.int32)
    for r, banned in banned_rows.items():
        banned_ids[r, : len(banned)] = banned
    bias_ids = np.full((R, G), -1, np.int32)
    bias_values = np.zeros((R, G), np.float32)
    for r, bias in bias_rows.items():
        bias_ids[r, : len(bias)] = list(bias)
        bias_values[r, : len(bias)] = list(bias.values())
    return SamplingMetadata(**columns, seeds=seeds, steps=steps, penalty_token_ids=penalty_ids,
                            num_prompt_tokens=num_prompt, banned_token_ids=banned_ids,
                            bias_token_ids=bias_ids, bias_values=bias_values)


_host_rng = np.random.default_rng()


def _width(needed: int, given: int | None, what: str) -> int:
    """The static width of a padded token list: `given`, or a power of two >= 16 (0 when unused)."""
    if given is not None:
        if given < needed:
            raise ValueError(f"{what}_width={given} but a row needs {needed}")
        return given
    return 0 if needed == 0 else max(16, 1 << (needed - 1).bit_length())
