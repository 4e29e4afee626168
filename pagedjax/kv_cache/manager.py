"""The KV-cache manager: the scheduler's per-request view of the page pool (vLLM v1's KVCacheManager).

Host only (never imports jax). The scheduler decides who runs and how many tokens; it asks this
manager for the pages: `get_computed_pages` (prefix-cache hits, or the pages of a parallel
sample's source), `allocate_slots` (the pages a step writes, copy-on-write of shared ones, or
None to mean "preempt someone"), `free`, `fork`, and swapping a preempted request's pages to
host slots and back. Prefix caching, copy-on-write and swap live here and below
(block_allocator.py, swap.py); what a future pool layout needs (lookahead slots for speculative
decoding) has one place to go. With a sliding window on every layer, the pages a request's window
has passed are freed (`remove_skipped_pages`) and their block-table entries become the null page.
"""

from __future__ import annotations

from collections.abc import Sequence

from pagedjax.kv_cache.block_allocator import NULL_PAGE, BlockAllocator, PrefixCacheStats, extend_page_hashes
from pagedjax.kv_cache.swap import SwapSpace
from pagedjax.request import Request, RequestStatus

PageCopies = list[tuple[int, int]]  # (src, dst) device pages, or (page, slot) / (slot, page) for swaps


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Pages for requests: allocation with prefix caching and copy-on-write, forks, swap."""

    def __init__(self, num_pages: int, page_size: int, *, enable_prefix_caching: bool = True,
                 num_host_pages: int = 0, sliding_window: int = 0):
        self.page_size = page_size
        self.sliding_window = sliding_window  # every layer's window, or 0
        self.allocator = BlockAllocator(num_pages, page_size, enable_prefix_caching)
        self.swap_space = SwapSpace(num_host_pages)

    @property
    def enable_prefix_caching(self) -> bool:
        return self.allocator.enable_prefix_caching

    @property
    def num_free_pages(self) -> int:
        return self.allocator.num_free_pages

    @property
    def num_usable_pages(self) -> int:
        return self.allocator.num_usable_pages

    @property
    def prefix_stats(self) -> PrefixCacheStats:
        return self.allocator.prefix_stats

    # -- pages a request can take instead of computing them ----------------------------------

    def get_computed_pages(self, req: Request) -> tuple[list[int], int, bool]:
        """Pages whose K/V a waiting `req` can take instead of computing: (pages, tokens they
        hold, whether they are prefix-cache hits). A parallel sample takes its source's prompt
        pages once the source has computed them; otherwise the prefix cache's longest match,
        leaving the last token to compute (its logits are sampled)."""
        src, k = req.fork_source, req.fork_num_tokens
        if src is not None and src.status == RequestStatus.RUNNING and src.num_computed_tokens >= k:
            pages = self._within_window(src.block_table[: _cdiv(k, self.page_size)], k)
            if NULL_PAGE not in pages[self.num_skipped_pages(k):]:  # else the source's window freed some
                return pages, k, False
        if not self.enable_prefix_caching or req.skip_reading_prefix_cache:
            return [], 0, False  # (prompt logprobs: every prompt position is computed)
        max_pages = (req.num_tokens - 1) // self.page_size
        extend_page_hashes(req.page_hashes, req.all_token_ids, self.page_size, max_pages)
        hits = self.allocator.lookup(req.page_hashes[:max_pages])
        return self._within_window(hits, len(hits) * self.page_size), len(hits) * self.page_size, True

    def _within_window(self, pages: list[int], num_tokens: int) -> list[int]:
        """`pages` with those a sliding window has passed at num_tokens as the null page (not taken)."""
        skip = self.num_skipped_pages(num_tokens)
        return [NULL_PAGE] * min(skip, len(pages)) + pages[skip:]

    # -- pages a step writes ---------------------------------------------------------------

    def allocate_slots(self, req: Request, num_new_tokens: int, *, num_computed_tokens: int | None = None,
                       shared: Sequence[int] = (), num_lookahead_tokens: int = 0) -> PageCopies | None:
        """Pages for `req`'s positions < num_computed_tokens + num_new_tokens (+ lookahead slots):
        takes `shared` (pages from get_computed_pages) first, copies the shared pages it will
        write, allocates the rest, and registers the pages this step fills in the prefix cache.

        Returns the page copies the step needs first (copy-on-write), or None, with nothing
        changed, when the pool is short: the scheduler then preempts someone and asks again.
        """
        ps, table = self.page_size, req.block_table
        num_computed = req.num_computed_tokens if num_computed_tokens is None else num_computed_tokens
        end = num_computed + num_new_tokens
        last = -(-end // ps)
        if not shared and not num_lookahead_tokens and last <= len(table) and self.allocator.all_private(
                table, num_computed // ps, last):
            self.cache_full_pages(req, num_computed, end)  # the usual decode: its page is there and its own
            return []
        num_pages = len(table) + len(shared)
        num_new_pages = max(_cdiv(end + num_lookahead_tokens, ps) - num_pages, 0)
        # Pages written this step that exist already: copy them if shared (every taken one is).
        cow = [i for i in range(num_computed // ps, min(num_pages, _cdiv(end, ps)))
               if i >= len(table) or self.allocator.ref_count(table[i]) > 1]
        num_revived = sum(1 for page in shared if page != NULL_PAGE and self.allocator.ref_count(page) == 0)
        if num_new_pages + len(cow) + num_revived > self.allocator.num_free_pages:
            return None
        self.allocator.share(shared)
        table.extend(shared)
        copies = [copy for i in cow if (copy := self.allocator.ensure_writable(table, i)) is not None]
        table.extend(self.allocator.allocate(num_new_pages))
        self.cache_full_pages(req, num_computed, end)
        return copies

    def cache_full_pages(self, req: Request, num_computed: int, end: int) -> None:
        """Registers in the prefix cache the pages that positions [num_computed, end) fill (before
        they are written: see SchedulerOutput). A page holding a pending token (async scheduling)
        is registered once the token is known."""
        if not self.enable_prefix_caching:
            return
        ps = self.page_size
        first, num_full = num_computed // ps, min(end, req.num_tokens - req.num_pending) // ps
        if num_full > first:
            extend_page_hashes(req.page_hashes, req.all_token_ids, ps, num_full)
            self.allocator.cache_pages(req.block_table, req.page_hashes, start=first, stop=num_full)

    def record_prefix_hit(self, req: Request, num_hit_tokens: int) -> None:
        self.allocator.prefix_stats.record(req.num_tokens, num_hit_tokens)

    # -- sliding window ----------------------------------------------------------------------

    def num_skipped_pages(self, num_computed_tokens: int) -> int:
        """Leading pages no token from position num_computed_tokens on reads: the first such
        token sees positions > num_computed_tokens - W (vLLM's get_num_skipped_tokens)."""
        if not self.sliding_window:
            return 0
        return max(num_computed_tokens - self.sliding_window + 1, 0) // self.page_size

    def remove_skipped_pages(self, req: Request) -> int:
        """Frees the pages of `req` that its window has passed (call before allocating for its
        next tokens); their block-table entries become the null page. Returns how many."""
        table = req.block_table
        n = min(self.num_skipped_pages(req.num_computed_tokens), len(table))
        skipped = [page for page in table[:n] if page != NULL_PAGE]
        if skipped:
            table[:n] = [NULL_PAGE] * n
            self.allocator.free(skipped)
        return len(skipped)

    # -- forks, freeing --------------------------------------------------------------------

    def fork(self, parent: Request, child: Request) -> None:
        """Gives `child` the pages of `parent`'s computed tokens, shared (copy-on-write later)."""
        k = parent.num_computed_tokens
        child.block_table = self.allocator.fork(parent.block_table[: _cdiv(k, self.page_size)])
        child.page_hashes = parent.page_hashes[: k // self.page_size]

    def free(self, req: Request) -> None:
        """Gives back every page and host slot `req` holds (null entries: pages its window released)."""
        self.allocator.free([page for page in req.block_table if page != NULL_PAGE])
        req.block_table = []
        self.swap_space.free(req.swapped_slots)
        req.swapped_slots = []

    # -- preemption by swap ----------------------------------------------------------------

    def swap_out(self, req: Request) -> PageCopies | None:
        """Moves the pages of `req`'s computed tokens to host slots and frees its device pages;
        returns the (device page, host slot) copies, or None (nothing changed) when slots are short.
        Leading null entries (a sliding window's passed pages) take no slot."""
        num_pages = _cdiv(req.num_computed_tokens, self.page_size)
        assert num_pages <= len(req.block_table), req
        lead = next((i for i, page in enumerate(req.block_table) if page != NULL_PAGE), len(req.block_table))
        swapped = None
        if num_pages > lead:
            swapped = self.swap_space.swap_out(self.allocator, req.block_table[lead:], num_pages - lead)
        if swapped is None:
            return None
        req.swapped_slots, copies = swapped
        req.block_table = []
        return copies

    def can_swap_in(self, req: Request, num_new_tokens: int) -> bool:
        num_pages = _cdiv(req.num_computed_tokens + num_new_tokens, self.page_size)
        first = _cdiv(req.num_computed_tokens, self.page_size) - len(req.swapped_slots)
        return num_pages - max(self.num_skipped_pages(req.num_computed_tokens), first) <= self.allocator.num_free_pages

    def swap_in(self, req: Request) -> PageCopies:
        """Fresh private pages for a swapped-out request, its slots freed; returns the (host slot,
        device page) copies. Pages a sliding window has passed stay on the host side unread
        (null entries). Its full pages join the prefix cache again."""
        slots = req.swapped_slots  # of pages [first, the computed tokens' last]
        first = _cdiv(req.num_computed_tokens, self.page_size) - len(slots)
        skip = max(self.num_skipped_pages(req.num_computed_tokens), first)
        self.swap_space.free(slots[:skip - first])
        pages, copies = self.swap_space.swap_in(self.allocator, slots[skip - first:])
        req.block_table = [NULL_PAGE] * skip + pages
        req.swapped_slots = []
        self.cache_full_pages(req, skip * self.page_size, req.num_computed_tokens)
        return copies
