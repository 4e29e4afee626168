"""The engine: the only module wiring the scheduler (host) to the model runner (device) and the
output processor (host).

`step()` = schedule -> run one jitted step -> the scheduler appends the tokens and applies the
token stop rules -> the output processor turns them into RequestOutputs (logprobs,
detokenization, stop strings). Beam search is a decoding mode beside the output processor
(beam_search.py). Constrained decoding (structured outputs, allowed_token_ids) is the
StructuredOutputManager's: a bitmask per step with a constrained row, the sampled tokens fed
back to each sample's grammar. Every request ends with a finish reason and gives its pages back.
"""

from __future__ import annotations

import functools
import gc
import logging
import time
from collections.abc import Sequence
from typing import Any

from pagedjax import parallel
from pagedjax.beam_search import BeamSearch
from pagedjax.config import EngineConfig
from pagedjax.model_runner import Launched, ModelRunner, StepOutput
from pagedjax.output_processor import OutputProcessor
from pagedjax.params import Params
from pagedjax.request import Request, RequestOutput, RequestStatus
from pagedjax.sampling_metadata import needs_token_history
from pagedjax.sampling_params import BeamSearchParams, SamplingParams, truncate_prompt
from pagedjax.scheduler import ScheduledRequest, Scheduler, SchedulerOutput
from pagedjax.structured_outputs.backend import CompileLimits
from pagedjax.structured_outputs.manager import StructuredOutputManager

__all__ = ["EngineConfig", "LLMEngine"]

logger = logging.getLogger("pagedjax")


class LLMEngine:
    """Continuous-batching engine over one model: add_request / step / abort_request."""

    def __init__(self, params: Params, config: EngineConfig | None = None, *, tokenizer: Any = None):
        t0 = time.perf_counter()
        self.params = params
        self.config = cfg = (config or EngineConfig()).resolve(params)
        if cfg.freeze_gc_heap:  # an engine dropped since the last freeze goes now, before this one's pool
            gc.unfreeze()
            gc.collect()
        self.tokenizer = self._load_tokenizer(tokenizer)
        t1 = time.perf_counter()
        self.runner = ModelRunner(params, cfg, mesh=parallel.mesh_for(params, cfg.tensor_parallel_size))
        num_host_pages = 0
        if cfg.preemption_mode == "swap":
            num_host_pages = int(cfg.swap_space * 2**30) // self.runner.page_bytes()
            if num_host_pages == 0:
                raise ValueError(f"swap_space={cfg.swap_space} GiB holds no page of "
                                 f"{self.runner.page_bytes()} bytes: raise it, or use preemption_mode='recompute'")
            self.runner.init_swap_space(num_host_pages)
        self.scheduler = Scheduler(cfg.scheduler_config(), cfg.cache_config(
            self.runner.num_pages, num_host_pages, sliding_window=params.config.kv_sliding_window))
        self.outputs = OutputProcessor(
            self.tokenizer, stop=lambda rid, s: self.scheduler.finish_request(rid, "stop", stop_reason=s),
            stream_interval=cfg.stream_interval)
        self._beams = BeamSearch(self.scheduler, eos_token_id=self.eos_token_id,
                                 vocab_size=params.config.vocab_size, tokenizer=self.tokenizer)
        self.structured = StructuredOutputManager(
            self.tokenizer, params.config.vocab_size, reasoning_parser=cfg.reasoning_parser,
            enable_in_reasoning=cfg.enable_in_reasoning, limits=CompileLimits(time_limit_s=cfg.grammar_compile_timeout))
        self._pending: list[RequestOutput] = []  # outputs of aborts, returned by the next step()
        self._in_flight: tuple[SchedulerOutput, Launched] | None = None  # async scheduling's step on the device
        self.num_steps = 0
        if cfg.freeze_gc_heap:
            gc.collect()
            gc.freeze()
        compiling = self.runner.compile_seconds
        self.startup_seconds = {"tokenizer": t1 - t0, "engine": time.perf_counter() - t1 - compiling,
                                "compiling": compiling}

    def _load_tokenizer(self, tokenizer: Any):
        if tokenizer is not None and not isinstance(tokenizer, (str, bytes)) and hasattr(tokenizer, "encode"):
            return tokenizer
        source = tokenizer if tokenizer is not None else self.params.tokenizer
        if source is None:
            return None
        from pagedjax.tokenizer import load_tokenizer

        return load_tokenizer(source)

    @property
    def eos_token_id(self) -> int | None:
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            return self.tokenizer.eos_token_id
        eos = self.params.config.eos_token_ids
        return eos[0] if eos else None

    def chat_prompt(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                    tokenize: bool = False, chat_template: str | None = None) -> str | list[int]:
        """The chat template (`chat_template`'s text, else the tokenizer's) applied to messages:
        text, or token ids with tokenize=True.

        Use the ids as the prompt: encoding the text again would add a second BOS on models
        whose tokenizer adds one.
        """
        if self.tokenizer is None or not (chat_template or self.tokenizer.has_chat_template):
            raise ValueError("this model's tokenizer has no chat template (pass chat_template=)")
        if not messages:
            raise ValueError("messages must not be empty")
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=tokenize, chat_template=chat_template)

    # -- requests in -------------------------------------------------------------------------

    def _tokenize(self, prompt: str | Sequence[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; this model has none (pass token ids)")
            ids = self.tokenizer.encode(prompt)
            if ids and max(ids) >= self.params.config.vocab_size:
                raise ValueError(f"the tokenizer gives token id {max(ids)}, past the model's vocabulary of "
                                 f"{self.params.config.vocab_size}: a tokenizer for another model?")
            return prompt, ids
        ids = list(prompt)
        V = self.params.config.vocab_size
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < V for t in ids):
            raise ValueError(f"prompt token ids must be ints in [0, {V})")
        return None, ids

    def add_request(self, request_id: str, prompt: str | Sequence[int],
                    sampling_params: SamplingParams | BeamSearchParams | None = None) -> None:
        """Queues a request; raises ValueError (touching nothing) if it can never run."""
        params = sampling_params or SamplingParams()
        if request_id in self.outputs or request_id in self._beams:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(params, BeamSearchParams):
            text, ids = self._tokenize(prompt)
            self._beams.add(request_id, text, ids, params)
            return
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and not (0 <= k <= self.config.max_logprobs):
                raise ValueError(f"{name} must be in [0, {self.config.max_logprobs}] (max_logprobs), got {k}")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this model has none")
        if any(t >= self.params.config.vocab_size for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids must be < the vocabulary size "
                             f"{self.params.config.vocab_size}, got {params.stop_token_ids}")
        params, grammar = self.structured.check(params)  # ids in the vocab; the grammar compiled (cached)
        text, ids = self._tokenize(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        ids = truncate_prompt(ids, params.truncate_prompt_tokens, self.config.max_model_len)
        request = Request(request_id, ids, params, eos_token_id=self.eos_token_id, prompt=text)
        samples = self.scheduler.add_request(request)  # raises for a request that cannot fit
        self.structured.add_request(samples, grammar)
        self.outputs.add_request(request_id, text, ids, params, samples)

    def abort_request(self, request_ids: str | Sequence[str]) -> None:
        """Aborts requests: their pages return now, a final output says "abort" at the next step()."""
        for rid in [request_ids] if isinstance(request_ids, str) else list(request_ids):
            if rid in self._beams:
                self._pending.append(self._beams.abort(rid))
            elif rid in self.outputs:
                self.scheduler.abort_request(self.outputs.sample_ids(rid))
                self._pending.append(self.outputs.abort(rid))

    def has_unfinished_requests(self) -> bool:
        return bool(self.outputs) or bool(self._beams) or bool(self._pending) or self._in_flight is not None

    def get_num_unfinished_requests(self) -> int:
        return len(self.outputs) + len(self._beams)

    # -- one step ----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Runs one engine step; returns the outputs that changed (per each request's output_kind).

        With async scheduling, the step launched here runs on the device while the host reads
        back and processes the previous one (tokens, detokenization, stops, outputs): a decode
        whose last token is still on the device reads it there. Steps that need every token on
        the host first (penalties, bad words, beam search) run synchronously. A step with a
        grammar row launches its model first and its sampling once the previous step's tokens
        have advanced the grammars and the bitmask is built: the host does that work while the
        device runs the model.
        """
        outputs, self._pending = self._pending, []
        prev, self._in_flight = self._in_flight, None
        sched = self._schedule()
        if not sched.scheduled and prev is None and self._beams.release_waiting():
            sched = self._schedule()  # beams held pages waiting for a preempted sibling
        launched, masked_late = None, False
        if sched.scheduled:
            rows = sched.scheduled
            masked = self.structured.active and self.structured.needs_bitmask(rows)
            masked_late = masked and prev is not None and self.structured.needs_sampled_tokens(rows)
            # A constrained step's sampling waits for its bitmask (launch(sample=False), then sample()).
            launch = functools.partial(self.runner.launch, sample=False) if masked else self.runner.launch
            launched = launch(rows, sched.cow_copies, num_logprobs=self._num_logprobs(sched), prev=prev and prev[1])
            if masked and not masked_late:
                self.runner.sample(launched, self.structured.bitmask(rows, launched.num_padded_rows))
            self.num_steps += 1
            if self._can_pipeline(rows):
                self.scheduler.commit_in_flight(sched)
                self._in_flight = (sched, launched)
        if prev is not None:
            outputs += self._process(prev[0], self.runner.fetch(prev[1]))
        if masked_late:  # the grammars have taken the previous step's tokens
            self.runner.sample(launched, self.structured.bitmask(sched.scheduled, launched.num_padded_rows))
        if launched is not None and self._in_flight is None:
            outputs += self._process(sched, self.runner.fetch(launched))
        if launched is None and prev is None and self.outputs and not self.scheduler.has_unfinished_requests():
            outputs += self.outputs.collect()  # finished outside a step (e.g. a fork that stopped at once)
        return outputs

    def _schedule(self) -> SchedulerOutput:
        """schedule(), then its swaps (before the step, which may reuse the pages swapped out;
        swap-out copies the pages as the step in flight leaves them)."""
        sched = self.scheduler.schedule()
        if sched.finished_ids and self.structured.active:
            self.structured.remove(sched.finished_ids)
        if sched.swap_out:
            self.runner.swap_out(sched.swap_out)
        if sched.swap_in:
            self.runner.swap_in(sched.swap_in)
        return sched

    def _num_logprobs(self, sched: SchedulerOutput) -> int:
        """The top-logprobs width the step returns: max_logprobs when a sampling row asks for
        logprobs, wider for beam rows' candidates, else 0 (the cheapest sampler variant)."""
        want = 0
        if any(s.sample and getattr(s.sampling_params, "logprobs", None) is not None for s in sched.scheduled):
            want = self.config.max_logprobs
        beam_width = self._beams.num_logprobs(sched)  # each beam row's candidates
        if beam_width:
            want = max(self.config.max_logprobs, beam_width)
        return want

    def _can_pipeline(self, rows: Sequence[ScheduledRequest]) -> bool:
        """Whether the next step may be scheduled before this one's tokens are on the host: not
        with beam search (it picks tokens on the host), penalties or bad words of several tokens
        (they read every token). Grammar rows may: their mask waits for the tokens (step())."""
        return self.config.async_scheduling and not self._beams and not any(
            s.sample and needs_token_history(s.sampling_params) for s in rows)

    def _process(self, sched: SchedulerOutput, out: StepOutput) -> list[RequestOutput]:
        """A step's results on the host: beam rows to the beam search, sampled tokens into the
        scheduler's requests, then outputs."""
        beam_rows = self._beams.take_rows(sched, out)
        token_ids = out.token_ids.tolist()
        sampled = {s.request_id: token_ids[i] for i, s in enumerate(sched.scheduled)
                   if s.sample and s.request_id not in beam_rows}
        updated = self.scheduler.update_from_output(sched, sampled, external=beam_rows)
        if self.structured.active:
            self._advance_grammars(updated)
        return self.outputs.process(sched.scheduled, out, updated) + self._beams.advance()

    def _advance_grammars(self, updated: Sequence[Request]) -> None:
        """Each constrained sample's new token into its grammar; ends those whose grammar is
        complete ("stop": EOS is all it could add) or cannot continue ("error", with why)."""
        for req in updated:
            end = self.structured.accept(req, req.output_token_ids[-1])
            if end is None:
                continue
            reason, why = end
            if not req.is_finished:
                self.scheduler.finish_request(req.request_id, reason, stop_reason=why)
            elif reason == "error":  # it stopped on this very token (EOS of a stuck row, length): say why
                req.status, req.stop_reason = RequestStatus.FINISHED_ERROR, why

    def stats(self):
        """The scheduler's counters (pages, waste, preemptions and swaps, prefix-cache hits)."""
        return self.scheduler.stats()
