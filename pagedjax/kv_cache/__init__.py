"""The paged KV cache: host bookkeeping (block_allocator, no jax) and the device pool (page_pool).

Only the host side is re-exported here, so importing the scheduler never imports jax.
"""

from pagedjax.kv_cache.block_allocator import NULL_PAGE, BlockAllocator, CacheConfig, hash_page
from pagedjax.kv_cache.swap import SwapSpace

__all__ = ["NULL_PAGE", "BlockAllocator", "CacheConfig", "SwapSpace", "hash_page"]
