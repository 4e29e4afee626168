"""Host page bookkeeping: free list, reference counts, copy-on-write, automatic prefix caching.

Plain Python over ints (never imports jax). A page is an index into the device pool
(kv_cache/page_pool.py); a block table is a request's list of page ids, in position order.

- Page 0 is the null page: padded block-table entries point at it, so it is never handed out.
- A page can be in several block tables at once (parallel samples, beams, prefix hits); its
  reference count says how many. A page is written only while its count is 1: a writer of a
  shared page first gets a private copy (`ensure_writable`, copy-on-write).
- Automatic prefix caching (vLLM's): a full page is named by a hash of (the hash of the page
  before it, its page_size token ids), so equal hashes mean equal prefixes. A page whose last
  reference goes stays cached, in an LRU set of evictable pages, until a lookup reuses it or the
  free list runs dry and it is evicted (least recently freed first).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass

NULL_PAGE = 0

PageHash = bytes


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache: page size, pool size and prefix caching."""

    page_size: int = 16  # tokens per page
    num_pages: int | None = None  # pages in the pool, the null page 0 included; None: sized by the runner
    enable_prefix_caching: bool = True
    num_host_pages: int = 0  # host slots for pages of requests preempted by swap (kv_cache/swap.py)
    # the model's window when every layer reads within one (ModelConfig.kv_sliding_window), else 0:
    # pages wholly behind a request's window are freed (KVCacheManager.remove_skipped_pages)
    sliding_window: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.page_size, int) or self.page_size < 1:
            raise ValueError(f"page_size must be an integer >= 1, got {self.page_size!r}.")
        if self.num_pages is not None and (not isinstance(self.num_pages, int) or self.num_pages < 2):
            raise ValueError(f"num_pages must be an integer >= 2 (page 0 is null) or None, got {self.num_pages!r}.")
        for name in ("num_host_pages", "sliding_window"):
            n = getattr(self, name)
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {n!r}.")


def hash_page(parent: PageHash | None, token_ids: Sequence[int]) -> PageHash:
    """The name of a full page: sha256 of its parent's hash and its token ids (collision-safe)."""
    h = hashlib.sha256(parent if parent is not None else b"")
    h.update(array("q", token_ids).tobytes())
    return h.digest()


def extend_page_hashes(page_hashes: list[PageHash], token_ids: Sequence[int], page_size: int, num_pages: int) -> None:
    """Appends to `page_hashes` the hashes of the full pages of `token_ids` up to `num_pages`."""
    for i in range(len(page_hashes), num_pages):
        parent = page_hashes[-1] if page_hashes else None
        page_hashes.append(hash_page(parent, token_ids[i * page_size : (i + 1) * page_size]))


@dataclass
class PrefixCacheStats:
    """Prefix-cache counters, in tokens (vLLM's): `hits` of `queries` served from cached pages."""

    requests: int = 0
    queries: int = 0
    hits: int = 0

    def record(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        self.requests += 1
        self.queries += num_query_tokens
        self.hits += num_hit_tokens

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class BlockAllocator:
    """Hands out page ids 1..num_pages-1 with reference counts, copy-on-write and a prefix cache."""

    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True):
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is the null page), got {num_pages}.")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_pages
        self._free: deque[int] = deque(range(1, num_pages))  # count 0, not cached
        self._page_hash: list[PageHash | None] = [None] * num_pages
        self._cached: dict[PageHash, int] = {}  # hash -> page
        self._evictable: OrderedDict[int, None] = OrderedDict()  # count 0, cached; least recent first
        self.prefix_stats = PrefixCacheStats()
        self.num_evictions = 0

    # -- counts
    @property
    def num_usable_pages(self) -> int:
        return self.num_pages - 1

    @property
    def num_free_pages(self) -> int:
        """Pages `allocate` can hand out: the free list plus the evictable cached pages."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_pages(self) -> int:
        return len(self._cached)

    def ref_count(self, page: int) -> int:
        return self._ref_counts[page]

    def all_private(self, block_table: Sequence[int], start: int, stop: int) -> bool:
        """Whether block_table[start:stop] are all held by one table only (writable in place)."""
        counts = self._ref_counts
        if stop - start == 1:  # a decode's page
            return counts[block_table[start]] == 1
        return all(counts[page] == 1 for page in block_table[start:stop])

    # -- allocate / free / share
    def allocate(self, num: int) -> list[int]:
        """`num` fresh pages with count 1; raises if fewer are free (check `num_free_pages`)."""
        if num > self.num_free_pages:
            raise RuntimeError(f"asked for {num} pages, {self.num_free_pages} free")
        return [self._pop_free() for _ in range(num)]

    def free(self, block_table: Sequence[int]) -> None:
        """Drops one reference on each page of `block_table` (the null page is never held: freeing
        it is an error, like a double free).

        Pages are released last first, so a request's tail (the least shared part of its
        prefix) is evicted before its head.
        """
        for page in reversed(block_table):
            self._decref(page)

    def share(self, pages: Sequence[int]) -> None:
        """Takes one more reference on each of `pages` (prefix hits or a fork), cached ones included;
        null entries (released by a sliding window) stay null."""
        for page in pages:
            if page == NULL_PAGE:
                continue
            if self._ref_counts[page] == 0:
                if page not in self._evictable:
                    raise ValueError(f"page {page} is neither in use nor cached")
                del self._evictable[page]
            self._ref_counts[page] += 1

    def fork(self, block_table: Sequence[int]) -> list[int]:
        """A child's block table sharing every page of `block_table` (n > 1, beam search).

        The child may not write a shared page: call `ensure_writable` on the page it writes next
        (the partial last page), which copies it if it is still shared.
        """
        for page in block_table:
            if page != NULL_PAGE and self._ref_counts[page] < 1:
                raise ValueError(f"cannot fork page {page}: it is not in use")
        self.share(block_table)
        return list(block_table)

    def ensure_writable(self, block_table: list[int], page_index: int) -> tuple[int, int] | None:
        """Copy-on-write: makes block_table[page_index] private to this table.

        Returns (src, dst), the page copy to do on the device before this step writes, when the
        page was shared (its entry in `block_table` becomes dst); None when it was private.
        """
        src = block_table[page_index]
        if self._ref_counts[src] == 1:
            return None
        if self._ref_counts[src] < 1:
            raise ValueError(f"page {src} is not in use")
        dst = self.allocate(1)[0]
        self._decref(src)
        block_table[page_index] = dst
        return (src, dst)

    # -- prefix cache
    def lookup(self, page_hashes: Sequence[PageHash]) -> list[int]:
        """The longest run of cached pages matching `page_hashes` from the start (no references taken)."""
        pages = []
        if self.enable_prefix_caching:
            for h in page_hashes:
                page = self._cached.get(h)
                if page is None:
                    break
                pages.append(page)
        return pages

    def cache_pages(
        self, block_table: Sequence[int], page_hashes: Sequence[PageHash], start: int = 0, stop: int | None = None
    ) -> None:
        """Registers block_table[i] under page_hashes[i] for i in [start, stop) (stop: all hashes).

        Call once a page is full (or will be after this step's writes). A page that is already
        cached, or whose content another page already holds, is left as it is.
        """
        if not self.enable_prefix_caching:
            return
        for i in range(start, len(page_hashes) if stop is None else stop):
            page, h = block_table[i], page_hashes[i]
            if self._page_hash[page] is not None or h in self._cached:
                continue
            self._cached[h] = page
            self._page_hash[page] = h

    def reset_prefix_cache(self) -> None:
        """Forgets every evictable cached page (pages in use keep their hashes)."""
        for page in self._evictable:
            del self._cached[self._page_hash[page]]
            self._page_hash[page] = None
            self._free.append(page)
        self._evictable.clear()

    # -- internals
    def _pop_free(self) -> int:
        if self._free:
            page = self._free.popleft()
        else:  # the free list is dry: evict the least recently used cached page
            page, _ = self._evictable.popitem(last=False)
            del self._cached[self._page_hash[page]]
            self._page_hash[page] = None
            self.num_evictions += 1
        self._ref_counts[page] = 1
        return page

    def _decref(self, page: int) -> None:
        if page == NULL_PAGE or self._ref_counts[page] < 1:
            raise ValueError(f"page {page} is not in use: double free")
        self._ref_counts[page] -= 1
        if self._ref_counts[page] == 0:
            if self._page_hash[page] is not None:
                self._evictable[page] = None  # most recently used end
            else:
                self._free.append(page)
