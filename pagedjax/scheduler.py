"""Continuous-batching scheduler, vLLM V1 style: plain Python over ints and lists, never jax.

There are no prefill and decode phases. A request is two counters, `num_computed_tokens` (K/V
in its pages) and `num_tokens` (prompt + outputs), and each step computes the tokens between
them, up to a budget: a decode is one token, a prefill is a chunk, a resumed request recomputes
all it had. One `schedule()`:

1. running requests, oldest first, get their tokens under `max_num_batched_tokens`; when pages
   run out, the most recently admitted running request is preempted (pages freed, back to the
   front of the waiting queue, outputs kept, so it resumes with identical results): by
   recompute, or with `preemption_mode="swap"` by swap, its pages copied to host slots and back
   when readmitted, so it computes nothing again (kv_cache/swap.py; recompute when slots are short);
2. if nobody was preempted, waiting requests are admitted first come first served while
   `max_num_seqs` and the budget allow, starting after their prefix-cache hits.

Prefill chunks and decodes share one ragged batch. Parallel samples (n > 1) prefill the prompt
once: sample 0 computes it, the others are admitted once it has and share its pages, the
partial last page copy-on-write. `update_from_output()` appends the sampled tokens and applies
the stop rules; stop strings are the detokenizer's, which calls `finish_request()`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from pagedjax.kv_cache.block_allocator import CacheConfig
from pagedjax.kv_cache.manager import KVCacheManager
from pagedjax.request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    """Batch limits of one step, and the longest sequence (prompt + output) served."""

    max_num_seqs: int = 256  # requests in one step
    max_num_batched_tokens: int = 2048  # tokens in one step
    max_model_len: int = 2048  # prompt + max_tokens of one request
    enable_chunked_prefill: bool = True  # a prompt may be split over steps, mixed with decodes
    long_prefill_token_threshold: int = 0  # > 0: a request computes at most this many tokens a step
    preemption_mode: str = "recompute"  # "recompute" | "swap" (to CacheConfig.num_host_pages host slots)

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "long_prefill_token_threshold"):
            value, minimum = getattr(self, name), 0 if name == "long_prefill_token_threshold" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
        if self.preemption_mode not in ("recompute", "swap"):
            raise ValueError(f"preemption_mode must be 'recompute' or 'swap', got {self.preemption_mode!r}.")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs}): every running request needs a token a step."
            )
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_model_len "
                f"({self.max_model_len}) when enable_chunked_prefill is False: a prompt runs in one step."
            )


@dataclass(slots=True)
class ScheduledRequest:
    """One request's share of a step, the row the runner computes: token_ids[j] sits at position
    num_computed_tokens + j. A token sampled by a step still in flight is -1 here (async
    scheduling: the runner reads it on the device)."""

    request_id: str
    token_ids: list[int]  # the tokens to run this step (a prefill chunk, or one decode token)
    num_computed_tokens: int  # tokens already in the pages before the step: token_ids[0]'s position
    block_table: list[int]  # the request's page ids; covers positions < num_computed_tokens + len(token_ids)
    sample: bool  # the chunk ends at the request's last token: sample one new token after it
    request: Request = field(repr=False)  # sampling_params, output_token_ids (penalties, seed step)

    @property
    def sampling_params(self):
        return self.request.sampling_params

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.request.prompt_token_ids

    @property
    def output_token_ids(self) -> list[int]:
        return self.request.output_token_ids


@dataclass
class SchedulerOutput:
    """What runs in one step.

    Before the step, in this order: copy each (device page, host slot) of `swap_out` to the host
    (the pages as the steps before left them; they may be reused by this very step), each
    (host slot, device page) of `swap_in` to the device (no host slot is in both lists), then
    each (src, dst) page of `cow_copies` in order (or all sources first, then all destinations:
    no page is a destination twice; a source may be a page just swapped in). Full pages are
    prefix-cached as soon as they are scheduled, so a request may read K/V that another request
    writes in this same step: within a layer, write every token's K/V before attention reads
    (the model's per-layer order already does).
    """

    scheduled: list[ScheduledRequest]  # batch order
    total_num_scheduled_tokens: int
    cow_copies: list[tuple[int, int]]  # (src, dst) page copies for copy-on-write
    preempted_ids: list[str]  # preempted in this schedule(); their pages are already free
    finished_ids: list[str]  # finished or aborted since the previous schedule(); pages free
    swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device page, host slot) copies
    swap_in: list[tuple[int, int]] = field(default_factory=list)  # (host slot, device page) copies
    in_flight: bool = False  # commit_in_flight() counted it as run before its tokens came back


@dataclass(frozen=True)
class SchedulerStats:
    """A snapshot of queues, pages, waste and the prefix cache."""

    num_running: int
    num_waiting: int
    num_free_pages: int  # free list + evictable cached pages
    num_usable_pages: int  # the pool without the null page
    kv_waste_slots: int  # allocated-but-unwritten slots over running requests, after the last step
    peak_waste_pages_per_request: float  # max over steps of kv_waste_slots / running / page_size (< 1)
    num_preemptions: int  # by recompute and by swap
    prefix_cache_queries: int  # tokens looked up in the prefix cache
    prefix_cache_hits: int  # tokens served from it
    num_swapped_out: int = 0  # preemptions by swap
    num_swapped_in: int = 0  # requests swapped back in
    num_host_pages: int = 0  # host slots for swapped pages (0 unless preemption_mode="swap")
    num_free_host_pages: int = 0

    @property
    def kv_cache_usage(self) -> float:
        return 1.0 - self.num_free_pages / self.num_usable_pages

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


@dataclass
class _StepPlan:
    """The step being built by schedule()."""

    token_budget: int
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    cow_copies: list[tuple[int, int]] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    swap_in: list[tuple[int, int]] = field(default_factory=list)

    def add(self, req: Request, num_new: int, copies: list[tuple[int, int]]) -> None:
        start, end = req.num_computed_tokens, req.num_computed_tokens + num_new
        token_ids = req.token_ids_between(start, end)
        self.scheduled.append(
            ScheduledRequest(req.request_id, token_ids, start, list(req.block_table), end == req.num_tokens, req)
        )
        self.cow_copies.extend(copies)
        self.token_budget -= num_new


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Scheduler:
    """Decides each step which requests run and which of their tokens; asks the KV-cache manager for pages."""

    def __init__(self, config: SchedulerConfig, cache_config: CacheConfig):
        if cache_config.num_pages is None:
            raise ValueError("cache_config.num_pages must be set before building a Scheduler (the runner sizes it).")
        self.config = config
        self.page_size = cache_config.page_size
        self.kv_cache = KVCacheManager(
            cache_config.num_pages, cache_config.page_size, enable_prefix_caching=cache_config.enable_prefix_caching,
            num_host_pages=cache_config.num_host_pages if config.preemption_mode == "swap" else 0,
            sliding_window=cache_config.sliding_window)
        self.requests: dict[str, Request] = {}  # every unfinished request, by id
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: the last one is preempted first
        self._groups: dict[str, list[Request]] = {}  # parent id -> its unfinished samples or beams
        self._finished_ids: list[str] = []
        self.num_preemptions = 0
        self.num_swapped_out = 0
        self.num_swapped_in = 0
        self.kv_waste_slots = 0
        self.peak_waste_pages_per_request = 0.0

    # ------------------------------------------------------------------ requests in and out

    def add_request(self, request: Request) -> list[Request]:
        """Queues `request`, or with n > 1 (best_of) its samples "{i}_{request_id}"; returns what was queued.

        Raises ValueError, before queueing anything, for a request that could never run.
        """
        self._check_request(request)
        num_sequences = request.sampling_params.num_sequences
        queued = [request] if num_sequences == 1 else request.make_samples(num_sequences)
        for rid in {request.request_id} | {req.request_id for req in queued}:
            self._check_unused(rid)
        for req in queued:
            self._register(req)
            self.waiting.append(req)
        return queued

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        """Aborts requests (a parent id aborts all its samples or beams); unknown or finished ids are ignored."""
        self.finish_request(request_ids, RequestStatus.FINISHED_ABORTED)

    def finish_request(
        self,
        request_ids: str | Iterable[str],
        reason: RequestStatus | str = RequestStatus.FINISHED_STOPPED,
        stop_reason: int | str | None = None,
    ) -> None:
        """Finishes requests from outside (a stop string matched, an abort, an error); frees their pages.

        `reason` is a FINISHED_* status or its finish_reason ("stop", "length", "abort", "error").
        Call it between update_from_output() and the next schedule().
        """
        status = reason if isinstance(reason, RequestStatus) else RequestStatus.from_finish_reason(reason)
        if not status.is_finished:
            raise ValueError(f"reason must be a FINISHED_* status, got {status.name}.")
        for request_id in [request_ids] if isinstance(request_ids, str) else list(request_ids):
            for req in list(self._groups.get(request_id, [])) or [self.requests.get(request_id)]:
                if req is not None and not req.is_finished:
                    req.stop_reason = stop_reason
                    self._remove_from_queues(req)
                    req.status = status
                    self._release(req)

    def fork_request(self, parent_id: str, child_id: str, *, last_token_id: int | None = None) -> Request:
        """Beam search: a new running request `child_id` that shares all of a running parent's pages.

        The child copies the parent's tokens and counters (with its last, not yet computed, output
        token swapped for `last_token_id` when given). It runs from the next step; whichever of
        the two writes the shared partial page first gets a copy (copy-on-write). Call it between
        update_from_output() and the next schedule().
        """
        parent = self.requests.get(parent_id)
        if parent is None or parent.status != RequestStatus.RUNNING:
            raise ValueError(f"can only fork a running request; {parent_id!r} is not one.")
        self._check_unused(child_id)
        child = Request(
            child_id, parent.prompt_token_ids, parent.sampling_params, parent.eos_token_id,
            parent.arrival_time, parent.prompt, parent.parent_id, parent.index,
        )  # fmt: skip
        child.max_tokens = parent.max_tokens
        child.append_output_token_ids(list(parent.output_token_ids))
        child.num_cached_tokens = parent.num_cached_tokens
        child.metrics.first_scheduled_time = parent.metrics.first_scheduled_time
        self.kv_cache.fork(parent, child)
        child.num_computed_tokens = parent.num_computed_tokens
        child.status = RequestStatus.RUNNING
        self._register(child)
        self.running.append(child)  # may pass max_num_seqs for a step: schedule() caps the batch
        if last_token_id is not None:
            child.replace_last_output_token(last_token_id)
            if child.check_stop(self.config.max_model_len):
                self.running.remove(child)
                self._release(child)
        return child

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    # ------------------------------------------------------------------ one step

    def schedule(self) -> SchedulerOutput:
        """Picks this step's tokens: running requests first (preempting if pages run out), then waiting ones."""
        plan = _StepPlan(token_budget=self.config.max_num_batched_tokens)
        self._schedule_running(plan)
        if not plan.preempted_ids:
            self._schedule_waiting(plan)
        self._measure_waste(plan)
        finished_ids, self._finished_ids = self._finished_ids, []
        return SchedulerOutput(
            scheduled=plan.scheduled,
            total_num_scheduled_tokens=self.config.max_num_batched_tokens - plan.token_budget,
            cow_copies=plan.cow_copies,
            preempted_ids=plan.preempted_ids,
            finished_ids=finished_ids,
            swap_out=plan.swap_out,
            swap_in=plan.swap_in,
        )

    def commit_in_flight(self, scheduler_output: SchedulerOutput) -> None:
        """Async scheduling: counts a launched step as run before its sampled tokens are back.

        Its requests' computed tokens advance now and each sampling row leaves one pending token,
        so the next schedule() can run their decodes (the token is read on device); a request
        whose pending token reaches max_tokens or max_model_len is not scheduled again.
        update_from_output() later fills the pending tokens in.
        """
        for s in scheduler_output.scheduled:
            req = s.request
            if req.status != RequestStatus.RUNNING:
                continue
            req.num_computed_tokens += len(s.token_ids)
            if s.sample:
                req.num_pending += 1
        scheduler_output.in_flight = True

    def update_from_output(
        self, scheduler_output: SchedulerOutput, sampled: dict[str, list[int] | int],
        external: Collection[str] = (),
    ) -> list[Request]:
        """Advances the counters of the step just run, appends `sampled` tokens, applies the stop rules.

        Returns the requests that received tokens (finished ones included, with their pages
        already freed). Requests finished or aborted since schedule() are skipped. For a step
        committed in flight, the pending tokens are filled in, also of requests preempted since.
        Rows of `external` request ids take no token here: their counters advance and the caller
        appends their tokens itself (beam search, which picks among its beams' candidates).
        """
        updated = []
        in_flight = scheduler_output.in_flight
        now, any_finished = time.time(), False
        cache_pages = self.kv_cache.enable_prefix_caching and in_flight
        for s in scheduler_output.scheduled:
            req = s.request
            status = req.status
            if status.is_finished or (not in_flight and status != RequestStatus.RUNNING):
                continue
            if not in_flight:
                req.num_computed_tokens += len(s.token_ids)
            if not s.sample or s.request_id in external:
                continue
            token_ids = sampled.get(s.request_id)
            if token_ids is None or token_ids == []:
                raise ValueError(f"no sampled token for {s.request_id!r}, whose chunk ended at its last token.")
            if in_flight:
                req.num_pending -= 1
            finished = self._append_tokens(req, [token_ids] if isinstance(token_ids, int) else token_ids, now)
            any_finished |= finished
            if cache_pages and not finished and req.status == RequestStatus.RUNNING:
                self.kv_cache.cache_full_pages(  # a page its pending token filled
                    req, (len(req.all_token_ids) - 1) // self.page_size * self.page_size, req.num_computed_tokens)
            updated.append(req)
        if any_finished:
            self.running = [req for req in self.running if not req.is_finished]
            self.waiting = deque(req for req in self.waiting if not req.is_finished)
        return updated

    def stats(self) -> SchedulerStats:
        prefix = self.kv_cache.prefix_stats
        swap = self.kv_cache.swap_space
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            num_free_pages=self.kv_cache.num_free_pages,
            num_usable_pages=self.kv_cache.num_usable_pages,
            kv_waste_slots=self.kv_waste_slots,
            peak_waste_pages_per_request=self.peak_waste_pages_per_request,
            num_preemptions=self.num_preemptions,
            prefix_cache_queries=prefix.queries,
            prefix_cache_hits=prefix.hits,
            num_swapped_out=self.num_swapped_out,
            num_swapped_in=self.num_swapped_in,
            num_host_pages=swap.num_slots,
            num_free_host_pages=swap.num_free_slots,
        )

    # ------------------------------------------------------------------ schedule() helpers

    def _schedule_running(self, plan: _StepPlan) -> None:
        i, running, max_num_seqs = 0, self.running, self.config.max_num_seqs
        window = self.kv_cache.sliding_window
        while i < len(running) and plan.token_budget > 0 and len(plan.scheduled) < max_num_seqs:
            req = running[i]
            if req.num_pending and self._finishes_on_pending(req):
                i += 1
                continue
            num_new = self._num_new_tokens(req, req.num_computed_tokens, plan.token_budget)
            if num_new > 0:
                if window:
                    self.kv_cache.remove_skipped_pages(req)  # a sliding window's passed pages go first
                copies = self._allocate_or_preempt(req, num_new, plan)
                if copies is None:
                    break  # `req` itself was preempted: it was the last running request
                plan.add(req, num_new, copies)
            i += 1

    def _allocate_or_preempt(self, req: Request, num_new: int, plan: _StepPlan) -> list[tuple[int, int]] | None:
        """Pages for `req`, preempting running requests from the most recent one; None if `req` itself went."""
        while (copies := self.kv_cache.allocate_slots(req, num_new)) is None:
            victim = self.running.pop()  # never scheduled yet this step: those sit before `req`
            self._preempt(victim, plan)
            plan.preempted_ids.append(victim.request_id)
            if victim is req:
                return None
        return copies

    def _schedule_waiting(self, plan: _StepPlan) -> None:
        skipped = []  # samples waiting for sample 0 to compute the prompt they share
        while self.waiting and plan.token_budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting.popleft()
            if self._waits_for_fork_source(req) or self._has_nothing_to_compute(req):
                skipped.append(req)
            elif not self._admit(req, plan):
                self.waiting.appendleft(req)
                break  # first come first served: nobody overtakes a request that does not fit
        self.waiting.extendleft(reversed(skipped))

    def _admit(self, req: Request, plan: _StepPlan) -> bool:
        if req.num_pending:
            return False  # (async) preempted with its sampled token in flight: admitted once it is back
        if req.swapped_slots:
            return self._swap_in(req, plan)
        shared, num_computed, is_prefix_hit = self.kv_cache.get_computed_pages(req)
        num_new = self._num_new_tokens(req, num_computed, plan.token_budget)
        if num_new == 0:
            return False
        copies = self.kv_cache.allocate_slots(req, num_new, num_computed_tokens=num_computed, shared=shared)
        if copies is None:
            return False
        if is_prefix_hit:
            self.kv_cache.record_prefix_hit(req, num_computed)
        req.fork_source = None
        req.num_computed_tokens = num_computed
        if req.num_cached_tokens < 0:
            req.num_cached_tokens = num_computed
        if req.metrics.first_scheduled_time is None:
            req.metrics.first_scheduled_time = time.time()
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        plan.add(req, num_new, copies)
        return True

    def _swap_in(self, req: Request, plan: _StepPlan) -> bool:
        """Readmits a request preempted by swap: fresh private pages, its host slots copied in, no recompute."""
        num_new = self._num_new_tokens(req, req.num_computed_tokens, plan.token_budget)
        if num_new == 0 or not self.kv_cache.can_swap_in(req, num_new):
            return False
        plan.swap_in.extend(self.kv_cache.swap_in(req))
        cow = self.kv_cache.allocate_slots(req, num_new)
        assert cow == [], cow  # every page is private
        self.num_swapped_in += 1
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        plan.add(req, num_new, cow)
        return True

    def _finishes_on_pending(self, req: Request) -> bool:
        """Its pending token ends it by length, whatever the token: nothing more to compute."""
        pending = req.num_pending
        return pending > 0 and (len(req.output_token_ids) + pending >= req.max_tokens
                                or len(req.all_token_ids) + pending >= self.config.max_model_len)

    @staticmethod
    def _has_nothing_to_compute(req: Request) -> bool:
        """A request swapped out with every token computed and none pending: nothing to run until
        something else gives it its next token. A beam is one (its group picks the next token once its
        sibling beams, running or waiting behind it, have run). It keeps its place but must not block
        the queue (a beam waiting on a sibling behind it was a hang)."""
        return bool(req.swapped_slots) and not req.num_pending and req.num_computed_tokens >= req.num_tokens

    def _waits_for_fork_source(self, req: Request) -> bool:
        src = req.fork_source  # a source swapped out has the tokens, not the pages: wait for it too
        return src is not None and not src.is_finished and (
            src.status != RequestStatus.RUNNING or src.num_computed_tokens < req.fork_num_tokens)

    def _num_new_tokens(self, req: Request, num_computed: int, token_budget: int) -> int:
        """Tokens `req` computes this step from `num_computed`; 0 if a whole prompt does not fit unchunked."""
        num_new = req.num_tokens - num_computed
        threshold = self.config.long_prefill_token_threshold
        if 0 < threshold < num_new:
            num_new = threshold
        if num_new > token_budget:
            num_new = token_budget if self.config.enable_chunked_prefill else 0
        return num_new

    def _preempt(self, req: Request, plan: _StepPlan) -> None:
        """Pages back to the pool, outputs kept, to the front of the queue; by swap (its computed
        tokens' pages copied to host slots, listed in `plan.swap_out`) when the mode says so and
        slots are free, else by recompute."""
        copies = self.kv_cache.swap_out(req) if self.config.preemption_mode == "swap" else None
        if copies is None:
            self.kv_cache.free(req)
            req.num_computed_tokens = 0
        else:
            plan.swap_out.extend(copies)
            self.num_swapped_out += 1
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _measure_waste(self, plan: _StepPlan) -> None:
        """Allocated slots that hold no K/V once this step has run, over the running requests."""
        # Every scheduled request is running (a preempted one left before it was scheduled).
        num_scheduled = self.config.max_num_batched_tokens - plan.token_budget
        self.kv_waste_slots = (sum(len(r.block_table) for r in self.running) * self.page_size
                               - sum(r.num_computed_tokens for r in self.running) - num_scheduled)
        if self.running:
            ratio = self.kv_waste_slots / (len(self.running) * self.page_size)
            self.peak_waste_pages_per_request = max(self.peak_waste_pages_per_request, ratio)

    # ------------------------------------------------------------------ tokens, stops, release

    def _append_tokens(self, req: Request, token_ids: list[int], now: float) -> bool:
        """Appends sampled tokens to `req` up to the first that stops it; True if one did (its pages are back)."""
        metrics = req.metrics
        if metrics.first_token_time is None:
            metrics.first_token_time = now
        metrics.last_token_time = now
        for token_id in token_ids:  # more than one only with speculative decoding
            req.append_output_token_ids(token_id)
            if req.check_stop(self.config.max_model_len):
                self._release(req)
                return True
        return False

    def _remove_from_queues(self, req: Request) -> None:
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)

    def _release(self, req: Request) -> None:
        """A finished request gives back its pages and leaves the scheduler."""
        self.kv_cache.free(req)
        req.fork_source = None
        req.metrics.finished_time = time.time()
        del self.requests[req.request_id]
        self._finished_ids.append(req.request_id)
        if req.parent_id is not None:
            group = self._groups[req.parent_id]
            group.remove(req)
            if not group:
                del self._groups[req.parent_id]

    # ------------------------------------------------------------------ add_request() helpers

    def _check_unused(self, request_id: str) -> None:
        if request_id in self.requests or request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already in use.")

    def _register(self, req: Request) -> None:
        self.requests[req.request_id] = req
        if req.parent_id is not None:
            self._groups.setdefault(req.parent_id, []).append(req)

    def _check_request(self, request: Request) -> None:
        """Rejects, with the numbers, a request that could never run."""
        rid, n_prompt, max_len = request.request_id, request.num_prompt_tokens, self.config.max_model_len
        if n_prompt == 0:
            raise ValueError(f"request {rid!r}: the prompt is empty; at least one token is needed.")
        if not all(isinstance(t, int) and t >= 0 for t in request.prompt_token_ids):
            raise ValueError(f"request {rid!r}: prompt_token_ids must be integers >= 0.")
        if n_prompt >= max_len:
            raise ValueError(
                f"request {rid!r}: the prompt has {n_prompt} tokens, max_model_len is {max_len}: no room to generate."
            )
        if request.max_tokens is None:
            request.max_tokens = max_len - n_prompt
        if n_prompt + request.max_tokens > max_len:
            raise ValueError(
                f"request {rid!r}: prompt ({n_prompt} tokens) + max_tokens ({request.max_tokens}) = "
                f"{n_prompt + request.max_tokens} exceeds max_model_len ({max_len})."
            )
        # The last token's K/V is never written: it is sampled, not fed back.
        num_pages = _cdiv(n_prompt + request.max_tokens - 1, self.page_size)
        window = self.kv_cache.sliding_window
        if window:  # at most the window and a step's tokens are held at once (remove_skipped_pages)
            num_pages = min(num_pages, _cdiv(window + self.config.max_num_batched_tokens, self.page_size) + 1)
        if num_pages > self.kv_cache.num_usable_pages:
            raise ValueError(
                f"request {rid!r}: needs up to {num_pages} pages of {self.page_size} tokens (prompt {n_prompt} "
                f"+ max_tokens {request.max_tokens}), the KV cache holds {self.kv_cache.num_usable_pages}."
            )
