"""The paged KV cache. Host side (no jax): block_allocator (pages, ref counts, prefix cache),
swap (host slots), manager (the scheduler's per-request view). Device side: page_pool (the pool
and its functional write), pool_ops (page copies and swaps).

Only the host side is re-exported here, so importing the scheduler never imports jax.
"""

from pagedjax.kv_cache.block_allocator import NULL_PAGE, BlockAllocator, CacheConfig, hash_page
from pagedjax.kv_cache.manager import KVCacheManager
from pagedjax.kv_cache.swap import SwapSpace

__all__ = ["NULL_PAGE", "BlockAllocator", "CacheConfig", "KVCacheManager", "SwapSpace", "hash_page"]
