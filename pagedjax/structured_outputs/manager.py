"""The engine's side of constrained decoding: per-sample grammar matchers, reasoning trackers and
allowed-token rows; each step's bitmask; the sampled tokens fed back (host only).

Dims: R rows of the step (padded to its bucket), V the model's vocab, W = ceil(V / 32) int32
words per row (bit j of word w = token 32*w + j, set = allowed).

At add_request (`check`, then `add_request`): token ids are checked against the model's vocab,
bad words become token ids, the grammar is compiled (cached; a bad one is a ValueError before
anything is queued), and each sample (n > 1, best_of) gets its own matcher and, with a reasoning
parser, its own tracker: the grammar then applies from the token after the reasoning ends.
allowed_token_ids is one fixed row, ANDed into the grammar's.

Per step with a constrained row: `bitmask(rows, R)` [R, W] before sampling (all ones on the other
rows), then `accept(request, token)` for each sampled token, which says when the request must
end: "stop" once its grammar is complete (EOS is all it could add), "error" when it cannot
continue (a work limit hit, or no token allowed).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pagedjax.reasoning import ReasoningTracker, get_reasoning_parser
from pagedjax.request import Request
from pagedjax.sampling_params import SamplingParams
from pagedjax.structured_outputs.backend import CompiledGrammar, CompileLimits, GrammarCompiler
from pagedjax.structured_outputs.matcher import GrammarMatcher
from pagedjax.structured_outputs.params import StructuredOutputsParams


@dataclass
class _Sample:
    """One constrained sample's state."""

    request: Request
    matcher: GrammarMatcher | None  # None: allowed_token_ids only
    tracker: ReasoningTracker | None  # with a reasoning parser: where the grammar starts
    allowed: np.ndarray | None  # [W] i32, allowed_token_ids (shared by a request's samples)
    error: str | None = None  # found while building its row: ends it at its next token


class StructuredOutputManager:
    """Constrained samples of one engine, keyed by scheduler request id (a sample)."""

    def __init__(self, tokenizer: Any, vocab_size: int, *, reasoning_parser: str | None = None,
                 enable_in_reasoning: bool = False, limits: CompileLimits = CompileLimits()):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the model's (logits) vocab: >= the tokenizer's
        self.width = (vocab_size + 31) // 32  # W
        self.limits = limits
        self._compiler: GrammarCompiler | None = None
        self._lock = threading.Lock()  # the server compiles on worker threads, the engine on its own
        self._reasoning = None
        if reasoning_parser is not None and not enable_in_reasoning:
            self._reasoning = get_reasoning_parser(reasoning_parser)(tokenizer)
            self._reasoning.start_token_id, self._reasoning.end_token_id  # noqa: B018 (ValueError now, not per request)
        self._samples: dict[str, _Sample] = {}

    @property
    def active(self) -> bool:
        """Whether any unfinished sample is constrained (else a step needs no look at its rows)."""
        return bool(self._samples)

    @property
    def compiler(self) -> GrammarCompiler:
        """The grammar compiler for the tokenizer, built on first use (llguidance's tokenizer: ~1 s)."""
        with self._lock:
            if self._compiler is None:
                if self.tokenizer is None:
                    raise ValueError("structured outputs need a tokenizer; this model has none")
                self._compiler = GrammarCompiler(self.tokenizer, self.vocab_size, limits=self.limits)
            return self._compiler

    def compile(self, constraint: StructuredOutputsParams) -> CompiledGrammar:
        """The compiled grammar (cached by its canonical text); ValueError for a bad constraint.
        Thread-safe: the server calls it off the engine's thread, so add_request finds it cached."""
        return self.compiler.compile(constraint)

    # -- requests in and out -------------------------------------------------------------------

    def check(self, params: SamplingParams) -> tuple[SamplingParams, CompiledGrammar | None]:
        """Checks a request's token controls against the vocabulary and compiles its grammar;
        returns the params with bad words as token ids, and the grammar (None if none)."""
        V = self.vocab_size
        if params.logit_bias:
            bad = sorted(t for t in params.logit_bias if t >= V)
            if bad:
                raise ValueError(f"logit_bias has token ids {bad[:10]} outside the vocabulary [0, {V})")
        if params.allowed_token_ids is not None and any(t >= V for t in params.allowed_token_ids):
            bad = sorted(t for t in params.allowed_token_ids if t >= V)
            raise ValueError(f"allowed_token_ids has token ids {bad[:10]} outside the vocabulary [0, {V})")
        if params.bad_words:
            if self.tokenizer is None:
                raise ValueError("bad_words need a tokenizer; this model has none")
            params = params.update_from_tokenizer(self.tokenizer)
        if params._bad_words_token_ids and any(t >= V for w in params._bad_words_token_ids for t in w):
            raise ValueError(f"bad_words tokenize to ids outside the vocabulary [0, {V})")
        grammar = None if params.structured_outputs is None else self.compile(params.structured_outputs)
        return params, grammar

    def add_request(self, samples: Sequence[Request], grammar: CompiledGrammar | None) -> None:
        """Tracks the samples of a checked request (nothing if it is unconstrained)."""
        allowed_ids = samples[0].sampling_params.allowed_token_ids
        if grammar is None and allowed_ids is None:
            return
        allowed = None if allowed_ids is None else token_row(allowed_ids, self.width)
        for req in samples:
            matcher = tracker = None
            if grammar is not None:
                matcher = grammar.new_matcher()
                if self._reasoning is not None:
                    tracker = ReasoningTracker(self._reasoning, req.prompt_token_ids)
            self._samples[req.request_id] = _Sample(req, matcher, tracker, allowed)

    def remove(self, request_ids: Iterable[str]) -> None:
        """Forgets finished or aborted samples."""
        for rid in request_ids:
            self._samples.pop(rid, None)

    # -- one step ------------------------------------------------------------------------------

    def _row_states(self, rows: Sequence[Any]) -> list[tuple[int, _Sample]]:
        states = []
        for r, s in enumerate(rows):
            st = self._samples.get(s.request_id) if s.sample else None
            if st is not None and not st.request.is_finished:
                states.append((r, st))
        return states

    def needs_bitmask(self, rows: Sequence[Any]) -> bool:
        """Whether a step's sampling rows include a constrained one."""
        return self.active and bool(self._row_states(rows))

    def needs_sampled_tokens(self, rows: Sequence[Any]) -> bool:
        """Whether a step's bitmask depends on the tokens sampled so far (a grammar row): it is
        built only once the previous step's tokens have been accepted."""
        return self.active and any(st.matcher is not None for _, st in self._row_states(rows))

    def bitmask(self, rows: Sequence[Any], num_rows: int) -> np.ndarray:
        """The step's allowed tokens, [num_rows, W] i32: each constrained sampling row's, all
        ones elsewhere (padding, prefill chunks, unconstrained rows)."""
        W = self.width
        grammar_rows, allowed_rows = [], []
        for r, st in self._row_states(rows):
            if st.matcher is not None and (st.tracker is None or st.tracker.constrained):
                grammar_rows.append((r, st))
            elif st.allowed is not None:
                allowed_rows.append((r, st))
        # The grammar's rows span the tokenizer's ids too, which a model may have fewer of.
        cut = grammar_rows and self.compiler.bitmask_width > W
        mask = np.full((num_rows, self.compiler.bitmask_width if cut else W), -1, np.int32)  # [R, W(+)]
        for r, st in allowed_rows:
            mask[r, :W] = st.allowed
        if grammar_rows:
            self.compiler.fill_bitmasks([(st.matcher, r) for r, st in grammar_rows], mask)
        for r, st in grammar_rows:
            if st.matcher.is_stuck and st.error is None:  # its row allows EOS only: not a valid end
                st.error = f"the output constraint cannot continue: {st.matcher.error}"
            if st.tracker is not None:
                st.tracker.allow_start_token(mask, r)
            if st.allowed is not None:
                mask[r, :W] &= st.allowed
            if (cut or st.allowed is not None) and not mask[r, :W].any():
                st.error = st.error or ("no token of the model's vocabulary is allowed by the output constraint"
                                        + (" and allowed_token_ids" if st.allowed is not None else ""))
                mask[r, :W] = -1 if st.allowed is None else st.allowed  # a finite row; it ends at this token
        return np.ascontiguousarray(mask[:, :W]) if cut else mask

    def accept(self, req: Request, token_id: int) -> tuple[str, str | None] | None:
        """Feeds a sampled token to the sample's grammar; (finish_reason, stop_reason) if the
        request must end now: ("stop", None) for a complete grammar, ("error", why) if stuck."""
        st = self._samples.get(req.request_id)
        if st is None or st.matcher is None:
            return None
        if st.error is not None:
            return "error", st.error
        if st.tracker is not None and not st.tracker.update(token_id):
            return None  # reasoning: not the grammar's
        if not st.matcher.accept_token(token_id):
            st.error = f"the output constraint cannot continue: {st.matcher.error}"
            return "error", st.error
        return ("stop", None) if st.matcher.is_finished else None


def token_row(token_ids: Sequence[int], width: int) -> np.ndarray:
    """A [width] i32 bitmask row with the bits of `token_ids` set."""
    ids = np.asarray(token_ids, np.int64)
    row = np.zeros(width, np.uint32)
    np.bitwise_or.at(row, ids >> 5, (np.uint32(1) << (ids & 31).astype(np.uint32)))
    return row.view(np.int32)
