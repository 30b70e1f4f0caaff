"""L1: chunks kept in the host memory pool, byte-budgeted, evicted by a named policy.

Reads are zero-copy: ``get`` hands out another reference to the cached object. Pinned keys (promised by a
lookup lease, or being stored) are never chosen for eviction, and an evicted object that a reader still
holds stays valid until the reader lets go.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from kvtier.memory.layout import KVLayout
from kvtier.memory.memory_obj import MemoryObj
from kvtier.memory.pool import MemoryPool
from kvtier.metrics import CacheMetrics
from kvtier.storage.base import Allocate, PinTable, StorageTier, TierUsage
from kvtier.storage.eviction import EvictionPolicy
from kvtier.tokens.keys import CacheKey


class MemoryTier(StorageTier):
    name = "memory"

    def __init__(self, pool: MemoryPool, policy: EvictionPolicy, metrics: CacheMetrics | None = None):
        self.pool = pool
        self.policy = policy
        self.metrics = metrics or CacheMetrics()
        self._entries: dict[CacheKey, MemoryObj] = {}
        self._pins = PinTable()
        self._lock = threading.RLock()

    def contains(self, key: CacheKey) -> bool:
        return key in self._entries

    def get(self, key: CacheKey, allocate: Allocate | None = None) -> MemoryObj | None:
        with self._lock:
            obj = self._entries.get(key)
            if obj is None:
                return None
            self.policy.touch(key)
            return obj.ref()

    def put(self, key: CacheKey, obj: MemoryObj) -> bool:
        with self._lock:
            if key in self._entries:
                return False
            self._entries[key] = obj.ref()
            self.policy.insert(key)
            return True

    def put_many(self, keys: Sequence[CacheKey], objs: Sequence[MemoryObj]) -> int:
        # Tail first: the head of the prompt ends up newest, so it is evicted last.
        pairs = list(zip(keys, objs, strict=True))
        with self._lock:
            return sum(self.put(k, o) for k, o in reversed(pairs))

    def touch_prefix(self, keys: Sequence[CacheKey]) -> None:
        with self._lock:
            for key in reversed(keys):
                if key in self._entries:
                    self.policy.touch(key)

    def allocate(self, layout: KVLayout, num_tokens: int, align_like: int | None = None) -> MemoryObj | None:
        """A new object from the pool, evicting unpinned chunks until it fits; None if it cannot.
        ``align_like``: see :meth:`MemoryPool.allocate`."""
        if not self.pool.fits(layout.chunk_bytes(num_tokens)):
            return None
        with self._lock:
            while True:
                obj = self.pool.allocate(layout, num_tokens, align_like)
                if obj is not None:
                    return obj
                victim = self.policy.victim(lambda k: not self._pins.is_pinned(k))
                if victim is None:
                    return None
                self._entries.pop(victim).unref()  # type: ignore[call-overload]
                self.metrics.evictions.inc(tier=self.name)

    def delete(self, key: CacheKey) -> bool:
        with self._lock:
            obj = self._entries.pop(key, None)
            if obj is None:
                return False
            self.policy.remove(key)
            obj.unref()
            return True

    def clear(self) -> int:
        with self._lock:
            keys = list(self._entries)
            for key in keys:
                self.delete(key)
        self.pool.release_free_pages()
        return len(keys)

    def pin(self, keys: Sequence[CacheKey]) -> list[CacheKey]:
        with self._lock:
            pinned = [k for k in keys if k in self._entries]
            for key in pinned:
                self._pins.pin(key)
            return pinned

    def unpin(self, keys: Sequence[CacheKey]) -> None:
        with self._lock:
            for key in keys:
                self._pins.unpin(key)

    def usage(self) -> TierUsage:
        return TierUsage(self.pool.used_bytes, self.pool.capacity_bytes, len(self._entries), len(self._pins))

    def keys(self) -> list[CacheKey]:
        with self._lock:
            return list(self._entries)

    def close(self) -> None:
        self.clear()
