"""BlockAllocator: free list, reference counts, copy-on-write, prefix caching with LRU eviction.

The randomized test drives the allocator and an independent, deliberately naive model of it
(dicts and lists, no free-list tricks) with the same random operations and compares them.
"""

import random
from collections import Counter

import pytest

from pagedjax.config import EngineConfig
from pagedjax.kv_cache.block_allocator import NULL_PAGE, BlockAllocator, CacheConfig, extend_page_hashes, hash_page
from pagedjax.kv_cache.swap import SwapSpace


def test_allocate_never_hands_out_the_null_page_and_frees_back():
    a = BlockAllocator(num_pages=9, page_size=4)
    pages = a.allocate(8)
    assert sorted(pages) == list(range(1, 9)) and NULL_PAGE not in pages
    assert a.num_free_pages == 0
    with pytest.raises(RuntimeError):
        a.allocate(1)
    a.free(pages[:3])
    assert a.num_free_pages == 3
    assert sorted(a.allocate(3)) == sorted(pages[:3])
    a.free(pages)
    assert a.num_free_pages == a.num_usable_pages == 8


def test_double_free_and_null_page_free_raise():
    a = BlockAllocator(num_pages=4, page_size=4)
    (p,) = a.allocate(1)
    a.free([p])
    with pytest.raises(ValueError, match="double free"):
        a.free([p])
    with pytest.raises(ValueError):
        a.free([NULL_PAGE])


def test_fork_shares_pages_and_copy_on_write_gives_a_private_copy():
    a = BlockAllocator(num_pages=10, page_size=4)
    parent = a.allocate(3)
    child = a.fork(parent)
    assert child == parent and child is not parent
    assert all(a.ref_count(p) == 2 for p in parent)
    assert a.num_free_pages == 6  # sharing takes no page
    assert not a.all_private(child, 2, 3) and not a.all_private(parent, 0, 3)

    copy = a.ensure_writable(child, 2)  # the child writes its partial last page
    assert copy is not None
    src, dst = copy
    assert src == parent[2] and dst == child[2] and dst not in parent
    assert a.ref_count(src) == 1 and a.ref_count(dst) == 1
    assert a.all_private(child, 2, 3) and a.all_private(parent, 2, 3)
    assert not a.all_private(child, 1, 3) and not a.all_private(child, 0, 2)
    assert a.ensure_writable(parent, 2) is None  # now private to the parent: no copy
    assert a.ensure_writable(child, 2) is None

    a.free(child)
    assert [a.ref_count(p) for p in parent] == [1, 1, 1]
    a.free(parent)
    assert a.num_free_pages == 9


def test_fork_of_a_free_page_raises():
    a = BlockAllocator(num_pages=4, page_size=4)
    (p,) = a.allocate(1)
    a.free([p])
    with pytest.raises(ValueError):
        a.fork([p])


def test_page_hash_depends_on_the_whole_prefix():
    t = [1, 2, 3, 4]
    root = hash_page(None, t)
    assert hash_page(None, list(t)) == root
    assert hash_page(root, t) != root
    assert hash_page(hash_page(None, [9, 9, 9, 9]), t) != hash_page(root, t)
    hashes = []
    extend_page_hashes(hashes, [1, 2, 3, 4, 5, 6, 7, 8, 9], page_size=4, num_pages=2)
    assert hashes == [root, hash_page(root, [5, 6, 7, 8])]


def test_prefix_cache_reuses_freed_pages_and_evicts_lru_only_when_the_free_list_is_dry():
    a = BlockAllocator(num_pages=7, page_size=2)
    tokens = [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]]
    tables, hashes = [], []
    for tok in tokens:
        table = a.allocate(3)
        h = []
        extend_page_hashes(h, tok, 2, 3)
        a.cache_pages(table, h)
        tables.append(table)
        hashes.append(h)
    assert a.lookup(hashes[0]) == tables[0]  # in use and cached
    a.free(tables[0])
    a.free(tables[1])
    assert a.num_free_pages == 6 and a.num_cached_pages == 6

    # A hit takes the cached pages back out of the evictable set.
    hit = a.lookup(hashes[0][:2])
    assert hit == tables[0][:2]
    a.share(hit)
    assert a.num_free_pages == 4 and [a.ref_count(p) for p in hit] == [1, 1]

    # Free list is dry (every page was cached): allocation evicts the least recently freed.
    # Tables are freed last page first, so table 0's tail went first, then table 1's tail, ...
    evicted = a.allocate(1)[0]
    assert evicted == tables[0][2]
    assert a.lookup(hashes[0]) == tables[0][:2]  # the chain now stops before the evicted page
    assert a.allocate(1)[0] == tables[1][2]
    assert a.lookup(hashes[1]) == tables[1][:2]
    assert a.num_evictions == 2


def test_cache_pages_keeps_the_first_page_with_a_given_content():
    a = BlockAllocator(num_pages=5, page_size=2)
    h = []
    extend_page_hashes(h, [1, 2], 2, 1)
    t1, t2 = a.allocate(1), a.allocate(1)
    a.cache_pages(t1, h)
    a.cache_pages(t2, h)  # same content computed twice: the cache keeps t1's page
    assert a.lookup(h) == t1
    a.free(t2)
    a.free(t1)
    assert a.num_cached_pages == 1 and a.num_free_pages == 4


def test_prefix_caching_disabled_caches_nothing():
    a = BlockAllocator(num_pages=5, page_size=2, enable_prefix_caching=False)
    h = []
    extend_page_hashes(h, [1, 2, 3, 4], 2, 2)
    t = a.allocate(2)
    a.cache_pages(t, h)
    assert a.lookup(h) == [] and a.num_cached_pages == 0


def test_reset_prefix_cache_forgets_evictable_pages():
    a = BlockAllocator(num_pages=5, page_size=2)
    h = []
    extend_page_hashes(h, [1, 2, 3, 4], 2, 2)
    t = a.allocate(2)
    a.cache_pages(t, h)
    a.free(t)
    a.reset_prefix_cache()
    assert a.lookup(h) == [] and a.num_free_pages == 4


def test_prefix_stats_count_tokens():
    a = BlockAllocator(num_pages=5, page_size=2)
    a.prefix_stats.record(10, 4)
    a.prefix_stats.record(6, 0)
    assert (a.prefix_stats.requests, a.prefix_stats.queries, a.prefix_stats.hits) == (2, 16, 4)
    assert a.prefix_stats.hit_rate == pytest.approx(0.25)


def test_cache_config_validates():
    assert CacheConfig().page_size == 16
    with pytest.raises(ValueError, match="page_size"):
        CacheConfig(page_size=0)
    with pytest.raises(ValueError, match="num_pages"):
        CacheConfig(num_pages=1)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        EngineConfig(gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="num_host_pages"):
        CacheConfig(num_host_pages=-1)


def test_swap_space_moves_pages_to_host_slots_and_back():
    a, swap = BlockAllocator(num_pages=9, page_size=4), SwapSpace(4)
    mine = a.allocate(3)
    other = a.fork(mine[:1])  # shared with another table: copied out too, its page stays in use
    assert swap.swap_out(a, mine, 5) is None  # slots are short: nothing changes
    assert swap.num_free_slots == 4 and all(a.ref_count(p) for p in mine)
    slots, copies = swap.swap_out(a, mine, 3)
    assert copies == list(zip(mine, slots)) and len(set(slots)) == 3 and swap.num_free_slots == 1
    assert a.ref_count(mine[0]) == 1 and a.ref_count(mine[1]) == a.ref_count(mine[2]) == 0
    pages, copies = swap.swap_in(a, slots)
    assert copies == list(zip(slots, pages)) and swap.num_free_slots == 4
    assert all(a.ref_count(p) == 1 for p in pages) and not set(pages) & set(other)
    with pytest.raises(ValueError, match="double free"):
        swap.free(slots[:1])
    a.free(pages + other)
    assert a.num_free_pages == a.num_usable_pages
    with pytest.raises(ValueError, match="num_slots"):
        SwapSpace(-1)


class NaiveAllocatorModel:
    """What the allocator should do, written the slow obvious way."""

    def __init__(self, num_pages):
        self.ref = Counter()
        self.hash_of = {}  # page -> hash
        self.cached = {}  # hash -> page
        self.free_uncached = set(range(1, num_pages))
        self.evictable = []  # least recently freed first

    def allocated(self, page):
        if page in self.free_uncached:
            self.free_uncached.remove(page)
        else:
            assert not self.free_uncached, "evicted a cached page while uncached pages were free"
            assert page == self.evictable[0], "evicted a page that was not the least recently freed"
            self.evictable.pop(0)
            del self.cached[self.hash_of.pop(page)]
        assert self.ref[page] == 0
        self.ref[page] = 1

    def decref(self, page):
        self.ref[page] -= 1
        if self.ref[page] == 0:
            (self.evictable.append if page in self.hash_of else self.free_uncached.add)(page)

    def share(self, page):
        if self.ref[page] == 0:
            self.evictable.remove(page)
        self.ref[page] += 1

    def cache(self, page, h):
        if page not in self.hash_of and h not in self.cached:
            self.hash_of[page] = h
            self.cached[h] = page

    def lookup(self, hashes):
        out = []
        for h in hashes:
            if h not in self.cached:
                break
            out.append(self.cached[h])
        return out

    @property
    def num_free(self):
        return len(self.free_uncached) + len(self.evictable)


@pytest.mark.parametrize("seed", range(6))
def test_randomized_against_a_naive_model(seed):
    rng = random.Random(seed)
    P, ps = 24, 2
    a, m = BlockAllocator(P, ps), NaiveAllocatorModel(P)
    tables = []  # (block_table, page_hashes)
    chunks = [[rng.randrange(3), rng.randrange(3)] for _ in range(3)]  # few contents: many repeats

    def random_hashes(n):
        h = []
        extend_page_hashes(h, [t for _ in range(n) for t in rng.choice(chunks)], ps, n)
        return h

    for _ in range(400):
        op = rng.choice(["alloc", "alloc", "fork", "cow", "free", "cache", "hit"])
        if op == "alloc" and a.num_free_pages:
            n = rng.randint(1, min(4, a.num_free_pages))
            table = a.allocate(n)
            for p in table:
                m.allocated(p)
            tables.append((table, random_hashes(n)))
        elif op == "fork" and tables:
            table, h = rng.choice(tables)
            child = a.fork(table)
            for p in table:
                m.share(p)
            tables.append((child, list(h)))
        elif op == "cow" and tables and a.num_free_pages:
            table, _ = rng.choice(tables)
            i = rng.randrange(len(table))
            old, was_shared = table[i], m.ref[table[i]] > 1
            copy = a.ensure_writable(table, i)
            if was_shared:
                assert copy == (old, table[i])
                m.allocated(table[i])
                m.decref(old)
            else:
                assert copy is None and table[i] == old
        elif op == "free" and tables:
            table, _ = tables.pop(rng.randrange(len(tables)))
            a.free(table)
            for p in reversed(table):
                m.decref(p)
        elif op == "cache" and tables:
            table, h = rng.choice(tables)
            start = rng.randrange(len(table))
            a.cache_pages(table, h, start=start)
            for i in range(start, len(table)):
                m.cache(table[i], h[i])
        elif op == "hit":
            h = random_hashes(rng.randint(1, 4))
            hit = a.lookup(h)
            assert hit == m.lookup(h)
            if hit:
                a.share(hit)
                for p in hit:
                    m.share(p)
                tables.append((list(hit), h[: len(hit)]))

        in_tables = Counter(p for table, _ in tables for p in table)
        assert NULL_PAGE not in in_tables
        assert all(a.ref_count(p) == in_tables[p] == m.ref[p] for p in range(1, P))
        assert a.num_free_pages == m.num_free == (P - 1) - len(in_tables)
        assert a.num_cached_pages == len(m.cached)

    for table, _ in tables:
        a.free(table)
    assert a.num_free_pages == P - 1


@pytest.mark.parametrize("env, fraction", [({}, 0.75), ({"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.92"}, 0.92),
                                           ({"XLA_PYTHON_CLIENT_ALLOCATOR": "platform"}, 1.0)])
def test_gpu_pool_sizing_without_allocator_stats_stays_inside_the_clients_cap(monkeypatch, env, fraction):
    """On a GPU whose allocator reports no figures (XLA's VMM one), the pool is sized from
    cudaMemGetInfo within the share JAX's client may take (XLA_PYTHON_CLIENT_MEM_FRACTION, 0.75 by
    default), not the whole device: the pool, what is in use and the largest step's temporaries
    must fit under that cap, or the next compile fails for want of memory."""
    import types

    import jax

    import pagedjax.model_runner as mr

    for name in ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_ALLOCATOR"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    GiB = 2**30
    total, arrays, context, temporaries, page = 140 * GiB, 15.5 * GiB, 0.5 * GiB, 3 * GiB, 2 * 2**20
    free = total - arrays - context
    gpu = types.SimpleNamespace(platform="gpu", memory_stats=lambda: None)
    monkeypatch.setattr(jax, "devices", lambda *a: [gpu])
    monkeypatch.setattr(mr, "cuda_mem_info", lambda: (free, total))
    monkeypatch.setattr(mr, "device_bytes_in_use", lambda device: arrays if device is gpu else 0)
    runner = types.SimpleNamespace(max_num_seqs=256, max_pages_per_req=256, mesh=None,
                                   options=EngineConfig(gpu_memory_utilization=0.9),
                                   page_bytes=lambda: page, _activation_bytes=lambda: temporaries)
    pages = mr.ModelRunner._auto_num_pages(runner)
    cap = total * fraction
    assert pages * page + (total - free) + temporaries <= cap * 0.9
    assert (pages + 1) * page + (total - free) + temporaries > cap * 0.9  # and no smaller than that
    monkeypatch.setattr(mr, "cuda_mem_info", lambda: None)
    with pytest.raises(RuntimeError, match="num_pages"):
        mr.ModelRunner._auto_num_pages(runner)


@pytest.mark.parametrize("others", [30, 100])
def test_gpu_pool_sizing_beside_other_processes_counts_only_its_own_use(monkeypatch, others):
    """Other processes on the GPU (engines or test workers, each under its own share) are in
    cudaMemGetInfo's use: the pool is sized on this process's arrays plus a context's worth, within
    its share of the device, and never past what is free (GiB below)."""
    import types

    import jax

    import pagedjax.model_runner as mr

    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.3")
    monkeypatch.delenv("XLA_PYTHON_CLIENT_ALLOCATOR", raising=False)
    GiB = 2**30
    total, arrays, context, temporaries, page = 140 * GiB, 5 * GiB, 0.5 * GiB, 2 * GiB, 2**20
    free = total - arrays - context - others * GiB
    gpu = types.SimpleNamespace(platform="gpu", memory_stats=lambda: None)
    monkeypatch.setattr(jax, "devices", lambda *a: [gpu])
    monkeypatch.setattr(mr, "cuda_mem_info", lambda: (free, total))
    monkeypatch.setattr(mr, "device_bytes_in_use", lambda device: arrays)
    runner = types.SimpleNamespace(max_num_seqs=256, max_pages_per_req=1024, mesh=None,
                                   options=EngineConfig(gpu_memory_utilization=0.9),
                                   page_bytes=lambda: page, _activation_bytes=lambda: temporaries)
    pages = mr.ModelRunner._auto_num_pages(runner)
    own = arrays + mr.OWN_OVERHEAD_BYTES
    share = min(0.3 * total, free + own) * 0.9
    assert pages * page + own + temporaries <= share < (pages + 1) * page + own + temporaries
    assert pages * page + temporaries <= free
    if others == 30:  # room left: the whole share, as if alone (42 GiB less 6 in use and 2 of temporaries)
        assert pages * page > 29 * GiB


def test_device_bytes_in_use_counts_this_processs_arrays_on_the_device():
    """device_bytes_in_use: the bytes of the live arrays' shards on one device (an array made
    adds its bytes there, and only there; deleting it takes them back)."""
    import jax
    import numpy as np

    import pagedjax.model_runner as mr

    devices = jax.devices()
    before = [mr.device_bytes_in_use(d) for d in devices]
    x = jax.device_put(np.arange(12345, dtype=np.float32), devices[-1])
    after = [mr.device_bytes_in_use(d) for d in devices]
    assert after[-1] - before[-1] == 12345 * 4
    assert after[:-1] == before[:-1]
    x.delete()
    assert mr.device_bytes_in_use(devices[-1]) == before[-1]
