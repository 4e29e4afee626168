"""The output processor: sampled tokens -> logprobs, text deltas, stop strings, `RequestOutput`s.

vLLM v1's split: the engine wires the scheduler (which appends tokens and applies the token
stop rules) to the runner (which computes them) and hands each step's results here. Host only.
A user request with n > 1 (or best_of) is several scheduler requests, its samples; its
`RequestState` gathers them back into one RequestOutput.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from pagedjax.detokenizer import IncrementalDetokenizer
from pagedjax.request import CompletionOutput, Logprob, Request, RequestOutput, logprob_entry
from pagedjax.sampling_params import RequestOutputKind, SamplingParams


class RequestState:
    """One user request: its samples' detokenizers, logprobs, text, and what was sent so far."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 params: SamplingParams, samples: list[Request], detokenizers: list[IncrementalDetokenizer | None]):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.samples = samples  # index order
        self.detok = detokenizers  # per sample, or Nones without a tokenizer
        self.logprobs: list[list[dict[int, Logprob]]] = [[] for _ in samples]
        # Prompt logprobs, one entry per prompt position so far (position 0 has none), or None.
        self.prompt_logprobs: list[dict[int, Logprob] | None] | None = (
            None if params.prompt_logprobs is None else [None])
        self.sent_prompt_logprobs = False  # DELTA: they go out once, in the first output
        self.cum_logprob = [0.0] * len(samples)
        self.sent_tokens = [0] * len(samples)  # DELTA bookkeeping
        self.sent_text = [0] * len(samples)
        self.text = [""] * len(samples)

    @property
    def finished(self) -> bool:
        for s in self.samples:
            if not s.is_finished:
                return False
        return True


class OutputProcessor:
    """Turns each step's sampled tokens into RequestOutputs, per each request's output_kind.

    `stop(request_id, stop_str)` is called when a stop string ends a sample (the scheduler's
    finish_request: its pages go back before the output is collected). With `stream_interval`
    n > 1, an unfinished DELTA request's output waits until one of its samples has n tokens not
    yet sent (its first output goes at once); the delta then carries all of them.
    """

    def __init__(self, tokenizer: Any, stop: Callable[[str, str], None], stream_interval: int = 1):
        self.tokenizer = tokenizer
        self._stop = stop
        self.stream_interval = stream_interval
        self._states: dict[str, RequestState] = {}  # by user request id
        self._owner: dict[str, RequestState] = {}  # scheduler request id (a sample) -> its user request

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._states

    def __len__(self) -> int:
        return len(self._states)

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, samples: list[Request]) -> None:
        """Tracks a user request whose samples the scheduler has queued."""
        detoks = []
        for _ in samples:
            if self.tokenizer is None or not params.detokenize:
                detoks.append(None)
                continue
            detoks.append(IncrementalDetokenizer(
                self.tokenizer, prompt_token_ids, skip_special_tokens=params.skip_special_tokens,
                stop=params.stop, include_stop_str_in_output=params.include_stop_str_in_output,
                min_tokens=params.min_tokens))
        state = RequestState(request_id, prompt, prompt_token_ids, params, samples, detoks)
        self._states[request_id] = state
        for s in samples:
            self._owner[s.request_id] = state

    def sample_ids(self, request_id: str) -> list[str]:
        """The scheduler request ids of a user request's samples."""
        return [s.request_id for s in self._states[request_id].samples]

    def abort(self, request_id: str) -> RequestOutput | None:
        """The final output of an aborted request (its samples already finished), or None if unknown."""
        state = self._states.get(request_id)
        if state is None:
            return None
        out = self._output(state, final=True)
        self._forget(state)
        return out

    # -- one step ------------------------------------------------------------------------------

    def process(self, scheduled: Sequence[Any], out: Any, updated: Sequence[Request]) -> list[RequestOutput]:
        """A step's results: prompt logprobs of its rows, then each updated sample's new token
        (logprobs, detokenization, stop strings); returns the outputs that changed.

        Args:
          scheduled: the step's rows (ScheduledRequests), in batch order.
          out: its StepOutput (token ids, logprobs, prompt logprobs by row).
          updated: the samples that received a token (Scheduler.update_from_output's result).
        """
        self._record_prompt_logprobs(scheduled, out)
        rows = {s.request_id: i for i, s in enumerate(scheduled)}
        chosen = out.logprobs.tolist()  # the sampled tokens' logprobs, by row
        touched: dict[str, RequestState] = {}
        for req in updated:
            state = self._owner.get(req.request_id)
            if state is None:
                continue
            row = rows[req.request_id]
            self._record_token(state, state.samples.index(req), req, out, row, chosen[row])
            touched[state.request_id] = state
        return self.collect(list(touched.values()))

    def collect(self, states: Sequence[RequestState] | None = None) -> list[RequestOutput]:
        """The outputs due for `states` (default: every tracked request); finished ones are dropped."""
        outputs = []
        for state in list(self._states.values()) if states is None else states:
            final = state.finished
            kind = state.params.output_kind
            if not final and (kind is RequestOutputKind.FINAL_ONLY or (
                    kind is RequestOutputKind.DELTA and self.stream_interval > 1 and not self._due(state))):
                continue
            outputs.append(self._output(state, final=final))
            if final:
                self._forget(state)
        return outputs

    def _due(self, state: RequestState) -> bool:
        """A DELTA request's output is due: nothing sent yet, or a sample with stream_interval
        tokens unsent."""
        sent = state.sent_tokens
        if not any(sent):
            return True
        for i, req in enumerate(state.samples):
            if len(req.output_token_ids) - sent[i] >= self.stream_interval:
                return True
        return False

    def _record_token(self, state: RequestState, i: int, req: Request, out: Any, row: int, logprob: float) -> None:
        """Logprobs, detokenization and stop strings for the token just appended to sample i
        (`logprob`: the sampled token's, row `row` of `out`)."""
        token = req.output_token_ids[-1]
        state.cum_logprob[i] += logprob
        k = state.params.logprobs
        if k is not None:
            top = out.top_token_ids is not None
            state.logprobs[i].append(logprob_entry(
                token, logprob, int(out.ranks[row]) if out.ranks is not None else None,
                out.top_token_ids[row, :k] if top else (), out.top_logprobs[row, :k] if top else (),
                self.decode_token))
        detok = state.detok[i]
        if detok is None:
            return
        if req.is_finished:
            # A stop token is not text (vLLM drops it), unless ignore_eos kept it generating.
            hidden = req.finish_reason == "stop" and (
                token == req.eos_token_id or token in (req.stop_token_ids or ()))
            if not hidden and not detok.finished:
                detok.add_tokens([token])
            detok.finish()
        elif not detok.finished:
            detok.add_tokens([token])
            if detok.stop_str is not None:
                self._stop(req.request_id, detok.stop_str)
                detok.finish()
        state.text[i] = detok.text

    def decode_token(self, token_id: int) -> str | None:
        """A logprob entry's decoded_token (None without a tokenizer)."""
        return None if self.tokenizer is None else self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _record_prompt_logprobs(self, scheduled: Sequence[Any], out: Any) -> None:
        """Appends the prompt positions this step scored to their requests' prompt_logprobs.

        A request preempted mid-prompt recomputes from its start: positions it already has are
        skipped, so none is listed twice; a gap would mean a skipped position, a bug.
        """
        scored = out.prompt_logprobs
        if scored is None:
            return
        for span in scored.spans:
            state = self._owner.get(scheduled[span.batch_row].request_id)
            got = state.prompt_logprobs if state is not None else None
            if got is None:
                continue
            if span.position > len(got):
                raise RuntimeError(f"request {state.request_id}: prompt logprobs from position "
                                   f"{span.position}, but only {len(got)} positions are in")
            k = state.params.prompt_logprobs
            for q in range(span.first + len(got) - span.position, span.first + span.count):
                got.append(logprob_entry(
                    state.prompt_token_ids[len(got)], float(scored.logprobs[q]), int(scored.ranks[q]),
                    scored.top_token_ids[q, :k], scored.top_logprobs[q, :k], self.decode_token))

    # -- outputs -------------------------------------------------------------------------------

    def _forget(self, state: RequestState) -> None:
        self._states.pop(state.request_id, None)
        for s in state.samples:
            self._owner.pop(s.request_id, None)

    def _output(self, state: RequestState, final: bool) -> RequestOutput:
        delta = state.params.output_kind is RequestOutputKind.DELTA
        want_logprobs = state.params.logprobs is not None
        completions = []
        for i, req in enumerate(state.samples):
            text, logprobs = state.text[i], state.logprobs[i] if want_logprobs else None
            if delta:  # slices: new lists
                t0, c0 = state.sent_tokens[i], state.sent_text[i]
                ids, text = req.output_token_ids[t0:], text[c0:]
                logprobs = logprobs[t0:] if want_logprobs else None
                state.sent_tokens[i] = t0 + len(ids)
                state.sent_text[i] = c0 + len(text)
            else:
                ids = list(req.output_token_ids)
            reason = req.status.finish_reason
            if reason is None and final:
                reason = "abort"
            completions.append(CompletionOutput(req.index, text, ids, state.cum_logprob[i], logprobs, reason,
                                                req.stop_reason))
        if final and len(completions) > state.params.n:  # best_of: keep the n most likely
            completions.sort(key=lambda c: -(c.cumulative_logprob or 0.0))
            completions = completions[:state.params.n]
        prompt_logprobs = None
        if state.prompt_logprobs is not None and not (delta and state.sent_prompt_logprobs):
            state.sent_prompt_logprobs = True  # with DELTA they go out once (vLLM)
            prompt_logprobs = list(state.prompt_logprobs)
        first = state.samples[0]
        return RequestOutput(
            request_id=state.request_id, prompt=state.prompt, prompt_token_ids=state.prompt_token_ids,
            prompt_logprobs=prompt_logprobs, outputs=completions, finished=final, metrics=first.metrics,
            num_cached_tokens=max(first.num_cached_tokens, 0))
