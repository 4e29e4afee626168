"""Beam search as a decoding mode of the engine: the per-request beam bookkeeping (host only).

A request with `BeamSearchParams` is a group of W beams. Each live beam is a scheduler request
"beam{k}_{request_id}"; beams share pages by reference count. Every step each live beam runs one
row, the runner returns the row's top logprobs (raw log_softmax), and `advance()` picks the next
beams exactly as transformers' `_beam_search` (5.x) does for one prompt:

  candidates  the best K = max(2, 1 + #stop tokens) * W (beam, token) pairs by cumulative logprob;
              stop tokens (EOS unless ignore_eos, and stop_token_ids) are banned before min_tokens
  finished    those among the first W that end in a stop token, or reach max_tokens, become
              hypotheses scored cum_logprob / n ** length_penalty, n = generated tokens (the stop
              token included, the prompt not); the best W hypotheses are kept
  running     the best W candidates that did not finish: a beam's first continuation keeps its
              request, the others fork it (`Scheduler.fork_request`: all pages shared, the partial
              last page copy-on-write); a beam with no continuation is freed
  done        every candidate finished (max_tokens); or early_stopping=True and W hypotheses
              exist; or W exist and the best running beam cannot beat the worst of them:
              cum_logprob / L ** length_penalty <= worst, L = max_tokens with early_stopping="never"
              and length_penalty > 0, else n (HF's heuristic)

The result is the W hypotheses, best score first, each with its tokens' logprobs (vLLM's: per
token, the token's and the 2W most likely of its row, with their ranks). Beams advance in lockstep: a group picks its
next beams once every live beam has the candidates of its current row, so a beam preempted (or
held back by max_num_seqs) catches up while the others wait, keeping their pages.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from pagedjax.detokenizer import IncrementalDetokenizer
from pagedjax.request import CompletionOutput, Logprob, Request, RequestOutput, RequestStatus, logprob_entry
from pagedjax.sampling_params import BeamSearchParams
from pagedjax.scheduler import Scheduler, SchedulerOutput


@dataclass
class BeamSearchSequence:
    """One hypothesis of `LLM.beam_search` (vLLM's): `tokens` holds the prompt's and its own, and
    `text` is all of them decoded, special tokens kept, as vLLM's LLM.beam_search returns it;
    `logprobs` has one entry per generated token: its logprob and the 2 * beam_width most likely
    tokens' at that step, ranked."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class BeamSearchOutput:
    """`LLM.beam_search`'s result for one prompt: the beam_width hypotheses, best score first."""

    sequences: list[BeamSearchSequence]


@dataclass
class _Beam:
    """One live beam: its tokens and, while it holds pages, its scheduler request."""

    tokens: list[int]  # output tokens
    cum_logprob: float
    request: Request | None  # None: pages given back; a continuation computes its context again
    candidates: list[tuple[int, float]] | None = None  # (token, logprob) of its latest row, best first
    rows: list[list[tuple[int, float]]] = field(default_factory=list)  # the candidates each token came from


@dataclass
class _Hypothesis:
    """A finished sequence and its HF score."""

    score: float  # cum_logprob / len(tokens) ** length_penalty
    tokens: list[int]
    cum_logprob: float
    finish_reason: str
    stop_reason: int | None = None
    rows: list[list[tuple[int, float]]] = field(default_factory=list)  # as _Beam.rows


@dataclass(frozen=True)
class _Candidate:
    cum_logprob: float
    beam: int  # index of the beam it extends
    token: int


@dataclass
class _Group:
    """One beam-search request."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: BeamSearchParams
    stop_token_ids: frozenset[int]
    num_candidates: int  # K
    first: Request  # beam 0: the prompt's prefill, metrics
    beams: list[_Beam] = field(default_factory=list)
    finished: list[_Hypothesis] = field(default_factory=list)  # best first, at most W
    num_requests: int = 1  # ids handed out: beam{k}_{request_id}

    def next_id(self) -> str:
        self.num_requests += 1
        return f"beam{self.num_requests - 1}_{self.request_id}"


class BeamSearch:
    """The engine's beam-search groups; the engine calls add / take_rows / advance / abort."""

    def __init__(self, scheduler: Scheduler, *, eos_token_id: int | None, vocab_size: int,
                 tokenizer: Any = None):
        self.scheduler = scheduler
        self.eos_token_id = eos_token_id
        self.vocab_size = vocab_size
        self.tokenizer = tokenizer
        self._groups: dict[str, _Group] = {}
        self._beam_of: dict[str, tuple[_Group, _Beam]] = {}  # scheduler request id -> its beam

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._groups

    def __len__(self) -> int:
        return len(self._groups)

    # -- requests in and out -----------------------------------------------------------------

    def add(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
            params: BeamSearchParams) -> None:
        """Queues beam 0 (the prompt); raises ValueError, touching nothing, if it can never run."""
        if params.temperature != 0:
            raise ValueError(f"beam search is deterministic (HF's): temperature must be 0, got {params.temperature}")
        V = self.vocab_size
        if any(t >= V for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids must be < the vocabulary size {V}, got {params.stop_token_ids}")
        stop = set(params.stop_token_ids)
        if self.eos_token_id is not None and not params.ignore_eos:
            stop.add(self.eos_token_id)
        K = max(2, 1 + len(stop)) * params.beam_width
        if K + len(stop) > V:
            raise ValueError(f"beam_width {params.beam_width} needs {K + len(stop)} candidate tokens "
                             f"per beam, more than the vocabulary's {V}")
        first = Request(f"beam0_{request_id}", prompt_token_ids, params, eos_token_id=self.eos_token_id,
                        prompt=prompt, parent_id=request_id)
        self.scheduler.add_request(first)  # raises for a prompt that cannot fit
        group = _Group(request_id, prompt, list(prompt_token_ids), params, frozenset(stop), K, first)
        group.beams.append(_Beam([], 0.0, first))
        self._groups[request_id] = group
        self._beam_of[first.request_id] = (group, group.beams[0])

    def abort(self, request_id: str) -> RequestOutput:
        """Frees every beam now; the output holds the best sequences so far, finish_reason "abort"."""
        group = self._groups[request_id]
        self.scheduler.abort_request(request_id)  # every beam registered under the group's id
        best = group.finished + [
            _Hypothesis(b.cum_logprob / max(len(b.tokens), 1) ** group.params.length_penalty,
                        b.tokens, b.cum_logprob, "abort", rows=b.rows) for b in group.beams]
        best.sort(key=lambda h: -h.score)
        return self._finish(group, best[: group.params.beam_width])

    # -- one step ----------------------------------------------------------------------------

    def num_logprobs(self, sched: SchedulerOutput) -> int:
        """Top logprobs per row the step must return for its beam rows (0: none samples)."""
        width = 0
        for s in sched.scheduled:
            if s.sample and s.request_id in self._beam_of:
                group = self._beam_of[s.request_id][0]
                width = max(width, group.num_candidates + len(group.stop_token_ids))
        return width

    def take_rows(self, sched: SchedulerOutput, out: Any) -> set[str]:
        """Keeps each beam row's top tokens, and returns those rows' request ids: the beams' next
        tokens come from `advance`, so the scheduler appends none for them (`external`)."""
        taken = set()
        for i, s in enumerate(sched.scheduled):
            if s.sample and s.request_id in self._beam_of:
                beam = self._beam_of[s.request_id][1]
                beam.candidates = list(zip(out.top_token_ids[i].tolist(), out.top_logprobs[i].tolist()))
                taken.add(s.request_id)
        return taken

    def advance(self) -> list[RequestOutput]:
        """After update_from_output: every group whose live beams all have candidates takes a beam
        step (HF's rules); returns the outputs of the groups that finished."""
        outputs = []
        now = time.time()
        for group in list(self._groups.values()):
            if all(b.candidates is not None for b in group.beams):
                metrics = group.first.metrics
                metrics.first_token_time = metrics.first_token_time or now
                metrics.last_token_time = now
                if self._step(group):
                    outputs.append(self._finish(group, group.finished))
        return outputs

    def release_waiting(self) -> bool:
        """Nothing could be scheduled: gives back the pages of beams that wait for a sibling (one
        preempted and out of pages); their continuations compute their context again. Returns
        whether any page was released."""
        released = False
        for group in self._groups.values():
            for beam in group.beams:
                req = beam.request
                if beam.candidates is not None and req is not None and req.status == RequestStatus.RUNNING:
                    self._drop(req)
                    beam.request = None
                    released = True
        return released

    # -- HF's beam step ----------------------------------------------------------------------

    def _step(self, group: _Group) -> bool:
        """One beam step of `group`; returns True when the search is done."""
        p, W, K = group.params, group.params.beam_width, group.num_candidates
        n = len(group.beams[0].tokens) + 1  # generated tokens after this step
        banned = group.stop_token_ids if n - 1 < p.min_tokens else frozenset()
        candidates = sorted(
            (_Candidate(beam.cum_logprob + lp, b, tok)
             for b, beam in enumerate(group.beams) for tok, lp in beam.candidates if tok not in banned),
            key=lambda c: -c.cum_logprob)[:K]  # stable: ties keep beam order, then the row's order
        hits = [c.token in group.stop_token_ids or n >= p.max_tokens for c in candidates]
        for c, hit in zip(candidates[:W], hits):  # only the first W may finish
            if hit:
                reason = "stop" if c.token in group.stop_token_ids else "length"
                stop_reason = c.token if reason == "stop" and c.token in p.stop_token_ids else None
                beam = group.beams[c.beam]
                group.finished.append(_Hypothesis(
                    c.cum_logprob / n ** p.length_penalty, beam.tokens + [c.token],
                    c.cum_logprob, reason, stop_reason, beam.rows + [beam.candidates]))
        group.finished.sort(key=lambda h: -h.score)  # stable: earlier hypotheses win ties
        del group.finished[W:]
        running = [c for c, hit in zip(candidates, hits) if not hit][:W]
        if not running or self._done(group, running[0], n):
            return True
        self._continue(group, running)
        return False

    def _done(self, group: _Group, best: _Candidate, n: int) -> bool:
        p, W = group.params, group.params.beam_width
        if len(group.finished) < W:
            return False
        if p.early_stopping is True:
            return True
        length = p.max_tokens if p.early_stopping == "never" and p.length_penalty > 0 else n
        return not best.cum_logprob / length ** p.length_penalty > group.finished[-1].score

    def _continue(self, group: _Group, running: list[_Candidate]) -> None:
        """The running candidates become the live beams: keep, fork or free each beam's request."""
        beams = [None] * len(running)  # in candidate order, as HF orders its running beams
        for b, beam in enumerate(group.beams):
            mine = [i for i, c in enumerate(running) if c.beam == b]
            req = beam.request
            if not mine:
                if req is not None:
                    self._drop(req)
                continue
            # Forks first: they copy the beam's tokens before its own continuation is appended.
            for i in mine[1:]:
                if req is not None and req.status == RequestStatus.RUNNING:
                    child = self.scheduler.fork_request(req.request_id, group.next_id())
                else:
                    child = self._new_request(group, beam.tokens)
                beams[i] = self._extend(group, child, beam, running[i])
            if req is None:
                req = self._new_request(group, beam.tokens)
            beams[mine[0]] = self._extend(group, req, beam, running[mine[0]])
        group.beams = beams

    def _extend(self, group: _Group, req: Request, beam: _Beam, c: _Candidate) -> _Beam:
        req.append_output_token_ids(c.token)  # never a stop token, never past max_tokens
        new = _Beam(beam.tokens + [c.token], c.cum_logprob, req, rows=beam.rows + [beam.candidates])
        self._beam_of[req.request_id] = (group, new)
        return new

    def _new_request(self, group: _Group, tokens: list[int]) -> Request:
        """A beam without pages: a waiting request that computes the prompt and `tokens` again."""
        req = Request(group.next_id(), group.prompt_token_ids, group.params,
                      eos_token_id=self.eos_token_id, prompt=group.prompt, parent_id=group.request_id)
        req.append_output_token_ids(list(tokens))
        self.scheduler.add_request(req)
        return req

    def _drop(self, req: Request) -> None:
        self._beam_of.pop(req.request_id, None)
        self.scheduler.finish_request(req.request_id, "abort")

    # -- results -----------------------------------------------------------------------------

    def _finish(self, group: _Group, hypotheses: list[_Hypothesis]) -> RequestOutput:
        """Frees what is left of the group; the output lists `hypotheses` best first."""
        for beam in group.beams:
            if beam.request is not None:
                self._beam_of.pop(beam.request.request_id, None)
                if not beam.request.is_finished:
                    self.scheduler.finish_request(beam.request.request_id, "abort")
        del self._groups[group.request_id]
        outputs = [CompletionOutput(index=i, text=self._text(group, h), token_ids=list(h.tokens),
                                    cumulative_logprob=h.cum_logprob, logprobs=self._logprobs(group, h),
                                    finish_reason=h.finish_reason, stop_reason=h.stop_reason)
                   for i, h in enumerate(hypotheses)]
        return RequestOutput(
            request_id=group.request_id, prompt=group.prompt, prompt_token_ids=group.prompt_token_ids,
            prompt_logprobs=None, outputs=outputs, finished=True, metrics=group.first.metrics,
            num_cached_tokens=max(group.first.num_cached_tokens, 0))

    def _logprobs(self, group: _Group, h: _Hypothesis) -> list[dict[int, Logprob]]:
        """Per token of `h`: its logprob and rank in the row it was chosen from, and the row's
        2 * beam_width most likely tokens (the row's candidates are its top tokens, best first)."""
        top = 2 * group.params.beam_width
        decode = None if self.tokenizer is None else (lambda t: self.tokenizer.decode([t], skip_special_tokens=False))
        entries = []
        for token, row in zip(h.tokens, h.rows):
            rank = next(j for j, (t, _) in enumerate(row) if t == token)
            ids, lps = zip(*row[:top])
            entries.append(logprob_entry(token, row[rank][1], rank + 1, ids, lps, decode))
        return entries

    def _text(self, group: _Group, h: _Hypothesis) -> str:
        if self.tokenizer is None:
            return ""
        tokens = h.tokens[:-1] if h.finish_reason == "stop" else h.tokens  # a stop token is not text
        detok = IncrementalDetokenizer(self.tokenizer, group.prompt_token_ids)
        detok.add_tokens(tokens)
        detok.finish()
        return detok.text
