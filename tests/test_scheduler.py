"""Scheduler driven by a fake paged model, checked against a plain generation loop.

The fake model keeps a fake KV pool: each slot holds (token, position). A step performs the
copy-on-write copies, writes every scheduled token into the slots its block table names, then,
for each request that samples, reads its whole context back *through its block table* and hashes
it into the next token. A wrong page, a missed copy, a stale prefix hit or a shared page written
in place all change the context, hence the tokens, so outputs are compared token for token with
`reference_generate`, which never touches pages. Preemption by swap copies pages to a fake host
(slot -> page contents) and back into fresh pages, so a lost or misplaced swap shows the same way.
"""

import random
from collections import Counter

import pytest

from pagedjax.kv_cache.block_allocator import NULL_PAGE, CacheConfig
from pagedjax.request import Request, RequestStatus
from pagedjax.sampling_params import BeamSearchParams, SamplingParams
from pagedjax.scheduler import Scheduler, SchedulerConfig

VOCAB, EOS = 48, 0


def next_token(context, seed=0):
    return hash((seed, *context)) % VOCAB


def reference_generate(prompt, sp, max_model_len, eos=EOS, start=(), window=0):
    """(output tokens, finish_reason, stop_reason) of one request generated alone, no pages.

    `start`: outputs already there (a forked beam's), checked like any output before going on.
    `window`: the model reads only the last `window` tokens (a sliding window on every layer).
    """
    seed = getattr(sp, "seed", None) or 0
    max_tokens = sp.max_tokens if sp.max_tokens is not None else max_model_len - len(prompt)
    out = list(start)
    while True:
        if out:
            t = out[-1]
            if len(out) >= sp.min_tokens:
                if t == eos and not sp.ignore_eos:
                    return out, "stop", None
                if t in sp.stop_token_ids:
                    return out, "stop", t
            if len(out) >= max_tokens or len(prompt) + len(out) >= max_model_len:
                return out, "length", None
        context = prompt + out
        out.append(next_token(context[-window:] if window else context, seed))


class FakeRunner:
    """Runs SchedulerOutputs on a fake page pool and checks the page discipline as it goes.

    With a sliding window W the model reads a sampling request's last W positions only (the
    pages before them may have been freed and reused by others)."""

    def __init__(self, sched):
        self.sched = sched
        self.window = sched.kv_cache.sliding_window
        self.ps = sched.page_size
        self.pool = [[None] * self.ps for _ in range(sched.kv_cache.allocator.num_pages)]
        self.host = {}  # host slot -> a swapped-out page's contents
        self.outputs = []
        self.num_copies = 0
        self.num_swapped_pages = 0
        self.last_sampled = {}  # the device's copy of each request's newest token (async scheduling)

    def step(self, out):
        self.outputs.append(out)
        ps, alloc = self.ps, self.sched.kv_cache.allocator
        # Swaps run before the copy-on-write copies (a copy may read a page just swapped in).
        assert not {slot for _, slot in out.swap_out} & {slot for slot, _ in out.swap_in}
        for page, slot in out.swap_out:  # the page may be free already, even reused by this step
            assert page != NULL_PAGE
            self.host[slot] = list(self.pool[page])
            self.num_swapped_pages += 1
        for slot, page in out.swap_in:
            assert page != NULL_PAGE and alloc.ref_count(page) >= 1, "swaps into a free page"
            self.pool[page] = list(self.host.pop(slot))
        for src, dst in out.cow_copies:
            assert NULL_PAGE not in (src, dst)
            self.pool[dst] = list(self.pool[src])
            self.num_copies += 1
        writers = Counter()
        for s in out.scheduled:  # every K/V of the step is written before anything is read
            assert len(s.block_table) * ps >= s.num_computed_tokens + len(s.token_ids)
            for j, t in enumerate(s.token_ids):
                pos = s.num_computed_tokens + j
                if t == -1:  # pending on the host: the previous step sampled it on the device
                    assert j == len(s.token_ids) - 1, "only a decode's last token can be pending"
                    t = self.last_sampled[s.request_id]
                page = s.block_table[pos // ps]
                # A shared page is written only by the request that fills it in the step where
                # others start reusing it (prefix hits in the same step): one writer per slot.
                assert page != NULL_PAGE and alloc.ref_count(page) >= 1, "writes a free page"
                writers[page, pos % ps] += 1
                self.pool[page][pos % ps] = (t, pos)
        assert max(writers.values(), default=1) == 1
        sampled = {}
        for s in out.scheduled:
            if s.sample:
                end = s.num_computed_tokens + len(s.token_ids)
                context = []
                for pos in range(max(end - self.window, 0) if self.window else 0, end):
                    slot = self.pool[s.block_table[pos // ps]][pos % ps]
                    assert slot is not None and slot[1] == pos, f"{s.request_id}: position {pos} not in its pages"
                    context.append(slot[0])
                sampled[s.request_id] = [next_token(context, getattr(s.request.sampling_params, "seed", None) or 0)]
                self.last_sampled[s.request_id] = sampled[s.request_id][0]
        return sampled


def check_invariants(sched, out):
    cfg, ps = sched.config, sched.page_size
    assert out.total_num_scheduled_tokens == sum(len(s.token_ids) for s in out.scheduled)
    assert out.total_num_scheduled_tokens <= cfg.max_num_batched_tokens
    assert len(out.scheduled) <= cfg.max_num_seqs
    assert len({s.request_id for s in out.scheduled}) == len(out.scheduled)
    scheduled = {s.request_id: len(s.token_ids) for s in out.scheduled}
    for s in out.scheduled:
        assert s.token_ids == s.request.token_ids_between(s.num_computed_tokens, s.num_computed_tokens + len(s.token_ids))
        assert s.sample == (s.num_computed_tokens + len(s.token_ids) == s.request.num_tokens)
        if 0 < cfg.long_prefill_token_threshold:
            assert len(s.token_ids) <= cfg.long_prefill_token_threshold
    for r in sched.running:  # waste: allocated-but-unwritten slots, under one page per request
        waste = len(r.block_table) * ps - r.num_computed_tokens - scheduled.get(r.request_id, 0)
        assert 0 <= waste < ps, (r, waste)
    # Null entries only where a sliding window has passed; a scheduled request holds none there.
    kv = sched.kv_cache
    for r in sched.requests.values():
        skipped = kv.num_skipped_pages(r.num_computed_tokens)
        assert NULL_PAGE not in r.block_table[skipped:], (r, r.block_table)
        if kv.sliding_window:  # the window and this step's tokens at most
            held = len(r.block_table) - r.block_table.count(NULL_PAGE)
            assert held <= -(-(kv.sliding_window + cfg.max_num_batched_tokens) // ps) + 1, (r, r.block_table)
    for s in out.scheduled:
        assert set(s.block_table[:kv.num_skipped_pages(s.num_computed_tokens)]) <= {NULL_PAGE}, "not released"
    # Reference counts are exactly the number of block tables naming each page.
    in_tables = Counter(p for r in sched.requests.values() for p in r.block_table if p != NULL_PAGE)
    alloc = sched.kv_cache.allocator
    assert all(alloc.ref_count(p) == in_tables[p] for p in range(1, alloc.num_pages))
    assert alloc.num_free_pages == alloc.num_usable_pages - len(in_tables)
    # Host slots: held only by swapped-out requests, which wait with no pages.
    swapped = [r for r in sched.requests.values() if r.swapped_slots]
    slots = [slot for r in swapped for slot in r.swapped_slots]
    assert len(set(slots)) == len(slots) == sched.kv_cache.swap_space.num_slots - sched.kv_cache.swap_space.num_free_slots
    for r in swapped:
        assert r.status == RequestStatus.PREEMPTED and r in sched.waiting and not r.block_table
        num_pages = -(-r.num_computed_tokens // ps)  # less the pages a sliding window had freed
        assert num_pages - kv.num_skipped_pages(r.num_computed_tokens) <= len(r.swapped_slots) <= num_pages


def run(sched, arrivals, max_steps=20_000):
    """Adds arrivals[step] before each step, runs to the end; returns {request_id: finished Request}."""
    runner = FakeRunner(sched)
    finished, step = {}, 0
    while step < len(arrivals) or sched.has_unfinished_requests():
        for req in arrivals[step] if step < len(arrivals) else []:
            sched.add_request(req)
        running_before = {r.request_id for r in sched.running}
        out = sched.schedule()
        assert out.scheduled or not sched.has_unfinished_requests(), "requests left but nothing scheduled: a hang"
        check_invariants(sched, out)
        if out.preempted_ids:  # no admissions in a step that preempts; the preempted go first next
            assert {s.request_id for s in out.scheduled} <= running_before
            assert {w.request_id for w in list(sched.waiting)[: len(out.preempted_ids)]} == set(out.preempted_ids)
        for req in sched.update_from_output(out, runner.step(out)):
            if req.is_finished:
                finished[req.request_id] = req
        step += 1
        assert step < max_steps
    return finish(sched, runner, finished)


def finish(sched, runner, finished):
    """After a run: every page and host slot back, no request left; the runner carries `finished`."""
    assert sched.kv_cache.allocator.num_free_pages == sched.kv_cache.allocator.num_usable_pages, "pages leaked"
    assert sched.kv_cache.swap_space.num_free_slots == sched.kv_cache.swap_space.num_slots, "host slots leaked"
    assert not sched.running and not sched.waiting and not sched.requests
    runner.finished = finished
    return runner


def run_async(sched, arrivals, max_steps=20_000):
    """run(), pipelined as the engine's async scheduling: step n+1 is scheduled and launched
    before step n's tokens reach the scheduler (the fake runner executes at launch, in order)."""
    runner = FakeRunner(sched)
    finished, step, in_flight = {}, 0, None
    while step < len(arrivals) or sched.has_unfinished_requests() or in_flight:
        for req in arrivals[step] if step < len(arrivals) else []:
            sched.add_request(req)
        out = sched.schedule()
        check_invariants(sched, out)
        launched = None
        if out.scheduled:
            launched = (out, runner.step(out))
            sched.commit_in_flight(out)
        else:
            assert in_flight or not sched.has_unfinished_requests(), "requests left but nothing scheduled: a hang"
        if in_flight:
            for req in sched.update_from_output(*in_flight):
                if req.is_finished:
                    finished[req.request_id] = req
        in_flight = launched
        step += 1
        assert step < max_steps
    return finish(sched, runner, finished)


def make_sched(num_pages=256, page_size=4, prefix=True, num_host_pages=256, sliding_window=0, **cfg):
    cfg = dict(dict(max_num_seqs=16, max_num_batched_tokens=64, max_model_len=128), **cfg)
    cache = CacheConfig(page_size=page_size, num_pages=num_pages, enable_prefix_caching=prefix,
                        num_host_pages=num_host_pages, sliding_window=sliding_window)
    return Scheduler(SchedulerConfig(**cfg), cache)


def computed_positions(runner):
    """How many times each (request id, position) was computed, over the steps run."""
    return Counter((s.request_id, s.num_computed_tokens + j)
                   for o in runner.outputs for s in o.scheduled for j in range(len(s.token_ids)))


def check_preemptions(sched, runner, mode):
    """Preemptions happened; by swap, each one kept its K/V: no position was computed twice."""
    stats = sched.stats()
    assert stats.num_preemptions > 0
    if mode == "swap":
        # (a request can finish while swapped out: its pending token ended it)
        assert 0 < stats.num_swapped_in <= stats.num_swapped_out == stats.num_preemptions
        assert runner.num_swapped_pages == sum(len(o.swap_out) for o in runner.outputs) > 0
        assert max(computed_positions(runner).values()) == 1
    else:
        assert stats.num_swapped_out == 0 and not any(o.swap_out or o.swap_in for o in runner.outputs)


def random_requests(rng, n, *, max_prompt=60, max_out=30, prefix=(), tag="r", **sp):
    reqs = []
    for i in range(n):
        prompt = list(prefix) + [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, max_prompt))]
        params = SamplingParams(max_tokens=rng.randint(1, max_out), seed=rng.randrange(100), **sp)
        reqs.append(Request(f"{tag}{i}", prompt, params, eos_token_id=EOS))
    return reqs


def waves(reqs, every=5, size=8):
    arrivals = []
    for i in range(0, len(reqs), size):
        arrivals += [reqs[i : i + size]] + [[] for _ in range(every - 1)]
    return arrivals


def assert_matches_reference(runner, reqs, max_model_len=128):
    assert set(runner.finished) == {r.request_id for r in reqs}
    for r in reqs:
        got = runner.finished[r.request_id]
        out, reason, stop_reason = reference_generate(r.prompt_token_ids, r.sampling_params, max_model_len,
                                                      window=runner.window)
        assert got.output_token_ids == out, r.request_id
        assert (got.finish_reason, got.stop_reason) == (reason, stop_reason)
        assert got.block_table == []


# ---------------------------------------------------------------------------- the main scenarios


def test_one_request():
    req = Request("a", [5, 6, 7, 8, 9], SamplingParams(max_tokens=12, seed=3), eos_token_id=EOS)
    runner = run(make_sched(), [[req]])
    assert_matches_reference(runner, [req])
    assert runner.outputs[0].scheduled[0].token_ids == [5, 6, 7, 8, 9]  # the whole prompt in one step


@pytest.mark.parametrize("prefix", [True, False])
def test_waves_of_random_requests(prefix):
    rng = random.Random(0)
    reqs = random_requests(rng, 40)
    sched = make_sched(prefix=prefix)
    runner = run(sched, waves(reqs))
    assert_matches_reference(runner, reqs)
    assert max(len(o.scheduled) for o in runner.outputs) > 8  # continuous batching: waves overlap
    assert {"stop", "length"} <= {r.finish_reason for r in runner.finished.values()}
    stats = sched.stats()
    assert 0 < stats.peak_waste_pages_per_request < 1.0
    assert stats.num_free_pages == stats.num_usable_pages


@pytest.mark.parametrize("prefix", [True, False])
@pytest.mark.parametrize("mode", ["recompute", "swap"])
@pytest.mark.parametrize("driver", [run, run_async])
def test_small_pool_preempts_and_resumes_with_identical_outputs(prefix, mode, driver):
    rng = random.Random(1)
    reqs = random_requests(rng, 32, max_prompt=40, max_out=40)
    big = run(make_sched(prefix=prefix), waves(reqs, every=2))
    reqs2 = [Request(r.request_id, r.prompt_token_ids, r.sampling_params, eos_token_id=EOS) for r in reqs]
    # 80 tokens is the longest request: the pool fits about two of the largest at once.
    sched = make_sched(num_pages=1 + 2 * 80 // 4, prefix=prefix, preemption_mode=mode)
    small = driver(sched, waves(reqs2, every=2))
    check_preemptions(sched, small, mode)
    assert any(r.num_preemptions for r in small.finished.values())
    if prefix and mode == "recompute":  # resumed requests find their own pages still cached
        assert sched.stats().prefix_cache_hits > 0
    assert_matches_reference(small, reqs2)
    for rid, req in big.finished.items():
        assert small.finished[rid].output_token_ids == req.output_token_ids


@pytest.mark.parametrize("driver", [run, run_async])
def test_swap_falls_back_to_recompute_when_host_slots_run_out(driver):
    rng = random.Random(1)
    reqs = random_requests(rng, 32, max_prompt=40, max_out=40)
    sched = make_sched(num_pages=1 + 2 * 80 // 4, preemption_mode="swap", num_host_pages=6)
    runner = driver(sched, waves(reqs, every=2))
    assert_matches_reference(runner, reqs)
    stats = sched.stats()
    assert 0 < stats.num_swapped_out < stats.num_preemptions  # some swapped, some recomputed
    assert stats.num_host_pages == stats.num_free_host_pages == 6
    assert max(len(o.swap_out) for o in runner.outputs) <= 6
    assert max(computed_positions(runner).values()) > 1  # the recomputed ones


def test_a_swapped_request_waits_for_its_token_in_flight():
    """Async: B is swapped out while the step that samples its next token is in flight; it is
    readmitted only once that token is back, then continues from where it was."""
    sched = make_sched(num_pages=1 + 4, preemption_mode="swap")
    runner = FakeRunner(sched)
    sp = SamplingParams(max_tokens=6, ignore_eos=True, seed=4)
    a, b = Request("a", list(range(1, 9)), sp), Request("b", list(range(11, 19)), sp)
    sched.add_request(a)
    sched.add_request(b)
    out1 = sched.schedule()  # both prompts: all 4 pages
    sampled1 = runner.step(out1)
    sched.commit_in_flight(out1)
    out2 = sched.schedule()  # a's first decode needs a page: b is swapped out, its token pending
    assert out2.preempted_ids == ["b"] and len(out2.swap_out) == 2 and b.num_pending == 1
    assert b.num_computed_tokens == 8 and b.status == RequestStatus.PREEMPTED
    runner.step(out2)
    sched.commit_in_flight(out2)
    sched.abort_request("a")  # every page free: only b's pending token keeps it out
    out3 = sched.schedule()
    assert not out3.scheduled and not out3.swap_in and b.swapped_slots
    sched.update_from_output(out1, sampled1)
    sched.update_from_output(out2, {})
    out4 = sched.schedule()
    assert [(s.request_id, s.num_computed_tokens, s.token_ids) for s in out4.scheduled] == [("b", 8, b.output_token_ids)]
    assert [slot for slot, _ in out4.swap_in] == [slot for _, slot in out2.swap_out]
    finished = {}
    out = out4
    while True:
        finished.update({r.request_id: r for r in sched.update_from_output(out, runner.step(out)) if r.is_finished})
        if not sched.has_unfinished_requests():
            break
        out = sched.schedule()
        check_invariants(sched, out)
    assert finished["b"].output_token_ids == reference_generate(b.prompt_token_ids, sp, 128)[0]
    assert sched.kv_cache.allocator.num_free_pages == sched.kv_cache.allocator.num_usable_pages
    assert sched.kv_cache.swap_space.num_free_slots == sched.kv_cache.swap_space.num_slots


def test_chunked_prefill_under_a_small_budget_mixes_chunks_with_decodes():
    rng = random.Random(2)
    reqs = random_requests(rng, 12, max_prompt=50, max_out=20)
    sched = make_sched(max_num_batched_tokens=8, max_num_seqs=4)
    runner = run(sched, waves(reqs, every=3, size=3))
    assert_matches_reference(runner, reqs)
    mixed = [
        o for o in runner.outputs
        if any(len(s.token_ids) > 1 for s in o.scheduled) and any(len(s.token_ids) == 1 and s.num_computed_tokens >= s.request.num_prompt_tokens for s in o.scheduled)
    ]  # fmt: skip
    assert mixed, "no step mixed a prefill chunk with a decode"
    chunked = [s for o in runner.outputs for s in o.scheduled if not s.sample and len(s.token_ids) > 0]
    assert chunked, "no prompt was split"
    assert max(o.total_num_scheduled_tokens for o in runner.outputs) == 8


def test_long_prefill_token_threshold_caps_chunks():
    rng = random.Random(3)
    reqs = random_requests(rng, 8, max_prompt=40)
    runner = run(make_sched(long_prefill_token_threshold=5), [reqs])  # invariants check the cap
    assert_matches_reference(runner, reqs)


def test_without_chunked_prefill_prompts_run_whole():
    rng = random.Random(4)
    reqs = random_requests(rng, 16, max_prompt=50)
    sched = make_sched(enable_chunked_prefill=False, max_num_batched_tokens=128)
    runner = run(sched, waves(reqs, every=2))
    assert_matches_reference(runner, reqs)
    first_chunks = {}
    for o in runner.outputs:
        for s in o.scheduled:
            first_chunks.setdefault(s.request_id, s)
    assert all(s.token_ids == s.request.prompt_token_ids and s.sample for s in first_chunks.values())


def test_max_num_seqs_caps_the_batch():
    rng = random.Random(5)
    reqs = random_requests(rng, 20)
    runner = run(make_sched(max_num_seqs=3), [reqs])
    assert_matches_reference(runner, reqs)
    assert max(len(o.scheduled) for o in runner.outputs) == 3


def test_prefix_cache_hits_on_a_shared_prefix():
    rng = random.Random(6)
    shared = [rng.randrange(1, VOCAB) for _ in range(48)]
    reqs = random_requests(rng, 20, max_prompt=10, prefix=shared)
    sched = make_sched(max_num_batched_tokens=128)
    runner = run(sched, [reqs[:1], [], reqs[1:]])  # the rest arrive while the first decodes
    assert_matches_reference(runner, reqs)
    stats = sched.stats()
    assert stats.prefix_cache_hits >= 19 * 48  # every later prompt skips the whole shared prefix
    assert 0 < stats.prefix_cache_hit_rate < 1
    computed = sum(o.total_num_scheduled_tokens for o in runner.outputs)

    reqs2 = [Request(r.request_id, r.prompt_token_ids, r.sampling_params, eos_token_id=EOS) for r in reqs]
    sched2 = make_sched(max_num_batched_tokens=128, prefix=False)
    runner2 = run(sched2, [reqs2[:1], [], reqs2[1:]])
    assert computed <= sum(o.total_num_scheduled_tokens for o in runner2.outputs) - 19 * 48
    assert sched2.stats().prefix_cache_hits == 0


def test_prefix_cache_hits_within_one_step():
    shared = list(range(1, 33))
    reqs = [Request(f"r{i}", shared + [40 + i], SamplingParams(max_tokens=3), eos_token_id=EOS) for i in range(6)]
    sched = make_sched(max_num_batched_tokens=128)
    runner = run(sched, [reqs])
    assert_matches_reference(runner, reqs)
    first = runner.outputs[0]
    assert len(first.scheduled) == 6
    # r0 computes the 32 shared tokens; the others reuse its pages, written in this very step.
    assert [len(s.token_ids) for s in first.scheduled] == [33, 1, 1, 1, 1, 1]


def test_a_fully_cached_prompt_still_computes_its_last_token():
    prompt = list(range(1, 17))  # exactly 4 pages of 4
    a = Request("a", prompt, SamplingParams(max_tokens=2), eos_token_id=EOS)
    b = Request("b", prompt, SamplingParams(max_tokens=2), eos_token_id=EOS)
    runner = run(make_sched(), [[a], [], [], [b]])
    first_b = next(s for o in runner.outputs for s in o.scheduled if s.request_id == "b")
    assert first_b.num_computed_tokens == 12 and first_b.token_ids == prompt[12:] and first_b.sample
    assert runner.finished["b"].num_cached_tokens == 12
    assert_matches_reference(runner, [a, b])


def test_lru_eviction_under_pressure_keeps_outputs_right():
    rng = random.Random(7)
    groups = [[rng.randrange(1, VOCAB) for _ in range(24)] for _ in range(4)]
    reqs = []
    for i in range(24):
        prompt = groups[i % 4] + [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 8))]
        reqs.append(Request(f"r{i}", prompt, SamplingParams(max_tokens=rng.randint(1, 12), seed=i), eos_token_id=EOS))
    sched = make_sched(num_pages=1 + 24)
    runner = run(sched, waves(reqs, every=3, size=2))
    assert_matches_reference(runner, reqs)
    assert sched.kv_cache.allocator.num_evictions > 0 and sched.stats().prefix_cache_hits > 0


# ---------------------------------------------------------------------------- stop rules


def drive(sched, tokens):
    """One step, with `tokens[request_id]` as the sampled tokens; returns the updated requests."""
    out = sched.schedule()
    check_invariants(sched, out)
    return out, sched.update_from_output(out, {s.request_id: [tokens[s.request_id]] for s in out.scheduled if s.sample})


def test_stop_rules():
    sched = make_sched()
    reqs = {
        "eos": Request("eos", [1, 2], SamplingParams(max_tokens=10), eos_token_id=EOS),
        "ignore": Request("ignore", [1, 2], SamplingParams(max_tokens=3, ignore_eos=True), eos_token_id=EOS),
        "min": Request("min", [1, 2], SamplingParams(max_tokens=10, min_tokens=2, stop_token_ids=[7]), eos_token_id=EOS),
        "stop_id": Request("stop_id", [1, 2], SamplingParams(max_tokens=10, stop_token_ids=[7, 9]), eos_token_id=EOS),
        "length": Request("length", [1, 2], SamplingParams(max_tokens=2), eos_token_id=EOS),
    }
    for r in reqs.values():
        sched.add_request(r)
    drive(sched, {"eos": EOS, "ignore": EOS, "min": EOS, "stop_id": 5, "length": 5})
    assert reqs["eos"].finish_reason == "stop" and reqs["eos"].stop_reason is None
    assert not reqs["ignore"].is_finished and not reqs["min"].is_finished
    out, _ = drive(sched, {"ignore": EOS, "min": 7, "stop_id": 9, "length": 5})
    assert out.finished_ids == ["eos"]  # reported once, by the next schedule()
    assert reqs["min"].finish_reason == "stop" and reqs["min"].stop_reason == 7  # 2 tokens out: allowed
    assert reqs["stop_id"].finish_reason == "stop" and reqs["stop_id"].stop_reason == 9
    assert reqs["length"].finish_reason == "length" and reqs["length"].output_token_ids == [5, 5]
    out, _ = drive(sched, {"ignore": EOS})
    assert reqs["ignore"].finish_reason == "length" and reqs["ignore"].output_token_ids == [EOS] * 3
    assert set(out.finished_ids) == {"min", "stop_id", "length"}
    assert sched.schedule().finished_ids == ["ignore"]
    assert sched.kv_cache.allocator.num_free_pages == sched.kv_cache.allocator.num_usable_pages


def test_max_tokens_none_runs_to_max_model_len():
    sched = make_sched(max_model_len=20)
    req = Request("a", [1, 2, 3], SamplingParams(max_tokens=None, ignore_eos=True))
    sched.add_request(req)
    assert req.max_tokens == 17
    runner = run(sched, [])
    assert runner.finished["a"].num_tokens == 20 and runner.finished["a"].finish_reason == "length"


def test_finish_request_for_a_stop_string():
    sched = make_sched()
    a = Request("a", [1, 2, 3], SamplingParams(max_tokens=10), eos_token_id=None)
    b = Request("b", [4, 5, 6], SamplingParams(max_tokens=10), eos_token_id=None)
    sched.add_request(a)
    sched.add_request(b)
    drive(sched, {"a": 3, "b": 3})
    out = sched.schedule()
    sched.finish_request("a", "stop", stop_reason="###")  # the detokenizer matched a stop string
    assert a.finish_reason == "stop" and a.stop_reason == "###" and a.block_table == []
    updated = sched.update_from_output(out, {"a": [4], "b": [4]})  # a's token is dropped
    assert updated == [b] and a.output_token_ids == [3]
    assert sched.schedule().finished_ids == ["a"]
    with pytest.raises(ValueError, match="finish reason"):
        sched.finish_request("b", "bogus")
    sched.finish_request("b", RequestStatus.FINISHED_ERROR)
    assert b.finish_reason == "error"
    assert sched.kv_cache.allocator.num_free_pages == sched.kv_cache.allocator.num_usable_pages


def test_a_missing_sampled_token_is_an_error():
    sched = make_sched()
    sched.add_request(Request("a", [1, 2], SamplingParams()))
    out = sched.schedule()
    with pytest.raises(ValueError, match="no sampled token"):
        sched.update_from_output(out, {})


# ---------------------------------------------------------------------------- rejects and aborts


def test_requests_that_can_never_fit_are_rejected():
    sched = make_sched(num_pages=1 + 10, max_model_len=64)  # 10 pages of 4 = 40 token slots
    with pytest.raises(ValueError, match="prompt is empty"):
        sched.add_request(Request("e", [], SamplingParams()))
    with pytest.raises(ValueError, match=r"max_tokens \(30\) = 70 exceeds max_model_len \(64\)"):
        sched.add_request(Request("m", [1] * 40, SamplingParams(max_tokens=30)))
    with pytest.raises(ValueError, match="no room to generate"):
        sched.add_request(Request("p", [1] * 64, SamplingParams(max_tokens=None)))
    with pytest.raises(ValueError, match="needs up to 11 pages .* holds 10"):
        sched.add_request(Request("k", [1] * 30, SamplingParams(max_tokens=12)))
    with pytest.raises(ValueError, match="integers"):
        sched.add_request(Request("t", [1, -2], SamplingParams()))
    sched.add_request(Request("ok", [1] * 30, SamplingParams(max_tokens=11)))  # 40 slots: just fits
    with pytest.raises(ValueError, match="already in use"):
        sched.add_request(Request("ok", [1], SamplingParams()))
    assert list(sched.requests) == ["ok"]
    run(sched, [])  # and it runs alone in the whole pool


def test_config_validation():
    with pytest.raises(ValueError, match="max_num_seqs"):
        SchedulerConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match="max_num_batched_tokens .* >= max_num_seqs"):
        SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=32)
    with pytest.raises(ValueError, match="enable_chunked_prefill is False"):
        SchedulerConfig(max_num_batched_tokens=512, max_model_len=1024, enable_chunked_prefill=False)
    with pytest.raises(ValueError, match="num_pages must be set"):
        Scheduler(SchedulerConfig(), CacheConfig())


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_abort_in_every_state_frees_pages(mode):
    rng = random.Random(8)
    sched = make_sched(num_pages=1 + 30, max_num_batched_tokens=16, max_num_seqs=4, preemption_mode=mode)
    runner = FakeRunner(sched)
    reqs = random_requests(rng, 12, max_prompt=40, max_out=30)
    reqs.append(Request("par", [3] * 10, SamplingParams(n=3, max_tokens=20, seed=1), eos_token_id=EOS))
    for r in reqs:
        sched.add_request(r)
    seen = set()
    aborted = []
    for _ in range(400):
        if not sched.has_unfinished_requests():
            break
        # Abort one request in each state the first time that state shows up.
        just_aborted = []
        for req in list(sched.requests.values()):
            state = (req.status, req.num_computed_tokens < req.num_prompt_tokens, req.fork_source is not None)
            if state not in seen:
                seen.add(state)
                sched.abort_request(req.request_id)
                assert req.request_id not in sched.requests and req.block_table == []
                aborted.append((req, state))
                just_aborted.append(req.request_id)
        out = sched.schedule()
        check_invariants(sched, out)
        assert set(just_aborted) <= set(out.finished_ids)
        assert not set(just_aborted) & {s.request_id for s in out.scheduled}
        sched.update_from_output(out, runner.step(out))
    statuses = {s[0] for _, s in aborted}
    assert {RequestStatus.WAITING, RequestStatus.RUNNING, RequestStatus.PREEMPTED} <= statuses
    assert any(s[0] == RequestStatus.RUNNING and s[1] for _, s in aborted)  # mid-prefill
    assert any(s[0] == RequestStatus.RUNNING and not s[1] for _, s in aborted)  # decoding
    assert any(s[2] for _, s in aborted)  # a sample waiting to share sample 0's prompt
    assert all(r.finish_reason == "abort" and r.block_table == [] for r, _ in aborted)
    sched.abort_request([r.request_id for r, _ in aborted])  # already finished: a no-op
    sched.abort_request(list(sched.requests))
    assert sched.kv_cache.allocator.num_free_pages == sched.kv_cache.allocator.num_usable_pages
    assert sched.kv_cache.swap_space.num_free_slots == sched.kv_cache.swap_space.num_slots
    if mode == "swap":  # the preempted request aborted above held host slots
        assert any(s[0] == RequestStatus.PREEMPTED for _, s in aborted) and sched.num_swapped_out > 0
    assert not sched.requests and not sched.running and not sched.waiting


def test_abort_between_schedule_and_update():
    sched = make_sched()
    runner = FakeRunner(sched)
    sched.add_request(Request("a", [1, 2, 3, 4, 5], SamplingParams(max_tokens=5)))
    out = sched.schedule()
    sampled = runner.step(out)
    sched.abort_request("a")
    assert sched.update_from_output(out, sampled) == []
    assert sched.kv_cache.allocator.num_free_pages == sched.kv_cache.allocator.num_usable_pages
    assert sched.schedule().finished_ids == ["a"]


# ---------------------------------------------------------------------------- parallel sampling, forks


def test_parallel_sampling_prefills_the_prompt_once_and_shares_its_pages():
    rng = random.Random(9)
    prompt = [rng.randrange(1, VOCAB) for _ in range(38)]
    sp = SamplingParams(n=8, temperature=0.8, seed=100, max_tokens=12, ignore_eos=True)
    sched = make_sched(prefix=False)
    parent = Request("p", prompt, sp, eos_token_id=EOS)
    samples = sched.add_request(parent)
    assert [s.request_id for s in samples] == [f"{i}_p" for i in range(8)]
    runner = run(sched, [])
    for i, s in enumerate(samples):
        out, reason, _ = reference_generate(prompt, sp.for_sample(i), 128)
        assert runner.finished[s.request_id].output_token_ids == out and reason == s.finish_reason
        assert (s.parent_id, s.index) == ("p", i)
    assert len({tuple(s.output_token_ids) for s in samples}) > 1  # different seeds, different samples
    # Prompt positions 0..36 were computed once (by sample 0); each sample computed position 37.
    prompt_positions = Counter(
        s.num_computed_tokens + j for o in runner.outputs for s in o.scheduled for j in range(len(s.token_ids)) if s.num_computed_tokens + j < 38
    )
    assert all(prompt_positions[p] == 1 for p in range(37)) and prompt_positions[37] == 8
    assert runner.num_copies >= 7  # the shared partial page (positions 36, 37), copy-on-write
    peak_shared = peak_pages(runner)

    indep = [Request(f"i{i}", prompt, SamplingParams(temperature=0.8, seed=100 + i, max_tokens=12, ignore_eos=True)) for i in range(8)]
    runner2 = run(make_sched(prefix=False), [indep])
    assert peak_shared < peak_pages(runner2)


def peak_pages(runner):
    """The most distinct pages named by the block tables of one step."""
    return max(len({p for s in o.scheduled for p in s.block_table}) for o in runner.outputs)


@pytest.mark.parametrize("mode", ["recompute", "swap"])
@pytest.mark.parametrize("driver", [run, run_async])
def test_parallel_sampling_with_prefix_caching_and_a_tiny_pool(mode, driver):
    rng = random.Random(10)
    reqs = [
        Request(f"p{j}", [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 30))],
                SamplingParams(n=rng.randint(2, 4), temperature=1.0, seed=10 * j, max_tokens=rng.randint(1, 20)), eos_token_id=EOS)
        for j in range(8)
    ]  # fmt: skip
    sched = make_sched(num_pages=1 + 14, max_model_len=56, preemption_mode=mode)
    runner = driver(sched, waves(reqs, every=2, size=2))
    check_preemptions(sched, runner, mode)
    for r in reqs:
        for i in range(r.sampling_params.n):
            sp = r.sampling_params.for_sample(i)
            out, reason, stop = reference_generate(r.prompt_token_ids, sp, 56)
            got = runner.finished[f"{i}_{r.request_id}"]
            assert (got.output_token_ids, got.finish_reason, got.stop_reason) == (out, reason, stop)


def test_samples_fall_back_to_computing_when_sample_0_is_aborted():
    prompt = list(range(1, 30))
    sp = SamplingParams(n=3, seed=5, max_tokens=6, ignore_eos=True)
    sched = make_sched(max_num_batched_tokens=16)  # the prompt takes two chunks
    runner = FakeRunner(sched)
    samples = sched.add_request(Request("p", prompt, sp))
    out = sched.schedule()
    assert [s.request_id for s in out.scheduled] == ["0_p"]  # the others wait for its prompt
    sched.update_from_output(out, runner.step(out))
    sched.abort_request("0_p")
    finished = {}
    while sched.has_unfinished_requests():
        out = sched.schedule()
        check_invariants(sched, out)
        finished.update({r.request_id: r for r in sched.update_from_output(out, runner.step(out)) if r.is_finished})
    for i in (1, 2):
        assert finished[f"{i}_p"].output_token_ids == reference_generate(prompt, sp.for_sample(i), 128)[0]
    assert samples[0].finish_reason == "abort"
    assert sched.kv_cache.allocator.num_free_pages == sched.kv_cache.allocator.num_usable_pages


def test_abort_by_parent_id_aborts_every_sample():
    sched = make_sched()
    samples = sched.add_request(Request("p", [1, 2, 3, 4, 5], SamplingParams(n=4, max_tokens=5)))
    drive(sched, {s.request_id: 3 for s in samples})
    sched.abort_request("p")
    assert all(s.finish_reason == "abort" for s in samples) and not sched.requests
    assert sched.kv_cache.allocator.num_free_pages == sched.kv_cache.allocator.num_usable_pages


def test_one_token_prompt_with_n_gt_1():
    sched = make_sched()
    samples = sched.add_request(Request("p", [7], SamplingParams(n=3, seed=0, max_tokens=4, ignore_eos=True)))
    runner = run(sched, [])
    for i, s in enumerate(samples):
        assert runner.finished[s.request_id].output_token_ids == reference_generate([7], SamplingParams(seed=i, max_tokens=4, ignore_eos=True), 128)[0]


def test_fork_request_for_beam_search():
    sched = make_sched(prefix=False)
    runner = FakeRunner(sched)
    bp = BeamSearchParams(beam_width=2, max_tokens=10, ignore_eos=True)
    prompt = list(range(1, 22))  # 21 prompt tokens
    parent = Request("beam0", prompt, bp)
    sched.add_request(parent)
    for _ in range(3):
        out = sched.schedule()
        sched.update_from_output(out, runner.step(out))
    assert parent.num_computed_tokens == parent.num_tokens - 1 == 23  # positions 20..22: a partial page
    # Beam search picked two continuations of beam0: its own sample and token 33.
    child = sched.fork_request("beam0", "beam1", last_token_id=33)
    assert child.output_token_ids == parent.output_token_ids[:-1] + [33]
    assert child.block_table == parent.block_table
    assert all(sched.kv_cache.allocator.ref_count(p) == 2 for p in parent.block_table)
    with pytest.raises(ValueError, match="already in use"):
        sched.fork_request("beam0", "beam1")
    copies_before = runner.num_copies
    out = sched.schedule()
    check_invariants(sched, out)
    assert out.cow_copies and len(out.scheduled) == 2
    sched.update_from_output(out, runner.step(out))
    assert runner.num_copies == copies_before + 1  # the shared partial page, copied once
    sched.abort_request("beam0")  # a pruned beam: its pages go, the child's stay
    while sched.has_unfinished_requests():
        out = sched.schedule()
        check_invariants(sched, out)
        sched.update_from_output(out, runner.step(out))
    context = prompt + child.output_token_ids[:3]
    expected = child.output_token_ids[:3] + reference_generate(context, SamplingParams(max_tokens=7, ignore_eos=True), 128)[0]
    assert child.output_token_ids == expected and child.finish_reason == "length"
    assert sched.kv_cache.allocator.num_free_pages == sched.kv_cache.allocator.num_usable_pages


def test_forks_over_max_num_seqs_wait_their_turn():
    sched = make_sched(max_num_seqs=2)
    runner = FakeRunner(sched)
    sched.add_request(Request("a", [1, 2, 3], SamplingParams(max_tokens=8, ignore_eos=True)))
    sched.add_request(Request("b", [4, 5, 6], SamplingParams(max_tokens=8, ignore_eos=True)))
    out = sched.schedule()
    sched.update_from_output(out, runner.step(out))
    sched.fork_request("a", "a2")
    finished = {}
    while sched.has_unfinished_requests():
        out = sched.schedule()
        check_invariants(sched, out)  # never more than 2 in a step
        finished.update({r.request_id: r for r in sched.update_from_output(out, runner.step(out)) if r.is_finished})
    assert finished["a2"].output_token_ids == finished["a"].output_token_ids


# ---------------------------------------------------------------------------- host/device line


@pytest.mark.parametrize("window", [0, 7])
@pytest.mark.parametrize("mode", ["recompute", "swap"])
@pytest.mark.parametrize("seed", range(8))
def test_randomized_everything_against_the_reference(seed, mode, window):
    """Random configs, arrivals, n > 1, aborts, engine stops and beam forks, in tiny pools;
    by swap, with host slots for a few requests at most (some preemptions recompute); with a
    sliding window, whose passed pages are freed and reused while the requests run on."""
    rng = random.Random(100 + seed)
    ps = rng.choice([1, 2, 4, 8])
    max_model_len = 64
    chunked = rng.random() < 0.7
    budget = rng.choice([8, 16, 32]) if chunked else 64
    sched = make_sched(
        num_pages=1 + rng.randint(64 // ps, 3 * 64 // ps), page_size=ps, prefix=rng.random() < 0.6,
        max_num_seqs=rng.choice([2, 4, 8]), max_num_batched_tokens=budget, max_model_len=max_model_len,
        enable_chunked_prefill=chunked, long_prefill_token_threshold=rng.choice([0, 0, 5]),
        preemption_mode=mode, num_host_pages=rng.randint(0, 2 * 64 // ps), sliding_window=window,
    )  # fmt: skip
    runner = FakeRunner(sched)
    shared = [rng.randrange(1, VOCAB) for _ in range(20)]
    expected = {}  # request id -> (prompt, params, outputs it starts from)
    cut = {}  # request id -> finish reason given from outside (abort / stop string)
    finished = {}
    pending = 30
    for step in range(3000):
        if pending and rng.random() < 0.3:
            pending -= 1
            prompt = (shared if rng.random() < 0.5 else []) + [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 25))]
            n = rng.choice([1, 1, 1, 2, 3])
            max_tokens = rng.randint(1, max_model_len - len(prompt))
            sp = SamplingParams(
                n=n, seed=rng.randrange(1000), max_tokens=max_tokens, min_tokens=min(rng.choice([0, 0, 2]), max_tokens),
                stop_token_ids=rng.choice([[], [5]]), ignore_eos=rng.random() < 0.2,
            )  # fmt: skip
            for r in sched.add_request(Request(f"q{pending}", prompt, sp, eos_token_id=EOS)):
                expected[r.request_id] = (prompt, r.sampling_params, [])
        live = list(sched.requests.values())
        if live and rng.random() < 0.03:
            victim = rng.choice(live)
            reason = rng.choice(["abort", "stop"])
            sched.finish_request(victim.request_id, reason, "STOP" if reason == "stop" else None)
            cut[victim.request_id] = reason
            finished[victim.request_id] = victim
        running = [r for r in sched.running if r.num_computed_tokens == r.num_tokens - 1 and r.output_token_ids]
        if running and rng.random() < 0.05:
            parent = rng.choice(running)
            child = sched.fork_request(parent.request_id, f"f{step}", last_token_id=rng.randrange(VOCAB))
            expected[child.request_id] = (parent.prompt_token_ids, parent.sampling_params, list(child.output_token_ids))
            if child.is_finished:
                finished[child.request_id] = child
        if not pending and not sched.has_unfinished_requests():
            break
        running_before = {r.request_id for r in sched.running}
        out = sched.schedule()
        assert out.scheduled or not sched.has_unfinished_requests(), "a hang"
        check_invariants(sched, out)
        if out.preempted_ids:
            assert {s.request_id for s in out.scheduled} <= running_before
        for r in sched.update_from_output(out, runner.step(out)):
            if r.is_finished:
                finished[r.request_id] = r
    else:
        raise AssertionError("did not finish")

    assert set(finished) == set(expected)
    assert sched.kv_cache.allocator.num_free_pages == sched.kv_cache.allocator.num_usable_pages
    assert sched.kv_cache.swap_space.num_free_slots == sched.kv_cache.swap_space.num_slots
    for rid, (prompt, sp, start) in expected.items():
        got = finished[rid]
        ref, reason, stop_reason = reference_generate(prompt, sp, max_model_len, start=start, window=window)
        if rid in cut:
            assert got.output_token_ids == ref[: got.num_output_tokens] and got.finish_reason == cut[rid]
        else:
            assert (got.output_token_ids, got.finish_reason, got.stop_reason) == (ref, reason, stop_reason), rid


# ---------------------------------------------------------------------------- async scheduling


@pytest.mark.parametrize("prefix", [True, False])
@pytest.mark.parametrize("num_pages,mode", [(256, "recompute"), (24, "recompute"), (24, "swap")])
def test_async_scheduling_gives_the_same_outputs(prefix, num_pages, mode):
    """Step n+1 scheduled before step n's tokens are known: same tokens, reasons and pages as
    the synchronous loop, with prefix hits, chunked prefill and (24 pages) preemptions."""
    rng = random.Random(7)
    shared = [rng.randrange(1, VOCAB) for _ in range(13)]
    reqs = random_requests(rng, 24, max_prompt=30, max_out=30, prefix=shared, tag="a")
    reqs += random_requests(rng, 8, max_prompt=20, max_out=12, tag="b", stop_token_ids=[3, 4], min_tokens=2)
    sched = make_sched(num_pages=num_pages, prefix=prefix, max_num_batched_tokens=32, preemption_mode=mode)
    runner = run_async(sched, waves(reqs, every=3, size=6))
    assert_matches_reference(runner, reqs)
    pending_rows = sum(t == -1 for o in runner.outputs for s in o.scheduled for t in s.token_ids)
    assert pending_rows > 100  # decodes really ran on tokens the host had not seen
    if num_pages == 24:
        check_preemptions(sched, runner, mode)
    if prefix:
        assert sched.stats().prefix_cache_hits > 0


def test_async_scheduling_stops_at_max_tokens_without_an_extra_step():
    req = Request("a", [5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True), eos_token_id=EOS)
    runner = run_async(make_sched(), [[req]])
    assert_matches_reference(runner, [req])
    # prefill samples token 1, then decodes 2, 3, 4: nothing is scheduled past max_tokens
    assert [len(o.scheduled) for o in runner.outputs] == [1, 1, 1, 1]


@pytest.mark.parametrize("runner", [run, run_async])
def test_generated_pages_are_cached_under_their_tokens(runner):
    """A follow-up prompt that repeats a finished request's prompt and outputs (a chat's next
    turn) hits every full page, also the ones whose last token was pending when scheduled."""
    a = Request("a", list(range(1, 11)), SamplingParams(max_tokens=21, ignore_eos=True), eos_token_id=EOS)
    out, _, _ = reference_generate(a.prompt_token_ids, a.sampling_params, 128)
    b = Request("b", a.prompt_token_ids + out + [7], SamplingParams(max_tokens=2, ignore_eos=True), eos_token_id=EOS)
    sched = make_sched()
    result = runner(sched, [[a]] + [[] for _ in range(30)] + [[b]])
    assert_matches_reference(result, [a, b])
    assert result.finished["b"].num_cached_tokens == 28  # 10 + 21 - 1 computed positions: 7 pages of 4


# ---------------------------------------------------------------------------- sliding window


def test_sliding_window_frees_passed_pages_of_a_long_generation():
    """A window of 6 on every layer: a 200-token generation in a pool of 7 usable pages (it would
    need 53 without freeing; 7 = a 16-token step's span with its window), holding at most 3
    pages at any step, with the reference's tokens."""
    req = Request("a", list(range(1, 11)), SamplingParams(max_tokens=200, ignore_eos=True), eos_token_id=EOS)
    sched = make_sched(num_pages=1 + 7, sliding_window=6, max_model_len=256, max_num_batched_tokens=16)
    held = []
    real_schedule = sched.schedule

    def schedule():
        out = real_schedule()
        held.append(sum(p != NULL_PAGE for p in req.block_table))
        return out

    sched.schedule = schedule
    runner = run(sched, [[req]])
    assert_matches_reference(runner, [req], max_model_len=256)
    assert max(held) == 3 and len(held) == 200
    with pytest.raises(ValueError, match="needs up to 53 pages"):  # the same request without a window
        make_sched(num_pages=1 + 7, max_model_len=256, max_num_batched_tokens=16).add_request(
            Request("b", list(range(1, 11)), SamplingParams(max_tokens=200), eos_token_id=EOS))


@pytest.mark.parametrize("mode", ["recompute", "swap"])
@pytest.mark.parametrize("driver", [run, run_async])
def test_sliding_window_with_preemption_prefix_hits_and_samples(mode, driver):
    """Windows of 5 with a shared prefix (hits past the window are not taken), n > 1 samples of a
    prompt longer than the window, preemptions by recompute or swap (swap-in brings back only the
    window's pages), synchronous and async."""
    rng = random.Random(12)
    shared = [rng.randrange(1, VOCAB) for _ in range(17)]
    reqs = random_requests(rng, 16, max_prompt=20, max_out=40, prefix=shared, tag="w")
    sp = SamplingParams(n=3, seed=5, max_tokens=30, ignore_eos=True)
    reqs += [Request("s", shared + [3, 4], sp, eos_token_id=EOS)]
    sched = make_sched(num_pages=1 + 9, max_model_len=96, max_num_batched_tokens=16, preemption_mode=mode,
                       sliding_window=5)
    runner = driver(sched, waves(reqs, every=4, size=4))
    check_preemptions(sched, runner, mode)
    assert sched.stats().prefix_cache_hits > 0
    for r in reqs:
        for i in range(r.sampling_params.n):
            sp = r.sampling_params.for_sample(i) if r.sampling_params.n > 1 else r.sampling_params
            rid = f"{i}_{r.request_id}" if r.sampling_params.n > 1 else r.request_id
            got = runner.finished[rid]
            assert (got.output_token_ids, got.finish_reason) == reference_generate(
                r.prompt_token_ids, sp, 96, window=5)[:2], rid
