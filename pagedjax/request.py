"""Per-request host state (`Request`) and what the engine returns (`RequestOutput`), host only.

A request is two counters over one token list (vLLM V1): `num_computed_tokens` tokens have their
K/V in the pages of `block_table`; `num_tokens` = prompt + outputs are known. A prefill chunk,
a decode step and a recompute after preemption are all "compute the tokens between the two".
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pagedjax.sampling_params import BeamSearchParams, SamplingParams


class RequestStatus(enum.IntEnum):
    """Where a request is; every FINISHED_* status maps to one `finish_reason`."""

    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()  # waiting again, its pages given back; resumes by recompute, or by swap-in
    FINISHED_STOPPED = enum.auto()  # EOS, a stop token or a stop string
    FINISHED_LENGTH_CAPPED = enum.auto()  # max_tokens or max_model_len
    FINISHED_ABORTED = enum.auto()
    FINISHED_ERROR = enum.auto()

    @property
    def is_finished(self) -> bool:
        return self > RequestStatus.PREEMPTED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)

    @staticmethod
    def from_finish_reason(reason: str) -> RequestStatus:
        for status, name in _FINISH_REASONS.items():
            if name == reason:
                return status
        raise ValueError(f"finish reason must be one of {sorted(_FINISH_REASONS.values())}, got {reason!r}.")


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH_CAPPED: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass
class RequestMetrics:
    """Timestamps of one request (time.time() seconds), vLLM's names."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


@dataclass(eq=False)
class Request:
    """One sequence being generated: its tokens, its pages, its two counters."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams | BeamSearchParams = field(default_factory=SamplingParams)
    eos_token_id: int | None = None
    arrival_time: float = field(default_factory=time.time)
    prompt: str | None = None
    parent_id: str | None = None  # n > 1: the user's request id; this is its sample `index`
    index: int = 0

    status: RequestStatus = field(default=RequestStatus.WAITING, init=False)
    output_token_ids: list[int] = field(default_factory=list, init=False, repr=False)
    num_computed_tokens: int = field(default=0, init=False)  # tokens whose K/V are in block_table
    # Async scheduling: tokens sampled by a step still running, counted in num_tokens (their ids
    # are not known yet; the next step reads them on device). At most 2: one per step in flight.
    num_pending: int = field(default=0, init=False)
    block_table: list[int] = field(default_factory=list, init=False, repr=False)  # page ids
    # Preempted by swap: the host slots holding its first pages, in order (kv_cache/swap.py);
    # num_computed_tokens is kept and it resumes from there. Empty otherwise.
    swapped_slots: list[int] = field(default_factory=list, init=False, repr=False)
    num_cached_tokens: int = field(default=-1, init=False)  # tokens reused (prefix cache, fork); -1: not yet run
    stop_reason: int | str | None = field(default=None, init=False)  # the stop token or string
    num_preemptions: int = field(default=0, init=False)
    max_tokens: int | None = field(default=None, init=False)  # resolved by the scheduler
    page_hashes: list[bytes] = field(default_factory=list, init=False, repr=False)  # of full pages
    # Parallel sampling / beam search: share the first `fork_num_tokens` tokens' pages of
    # `fork_source` when admitted (if it has computed them), instead of computing them again.
    fork_source: Request | None = field(default=None, init=False, repr=False)
    fork_num_tokens: int = field(default=0, init=False, repr=False)
    metrics: RequestMetrics = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.prompt_token_ids = list(self.prompt_token_ids)
        self._all_token_ids = list(self.prompt_token_ids)
        self.max_tokens = self.sampling_params.max_tokens
        self.metrics = RequestMetrics(arrival_time=self.arrival_time)

    # -- tokens
    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids) + self.num_pending

    def token_ids_between(self, start: int, end: int) -> list[int]:
        """Tokens at positions [start, end); a pending one (not sampled yet) is -1."""
        known = self._all_token_ids[start:end]
        return known + [-1] * (end - max(start, len(self._all_token_ids)))

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt then outputs (the request's own list: read, do not modify)."""
        return self._all_token_ids

    def append_output_token_ids(self, token_ids: int | list[int]) -> None:
        if isinstance(token_ids, int):
            self.output_token_ids.append(token_ids)
            self._all_token_ids.append(token_ids)
        else:
            self.output_token_ids.extend(token_ids)
            self._all_token_ids.extend(token_ids)

    def replace_last_output_token(self, token_id: int) -> None:
        """Beam search: swap the last sampled token (its K/V is not written yet)."""
        if not self.output_token_ids or self.num_computed_tokens >= self.num_tokens:
            raise ValueError(f"request {self.request_id}: no uncomputed output token to replace")
        self.output_token_ids[-1] = token_id
        self._all_token_ids[-1] = token_id

    # -- stop rules, from whichever params type the request has
    @property
    def min_tokens(self) -> int:
        return self.sampling_params.min_tokens

    @property
    def ignore_eos(self) -> bool:
        return self.sampling_params.ignore_eos

    @property
    def stop_token_ids(self) -> list[int]:
        return self.sampling_params.stop_token_ids

    @property
    def skip_reading_prefix_cache(self) -> bool:
        """A request that wants prompt logprobs computes its whole prompt (vLLM's rule): cached
        pages would skip positions. Once it has an output token every entry is in, and it may."""
        return getattr(self.sampling_params, "prompt_logprobs", None) is not None and not self.output_token_ids

    def check_stop(self, max_model_len: int) -> bool:
        """Applies vLLM's stop rules to the last output token; sets the status and returns True if finished.

        EOS (unless ignore_eos) and stop_token_ids count once min_tokens are out; then max_tokens
        and max_model_len. Stop strings are the detokenizer's.
        """
        outputs, sp = self.output_token_ids, self.sampling_params
        last, num_outputs = outputs[-1], len(outputs)
        if num_outputs >= sp.min_tokens:
            if last == self.eos_token_id and not sp.ignore_eos:
                self.status = RequestStatus.FINISHED_STOPPED
                return True
            if last in sp.stop_token_ids:
                self.status = RequestStatus.FINISHED_STOPPED
                self.stop_reason = last
                return True
        if num_outputs >= self.max_tokens or len(self._all_token_ids) >= max_model_len:
            self.status = RequestStatus.FINISHED_LENGTH_CAPPED
            return True
        return False

    def make_samples(self, num_sequences: int) -> list[Request]:
        """The n > 1 samples "{i}_{request_id}": sample 0 computes the prompt, the others share it.

        Each sample has n=1 and seed + i (vLLM's rule). Samples 1.. take the pages of the prompt
        but its last token from sample 0 once it has computed them (the scheduler's fork), and
        compute that last token themselves, whose logits they each sample from.
        """
        samples = []
        for i in range(num_sequences):
            sample = Request(
                f"{i}_{self.request_id}", self.prompt_token_ids, self.sampling_params.for_sample(i),
                self.eos_token_id, self.arrival_time, self.prompt, parent_id=self.request_id, index=i,
            )  # fmt: skip
            sample.max_tokens = self.max_tokens
            if i > 0 and self.num_prompt_tokens > 1:
                sample.fork_source, sample.fork_num_tokens = samples[0], self.num_prompt_tokens - 1
            samples.append(sample)
        return samples

    # -- status
    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.finish_reason

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, {self.status.name}, prompt={self.num_prompt_tokens}, "
            f"outputs={self.num_output_tokens}, computed={self.num_computed_tokens}, "
            f"pages={len(self.block_table)})"
        )


@dataclass
class Logprob:
    """The logprob of one token, with its rank in the vocabulary and its text (vLLM's)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


def logprob_entry(token_id: int, logprob: float, rank: int | None, top_token_ids: Sequence[int] = (),
                  top_logprobs: Sequence[float] = (), decode: Callable[[int], str] | None = None
                  ) -> dict[int, Logprob]:
    """One position's logprobs as vLLM returns them: the chosen (or prompt) token first, then the
    top alternatives ranked 1, 2, ... (a token already listed keeps its entry)."""
    entry = {token_id: Logprob(logprob, rank)}
    for j, (t, lp) in enumerate(zip(top_token_ids, top_logprobs)):
        entry.setdefault(int(t), Logprob(float(lp), j + 1))
    if decode is not None:
        for t, lp in entry.items():
            lp.decoded_token = decode(t)
    return entry


@dataclass
class CompletionOutput:
    """One generated sequence of a request (vLLM's `CompletionOutput`)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None  # per output token: token id -> Logprob
    finish_reason: str | None = None  # "stop", "length", "abort" or "error"; None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """What the engine returns for one request (vLLM's `RequestOutput`)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    num_cached_tokens: int | None = None  # prompt tokens served from the prefix cache
