"""Host page slots for preemption by swap (vLLM's `preemption_mode="swap"`), host only.

A request preempted by swap keeps its computed tokens: the contents of its pages are copied to
host slots (`swap_out`) and its device pages go back to the pool at once; readmitted, it gets
fresh, private device pages, the slots are copied into them (`swap_in`) and it continues where
it was. Every page of its block table is copied, shared ones (forks, prefix hits) included, so
nothing it reads depends on pages others may free or evict meanwhile.

This module only decides which page goes to which slot; the runner moves the bytes, before the
step of the SchedulerOutput that lists the copies.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from pagedjax.kv_cache.block_allocator import BlockAllocator


class SwapSpace:
    """A free list of `num_slots` host page slots, each the size of one device page (all layers, K and V)."""

    def __init__(self, num_slots: int):
        if not isinstance(num_slots, int) or num_slots < 0:
            raise ValueError(f"num_slots must be an integer >= 0, got {num_slots!r}.")
        self.num_slots = num_slots
        self._free: deque[int] = deque(range(num_slots))
        self._in_use = [False] * num_slots

    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    def swap_out(self, allocator: BlockAllocator, block_table: Sequence[int], num_pages: int
                 ) -> tuple[list[int], list[tuple[int, int]]] | None:
        """Moves block_table[:num_pages] to host slots and drops the table's device references.

        Returns (the slots, in page order; the (device page, host slot) copies), or None, with
        nothing changed, when fewer than num_pages slots are free.
        """
        if num_pages > len(self._free):
            return None
        slots = [self._take() for _ in range(num_pages)]
        copies = list(zip(block_table[:num_pages], slots))
        allocator.free(block_table)
        return slots, copies

    def swap_in(self, allocator: BlockAllocator, slots: Sequence[int]) -> tuple[list[int], list[tuple[int, int]]]:
        """Fresh device pages for `slots` (check `allocator.num_free_pages` first); frees the slots.

        Returns (the pages, the new block table's head; the (host slot, device page) copies).
        """
        pages = allocator.allocate(len(slots))
        self.free(slots)
        return pages, list(zip(slots, pages))

    def free(self, slots: Sequence[int]) -> None:
        """Gives slots back (a swapped request swapped in, finished or aborted)."""
        for slot in slots:
            if not self._in_use[slot]:
                raise ValueError(f"host slot {slot} is not in use: double free")
            self._in_use[slot] = False
            self._free.append(slot)

    def _take(self) -> int:
        slot = self._free.popleft()
        self._in_use[slot] = True
        return slot
