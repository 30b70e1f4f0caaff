"""L1: chunks kept in the host memory pool, byte-budgeted, evicted by a named policy.

Reads are zero-copy: ``get`` hands out another reference to the cached object. Pinned keys (promised by a
lookup lease, or being stored) are never chosen for eviction, nor are chunks another holder still references
(a reader, a queued write to a slower tier): evicting them would free no memory. An object deleted or cleared
while a reader holds it stays valid until the reader lets go.
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Sequence

from kvtier.diagnosis.history import Event
from kvtier.memory.layout import KVLayout
from kvtier.memory.memory_obj import MemoryObj
from kvtier.memory.pool import MemoryPool
from kvtier.metrics import CacheMetrics
from kvtier.storage.base import Allocate, PinTable, StorageTier, TierUsage
from kvtier.storage.eviction import EvictionPolicy
from kvtier.tokens.keys import NAMESPACE_DIGEST_SIZE, CacheKey, Namespace


class MemoryTier(StorageTier):
    name = "memory"

    def __init__(self, pool: MemoryPool, policy: EvictionPolicy, metrics: CacheMetrics | None = None):
        self.pool = pool
        self.policy = policy
        self.metrics = metrics or CacheMetrics()
        self._entries: dict[CacheKey, MemoryObj] = {}
        self._pins = PinTable()
        self._lock = threading.RLock()
        self.quotas: dict[str, int] = {}  # tenant (cache_salt) -> bytes it may hold here
        self._tenant_bytes: dict[str, int] = {}

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
        """Keep ``obj``; False if ``key`` is present, or its tenant is over quota even after evicting the
        tenant's own unpinned chunks (a quota never evicts another tenant's)."""
        tenant = _tenant(key)
        with self._lock:
            if key in self._entries:
                return False
            quota = self.quotas.get(tenant)
            if quota is not None and not self._fit_quota(tenant, obj.nbytes, quota):
                self.metrics.errors.inc(tier=self.name, kind="quota")
                self.history.note(key.id, Event.REFUSED, self.name, "over its tenant's memory quota")
                return False
            self._entries[key] = obj.ref()
            self._tenant_bytes[tenant] = self._tenant_bytes.get(tenant, 0) + obj.nbytes
            self.policy.insert(key)
            return True

    def _fit_quota(self, tenant: str, nbytes: int, quota: int) -> bool:
        while self._tenant_bytes.get(tenant, 0) + nbytes > quota:
            victim = self.policy.victim(lambda k: _tenant(k) == tenant and not self._pins.is_pinned(k))
            if victim is None:
                return False
            self._evict(victim)  # type: ignore[arg-type]
        return True

    def _evict(self, key: CacheKey) -> None:
        self._drop(key)
        self.metrics.evictions.inc(tier=self.name)
        self.history.note(key.id, Event.EVICTED, self.name)

    def _drop(self, key: CacheKey) -> None:
        """Forget ``key`` (already removed from the policy) and release its memory."""
        obj = self._entries.pop(key)
        tenant = _tenant(key)
        self._tenant_bytes[tenant] -= obj.nbytes
        obj.unref()

    def tenant_bytes(self) -> dict[str, int]:
        with self._lock:
            return {t: n for t, n in self._tenant_bytes.items() if n}

    def delete_namespaces(self, digests: Collection[bytes]) -> int:
        with self._lock:
            doomed = [k for k in self._entries if k.id[:NAMESPACE_DIGEST_SIZE] in digests]
            for key in doomed:
                self.delete(key)
            return len(doomed)

    def namespaces(self) -> dict[bytes, Namespace]:
        with self._lock:
            return {k.namespace.digest: k.namespace for k in self._entries if k.namespace is not None}

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
                victim = self.policy.victim(self._evictable)
                if victim is None:
                    return None
                self._evict(victim)  # type: ignore[arg-type]

    def _evictable(self, key: CacheKey) -> bool:
        """Unpinned, and held by this tier alone: evicting a chunk a reader or a queued disk write still holds
        would free no memory, only lose a cached chunk."""
        if self._pins.is_pinned(key):
            return False
        entry = self._entries.get(key)
        return entry is None or entry.refcount == 1

    def delete(self, key: CacheKey) -> bool:
        with self._lock:
            if key not in self._entries:
                return False
            self.policy.remove(key)
            self._drop(key)
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


def _tenant(key: CacheKey) -> str:
    return key.namespace.cache_salt if key.namespace is not None else ""
