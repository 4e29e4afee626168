"""The engine: the only module wiring the scheduler (host) to the model runner (device).

`step()` = schedule -> run one jitted step -> update requests -> detokenize, stop strings ->
RequestOutputs. Every request ends with a finish reason and gives its pages back.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pagedjax import parallel, sampler
from pagedjax.beam_search import BeamSearch
from pagedjax.kv_cache.block_allocator import CacheConfig
from pagedjax.model_runner import ModelRunner, StepRequest
from pagedjax.params import Params
from pagedjax.request import CompletionOutput, Logprob, Request, RequestOutput, RequestStatus, logprob_entry
from pagedjax.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams
from pagedjax.scheduler import Scheduler, SchedulerConfig

logger = logging.getLogger("pagedjax")
_GREEDY = SamplingParams(temperature=0.0)


@dataclass(frozen=True)
class EngineConfig:
    """Engine options (vLLM's names). None picks a default from the model and the device."""

    max_model_len: int | None = None  # default: the model's context, capped at 4096
    max_num_seqs: int | None = None  # requests per step (default 256 on GPU, 32 on CPU)
    max_num_batched_tokens: int | None = None  # tokens per step (default 2048 on GPU, 256 on CPU)
    page_size: int = 16
    num_pages: int | None = None  # default: as many as memory allows
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_bytes: int = 1 << 30
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    attn_impl: str = "auto"  # "reference" | "ffi" | "auto"
    tensor_parallel_size: int | None = None  # devices to split over (default: the params' mesh, else 1)
    max_logprobs: int = 20
    precompile: bool = True
    seed: int = 0
    async_scheduling: bool = True  # schedule and launch step n+1 before step n's tokens reach the host
    preemption_mode: str = "recompute"  # "recompute" | "swap": a preempted request's pages go to host memory
    swap_space: float = 4.0  # GiB of host memory for swapped pages (preemption_mode="swap")

    def __post_init__(self) -> None:
        if self.preemption_mode not in ("recompute", "swap"):
            raise ValueError(f"preemption_mode must be 'recompute' or 'swap', got {self.preemption_mode!r}")
        if (isinstance(self.swap_space, bool) or not isinstance(self.swap_space, (int, float))
                or not 0 <= self.swap_space < float("inf")):
            raise ValueError(f"swap_space must be a finite number of GiB >= 0, got {self.swap_space!r}")

    def resolve(self, params: Params) -> EngineConfig:
        """Fills the defaults that depend on the model and the device."""
        import jax

        gpu = jax.default_backend() == "gpu"
        max_len = self.max_model_len or min(params.config.max_position_embeddings, 4096)
        if max_len > params.config.max_position_embeddings:
            raise ValueError(f"max_model_len {max_len} exceeds the model's "
                             f"{params.config.max_position_embeddings} positions")
        seqs = self.max_num_seqs or (256 if gpu else 32)
        tokens = self.max_num_batched_tokens or (2048 if gpu else 256)
        if not self.enable_chunked_prefill:
            tokens = max(tokens, max_len)
        tp = self.tensor_parallel_size or parallel.tp_size(parallel.mesh_of(params))
        parallel.check_tensor_parallel(params.config, tp)
        return dataclasses.replace(self, max_model_len=max_len, max_num_seqs=seqs,
                                   max_num_batched_tokens=max(tokens, 16), tensor_parallel_size=tp)


class _Tracked:
    """Engine-side state of one user request: its samples' detokenizers and what was sent."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 params: SamplingParams, samples: list[Request], detokenizers: list[Any]):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.samples = samples  # index order
        self.detok = detokenizers  # per sample, or Nones without a tokenizer
        self.logprobs: list[list[dict[int, Logprob]]] = [[] for _ in samples]
        # Prompt logprobs, one entry per prompt position so far (position 0 has none), or None.
        self.prompt_logprobs: list[dict[int, Logprob] | None] | None = (
            None if getattr(params, "prompt_logprobs", None) is None else [None])
        self.sent_prompt_logprobs = False  # DELTA: they go out once, in the first output
        self.cum_logprob = [0.0] * len(samples)
        self.sent_tokens = [0] * len(samples)  # DELTA bookkeeping
        self.sent_text = [0] * len(samples)
        self.text = [""] * len(samples)

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.samples)


class LLMEngine:
    """Continuous-batching engine over one model: add_request / step / abort_request."""

    def __init__(self, params: Params, config: EngineConfig | None = None, *, tokenizer: Any = None):
        self.params = params
        self.config = cfg = (config or EngineConfig()).resolve(params)
        self.tokenizer = self._load_tokenizer(tokenizer)
        self.runner = ModelRunner(
            params, max_model_len=cfg.max_model_len, max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=cfg.max_num_batched_tokens, page_size=cfg.page_size,
            num_pages=cfg.num_pages, gpu_memory_utilization=cfg.gpu_memory_utilization,
            cpu_kv_cache_bytes=cfg.cpu_kv_cache_bytes, attn_impl=cfg.attn_impl,
            precompile=cfg.precompile, seed=cfg.seed,
            mesh=parallel.mesh_for(params, cfg.tensor_parallel_size))
        num_host_pages = 0
        if cfg.preemption_mode == "swap":
            num_host_pages = int(cfg.swap_space * 2**30) // self.runner.page_bytes()
            if num_host_pages == 0:
                raise ValueError(f"swap_space={cfg.swap_space} GiB holds no page of "
                                 f"{self.runner.page_bytes()} bytes: raise it, or use preemption_mode='recompute'")
            self.runner.init_swap_space(num_host_pages)
        self.scheduler = Scheduler(
            SchedulerConfig(max_num_seqs=cfg.max_num_seqs,
                            max_num_batched_tokens=cfg.max_num_batched_tokens,
                            max_model_len=cfg.max_model_len,
                            enable_chunked_prefill=cfg.enable_chunked_prefill,
                            preemption_mode=cfg.preemption_mode),
            CacheConfig(page_size=cfg.page_size, num_pages=self.runner.num_pages,
                        enable_prefix_caching=cfg.enable_prefix_caching, num_host_pages=num_host_pages))
        self._tracked: dict[str, _Tracked] = {}
        self._beams = BeamSearch(self.scheduler, eos_token_id=self.eos_token_id,
                                 vocab_size=params.config.vocab_size, tokenizer=self.tokenizer)
        self._sample_owner: dict[str, _Tracked] = {}  # scheduler request id -> user request
        self._pending: list[RequestOutput] = []  # outputs of aborts, returned by the next step()
        self._in_flight = None  # (SchedulerOutput, Launched): async scheduling's step on the device
        self.num_steps = 0

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
                    tokenize: bool = False) -> str | list[int]:
        """The chat template applied to messages: text, or token ids with tokenize=True.

        Use the ids as the prompt: encoding the text again would add a second BOS on models
        whose tokenizer adds one.
        """
        if self.tokenizer is None or not self.tokenizer.has_chat_template:
            raise ValueError("this model's tokenizer has no chat template")
        if not messages:
            raise ValueError("messages must not be empty")
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=tokenize)

    # -- requests in -------------------------------------------------------------------------

    def _tokenize(self, prompt: str | Sequence[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; this model has none (pass token ids)")
            ids = self.tokenizer.encode(prompt)
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
        if request_id in self._tracked or request_id in self._beams:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(params, BeamSearchParams):
            text, ids = self._tokenize(prompt)
            self._beams.add(request_id, text, ids, params)
            return
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and not (0 <= k <= self.config.max_logprobs):
                raise ValueError(f"{name} must be in [0, {self.config.max_logprobs}] (max_logprobs), got {k}")
        if (params.stop and self.tokenizer is None):
            raise ValueError("stop strings need a tokenizer; this model has none")
        if any(t >= self.params.config.vocab_size for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids must be < the vocabulary size "
                             f"{self.params.config.vocab_size}, got {params.stop_token_ids}")
        text, ids = self._tokenize(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        request = Request(request_id, ids, params, eos_token_id=self.eos_token_id, prompt=text)
        samples = self.scheduler.add_request(request)  # raises for a request that cannot fit
        detoks = []
        for s in samples:
            if self.tokenizer is None or not params.detokenize:
                detoks.append(None)
                continue
            from pagedjax.tokenizer import IncrementalDetokenizer

            detoks.append(IncrementalDetokenizer(
                self.tokenizer, ids, skip_special_tokens=params.skip_special_tokens,
                stop=params.stop, include_stop_str_in_output=params.include_stop_str_in_output,
                min_tokens=params.min_tokens))
        tracked = _Tracked(request_id, text, ids, params, samples, detoks)
        self._tracked[request_id] = tracked
        for s in samples:
            self._sample_owner[s.request_id] = tracked

    def abort_request(self, request_ids: str | Sequence[str]) -> None:
        """Aborts requests: their pages return now, a final output says "abort" at the next step()."""
        for rid in [request_ids] if isinstance(request_ids, str) else list(request_ids):
            if rid in self._beams:
                self._pending.append(self._beams.abort(rid))
                continue
            tracked = self._tracked.get(rid)
            if tracked is None:
                continue
            self.scheduler.abort_request([s.request_id for s in tracked.samples])
            self._pending.append(self._output(tracked, final=True))
            self._forget(tracked)

    def has_unfinished_requests(self) -> bool:
        return bool(self._tracked) or bool(self._beams) or bool(self._pending) or self._in_flight is not None

    def get_num_unfinished_requests(self) -> int:
        return len(self._tracked) + len(self._beams)

    # -- one step ----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Runs one engine step; returns the outputs that changed (per each request's output_kind).

        With async scheduling, the step launched here runs on the device while the host reads
        back and processes the previous one (tokens, detokenization, stops, outputs): a decode
        whose last token is still on the device reads it there. Steps that need every token on
        the host first (penalties, beam search) run synchronously.
        """
        outputs, self._pending = self._pending, []
        prev, self._in_flight = self._in_flight, None
        sched = self._schedule()
        if not sched.scheduled and prev is None and self._beams.release_waiting():
            sched = self._schedule()  # beams held pages waiting for a preempted sibling
        launched = None
        if sched.scheduled:
            batch, want_logprobs = self._batch(sched, prev)
            launched = self.runner.launch(batch, sched.cow_copies, num_logprobs=want_logprobs,
                                          prev=prev and prev[1])
            self.num_steps += 1
            if self._can_pipeline(batch):
                self.scheduler.commit_in_flight(sched)
                self._in_flight = (sched, launched)
        if prev is not None:
            outputs += self._process(prev[0], self.runner.fetch(prev[1]))
        if launched is not None and self._in_flight is None:
            outputs += self._process(sched, self.runner.fetch(launched))
        if launched is None and prev is None and self._tracked and not self.scheduler.has_unfinished_requests():
            # Finished outside a step (e.g. a fork that stopped at once): report them.
            outputs += self._collect(list(self._tracked.values()))
        return outputs

    def _schedule(self):
        """schedule(), then its swaps (before the step, which may reuse the pages swapped out;
        swap-out copies the pages as the step in flight leaves them)."""
        sched = self.scheduler.schedule()
        if sched.swap_out:
            self.runner.swap_out(sched.swap_out)
        if sched.swap_in:
            self.runner.swap_in(sched.swap_in)
        return sched

    def _batch(self, sched, prev) -> tuple[list[StepRequest], int]:
        """The runner's rows for `sched`, and the logprobs width it needs."""
        prev_rows = {} if prev is None else {s.request_id: i for i, s in enumerate(prev[0].scheduled)}
        batch, want_logprobs = [], 0
        for s in sched.scheduled:
            req = s.request
            # A beam row's token is chosen from its top logprobs (BeamSearch): no bans, no penalties.
            sp = _GREEDY if isinstance(req.sampling_params, BeamSearchParams) else req.sampling_params
            row = StepRequest(s.token_ids, s.start_pos, s.block_table, s.sample, sp, req.output_token_ids,
                              req.prompt_token_ids, num_pending=req.num_pending)
            if s.token_ids[-1] == -1:  # sampled by the step in flight: read on device
                row.prev_row = prev_rows[s.request_id]
            batch.append(row)
            lp = getattr(req.sampling_params, "logprobs", None)
            if s.sample and lp is not None:
                want_logprobs = self.config.max_logprobs
        beam_width = self._beams.num_logprobs(sched)  # each beam row's candidates
        if beam_width:
            want_logprobs = max(self.config.max_logprobs, beam_width)
        return batch, want_logprobs

    def _can_pipeline(self, batch: list[StepRequest]) -> bool:
        """Whether the next step may be scheduled before this one's tokens are on the host: not
        with beam search (it picks tokens on the host) or penalties (they read every token)."""
        return self.config.async_scheduling and not self._beams and not any(
            r.sample and sampler.needs_token_history(r.sampling_params) for r in batch)

    def _process(self, sched, out) -> list[RequestOutput]:
        """A step's results on the host: tokens into requests, logprobs, detokenization, stops, outputs."""
        self._record_prompt_logprobs(sched, out)
        self._beams.take_rows(sched, out)
        sampled = {s.request_id: int(out.token_ids[i])
                   for i, s in enumerate(sched.scheduled) if s.sample}
        rows = {s.request_id: i for i, s in enumerate(sched.scheduled)}
        updated = self.scheduler.update_from_output(sched, sampled)
        touched: dict[str, _Tracked] = {}
        now = time.time()
        for req in updated:
            tracked = self._sample_owner.get(req.request_id)
            if tracked is None:
                continue
            i = tracked.samples.index(req)
            self._record_token(tracked, i, req, out, rows[req.request_id])
            if req.metrics.first_token_time is None:
                req.metrics.first_token_time = now
            req.metrics.last_token_time = now
            touched[tracked.request_id] = tracked
        return self._collect(list(touched.values())) + self._beams.advance()

    def _record_token(self, tracked: _Tracked, i: int, req: Request, out, row: int) -> None:
        """Logprobs, detokenization and stop strings for the token just appended to sample i."""
        token = req.output_token_ids[-1]
        tracked.cum_logprob[i] += float(out.logprobs[row])
        k = tracked.params.logprobs
        if k is not None:
            top = out.top_token_ids is not None
            tracked.logprobs[i].append(logprob_entry(
                token, float(out.logprobs[row]), int(out.ranks[row]) if out.ranks is not None else None,
                out.top_token_ids[row, :k] if top else (), out.top_logprobs[row, :k] if top else (),
                self._decode_token))
        detok = tracked.detok[i]
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
                self.scheduler.finish_request(req.request_id, "stop", stop_reason=detok.stop_str)
                detok.finish()
        tracked.text[i] = detok.text

    def _decode_token(self, token_id: int) -> str | None:
        """A logprob entry's decoded_token (None without a tokenizer)."""
        return None if self.tokenizer is None else self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _record_prompt_logprobs(self, sched, out) -> None:
        """Appends the prompt positions this step scored to their requests' prompt_logprobs.

        A request preempted mid-prompt recomputes from its start: positions it already has are
        skipped, so none is listed twice; a gap would mean a skipped position, a bug.
        """
        scored = out.prompt_logprobs
        if scored is None:
            return
        for span in scored.spans:
            tracked = self._sample_owner.get(sched.scheduled[span.batch_row].request_id)
            got = tracked.prompt_logprobs if tracked is not None else None
            if got is None:
                continue
            if span.position > len(got):
                raise RuntimeError(f"request {tracked.request_id}: prompt logprobs from position "
                                   f"{span.position}, but only {len(got)} positions are in")
            k = tracked.params.prompt_logprobs
            for q in range(span.first + len(got) - span.position, span.first + span.count):
                got.append(logprob_entry(
                    tracked.prompt_token_ids[len(got)], float(scored.logprobs[q]), int(scored.ranks[q]),
                    scored.top_token_ids[q, :k], scored.top_logprobs[q, :k], self._decode_token))

    @staticmethod
    def _prompt_logprobs_out(tracked: _Tracked, delta: bool) -> list[dict[int, Logprob] | None] | None:
        """RequestOutput.prompt_logprobs: all so far, or with DELTA once only (vLLM)."""
        if tracked.prompt_logprobs is None or (delta and tracked.sent_prompt_logprobs):
            return None
        tracked.sent_prompt_logprobs = True
        return list(tracked.prompt_logprobs)

    def _collect(self, tracked_list: list[_Tracked]) -> list[RequestOutput]:
        outputs = []
        for tracked in tracked_list:
            final = tracked.finished
            kind = getattr(tracked.params, "output_kind", RequestOutputKind.CUMULATIVE)
            if kind is RequestOutputKind.FINAL_ONLY and not final:
                continue
            outputs.append(self._output(tracked, final=final))
            if final:
                self._forget(tracked)
        return outputs

    def _forget(self, tracked: _Tracked) -> None:
        self._tracked.pop(tracked.request_id, None)
        for s in tracked.samples:
            self._sample_owner.pop(s.request_id, None)

    def _output(self, tracked: _Tracked, final: bool) -> RequestOutput:
        kind = getattr(tracked.params, "output_kind", RequestOutputKind.CUMULATIVE)
        delta = kind is RequestOutputKind.DELTA
        completions = []
        for i, req in enumerate(tracked.samples):
            ids = req.output_token_ids
            text = tracked.text[i]
            logprobs = tracked.logprobs[i] if tracked.params.logprobs is not None else None
            if delta:
                t0, c0 = tracked.sent_tokens[i], tracked.sent_text[i]
                ids, text = ids[t0:], text[c0:]
                logprobs = logprobs[t0:] if logprobs is not None else None
                tracked.sent_tokens[i] += len(ids)
                tracked.sent_text[i] += len(text)
            reason = req.finish_reason
            if reason is None and final:
                reason = "abort"
            completions.append(CompletionOutput(
                index=req.index, text=text, token_ids=list(ids),
                cumulative_logprob=tracked.cum_logprob[i], logprobs=logprobs,
                finish_reason=reason, stop_reason=req.stop_reason))
        n = tracked.params.n
        if final and len(completions) > n:  # best_of: keep the n most likely
            completions.sort(key=lambda c: -(c.cumulative_logprob or 0.0))
            completions = completions[:n]
        first = tracked.samples[0]
        return RequestOutput(
            request_id=tracked.request_id, prompt=tracked.prompt,
            prompt_token_ids=tracked.prompt_token_ids, prompt_logprobs=self._prompt_logprobs_out(tracked, delta),
            outputs=completions,
            finished=final, metrics=first.metrics,
            num_cached_tokens=max(first.num_cached_tokens, 0))

    def stats(self):
        """The scheduler's counters (pages, waste, preemptions and swaps, prefix-cache hits)."""
        return self.scheduler.stats()
