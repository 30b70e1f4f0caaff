"""Tiers composed: memory first, then local disk, then remote stores.

A prompt's chunks may be spread across tiers (the head in memory, the tail on disk). ``locate`` finds, for the
longest prefix of keys held anywhere, which tier to read each chunk from; ``read`` fetches them (slower tiers
in parallel, straight into pool memory) and promotes what came from a slower tier into memory; ``write``
stores into memory synchronously and into every slower tier in the background.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from kvtier.memory.layout import KVLayout
from kvtier.memory.memory_obj import MemoryObj
from kvtier.memory.pool import MemoryPool
from kvtier.metrics import CacheMetrics
from kvtier.storage.base import StorageTier
from kvtier.storage.memory import MemoryTier
from kvtier.storage.writer import BackgroundWriter
from kvtier.tokens.keys import CacheKey

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ReadChunks:
    """Chunks read for a prefix, each with the name of the tier it came from."""

    objs: list[MemoryObj]
    tiers: list[str]


class TieredStorage:
    """Ordered tiers over one memory pool. ``memory`` is None when chunks are not kept in memory
    (LMCache's ``local_cpu: false``): the pool then only stages chunks on their way to or from slower tiers."""

    def __init__(
        self,
        pool: MemoryPool,
        memory: MemoryTier | None,
        lower: Sequence[StorageTier],
        metrics: CacheMetrics,
        *,
        max_queued_bytes: int,
        read_workers: int = 4,
    ) -> None:
        self.pool = pool
        self.memory = memory
        self.lower = list(lower)
        self.tiers: list[StorageTier] = ([memory] if memory else []) + self.lower
        self.metrics = metrics
        self.writers = {t.name: BackgroundWriter(t, max_queued_bytes, metrics) for t in self.lower}
        self._readers = ThreadPoolExecutor(read_workers, thread_name_prefix="kvtier-read")
        self._register_gauges()

    def _register_gauges(self) -> None:
        m = self.metrics
        m.used_bytes.add_source(lambda: {(t.name,): t.usage().used_bytes for t in self.tiers})
        m.capacity_bytes.add_source(lambda: {(t.name,): t.usage().capacity_bytes for t in self.tiers})
        m.chunks.add_source(lambda: {(t.name,): t.usage().chunks for t in self.tiers})
        m.pinned_chunks.add_source(lambda: {(t.name,): t.usage().pinned_chunks for t in self.tiers})
        m.queued_write_bytes.add_source(lambda: {(n,): w.queued_bytes for n, w in self.writers.items()})

    def allocate(self, layout: KVLayout, num_tokens: int, align_like: int | None = None) -> MemoryObj | None:
        if self.memory is not None:
            return self.memory.allocate(layout, num_tokens, align_like)
        return self.pool.allocate(layout, num_tokens, align_like)

    def locate(self, keys: Sequence[CacheKey]) -> list[StorageTier]:
        """For the longest prefix of ``keys`` held by some tier, the first (fastest) tier holding each key."""
        found: list[StorageTier | None] = [None] * len(keys)
        for tier in self.tiers:
            pending = [i for i, t in enumerate(found) if t is None]
            if not pending:
                break
            if tier.is_local:
                present = [tier.contains(keys[i]) for i in pending]
            else:  # one batched round trip for everything the local tiers lacked
                present = tier.contains_many([keys[i] for i in pending])
            for i, hit in zip(pending, present, strict=True):
                if hit:
                    found[i] = tier
        prefix: list[StorageTier] = []
        for tier in found:
            if tier is None:
                break
            prefix.append(tier)
        return prefix

    def touch(self, keys: Sequence[CacheKey]) -> None:
        """Record a use of a prompt's chunks in every tier (tail first)."""
        for tier in self.tiers:
            tier.touch_prefix(keys)

    def contains_any(self, key: CacheKey) -> bool:
        return any(t.contains(key) for t in self.tiers if t.is_local)

    def read(
        self,
        keys: Sequence[CacheKey],
        sources: Sequence[StorageTier],
        consume: Callable[[int, MemoryObj], None] | None = None,
    ) -> ReadChunks:
        """Objects (one reference each, owned by the caller) for the longest readable prefix of ``keys``.

        ``sources`` comes from :meth:`locate`. The located chunks are pinned while they are read, so making
        room for one chunk never evicts another chunk of the same prompt. ``consume(i, obj)`` is called for
        each chunk in prefix order as soon as it is available, so copying chunk ``i`` out overlaps reading the
        chunks after it.
        """
        pins = self.pin(keys, sources)
        pending: list[Future[MemoryObj | None] | MemoryObj | None] = [
            tier.get(key, self.allocate) if tier is self.memory else self._readers.submit(self._read_slow, key, tier)
            for key, tier in zip(keys, sources, strict=True)
        ]
        objs: list[MemoryObj] = []
        names: list[str] = []
        promoted: list[tuple[CacheKey, MemoryObj]] = []
        resolved = 0  # pending[:resolved] are owned by objs or were misses; the rest must be released
        try:
            for i, (key, tier) in enumerate(zip(keys, sources, strict=True)):
                obj, source = _resolve(pending[i]), tier
                resolved = i + 1
                if obj is None:  # gone or corrupt since located: another tier may still have it
                    obj, source = self._read_fallback(key, tier)
                if obj is None:
                    break
                objs.append(obj)
                names.append(source.name)
                if source is not self.memory:
                    promoted.append((key, obj))
                if consume is not None:
                    consume(i, obj)
        except BaseException:
            for obj in objs:
                obj.unref()
            raise
        finally:
            for item in pending[resolved:]:
                _release(_resolve(item))
            self.unpin(pins)
        self.touch(keys[: len(objs)])
        self._promote(promoted)
        return ReadChunks(objs, names)

    def _read_slow(self, key: CacheKey, tier: StorageTier) -> MemoryObj | None:
        try:
            return tier.get(key, self.allocate)
        except Exception as exc:  # a failing tier is a miss, never an error for the caller
            log.warning("read of %s from %s failed: %s", key.to_str(), tier.name, exc)
            self.metrics.errors.inc(tier=tier.name, kind="read_failed")
            return None

    def _read_fallback(self, key: CacheKey, failed: StorageTier) -> tuple[MemoryObj | None, StorageTier]:
        for tier in self.tiers:
            if tier is not failed and tier.contains(key):
                obj = self._read_slow(key, tier)
                if obj is not None:
                    return obj, tier
        return None, failed

    def _promote(self, pairs: list[tuple[CacheKey, MemoryObj]]) -> None:
        if not pairs:
            return
        keys = [k for k, _ in pairs]
        objs = [o for _, o in pairs]
        if self.memory is not None:
            self.metrics.promotions.inc(self.memory.put_many(keys, objs))
        self.submit_lower(keys, objs)  # e.g. a remote hit is also kept on local disk

    def write(self, keys: Sequence[CacheKey], objs: Sequence[MemoryObj]) -> int:
        """Store into memory now and into slower tiers in the background; return chunks new to memory."""
        stored = self.memory.put_many(keys, objs) if self.memory is not None else 0
        self.submit_lower(keys, objs)
        return stored

    def submit_lower(self, keys: Sequence[CacheKey], objs: Sequence[MemoryObj]) -> None:
        for writer in self.writers.values():
            writer.submit(keys, objs)

    def pin(self, keys: Sequence[CacheKey], sources: Sequence[StorageTier]) -> list[tuple[StorageTier, list[CacheKey]]]:
        """Pin each key in the tier it was located in; return what to hand to :meth:`unpin`."""
        by_tier: dict[int, list[CacheKey]] = {}
        for key, tier in zip(keys, sources, strict=True):
            by_tier.setdefault(id(tier), []).append(key)
        tiers = {id(t): t for t in self.tiers}
        return [(tiers[i], tiers[i].pin(ks)) for i, ks in by_tier.items()]

    @staticmethod
    def unpin(pins: list[tuple[StorageTier, list[CacheKey]]]) -> None:
        for tier, keys in pins:
            tier.unpin(keys)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for background writes; False if some did not finish within ``timeout``."""
        return all(w.flush(timeout) for w in self.writers.values())

    def delete(self, key: CacheKey) -> bool:
        return any([t.delete(key) for t in self.tiers])

    def clear(self) -> int:
        self.flush(10.0)
        return sum(t.clear() for t in self.tiers)

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        self._readers.shutdown(wait=True)
        for tier in self.tiers:
            tier.close()
        self.pool.close()


def _resolve(item: Future[MemoryObj | None] | MemoryObj | None) -> MemoryObj | None:
    return item.result() if isinstance(item, Future) else item


def _release(obj: MemoryObj | None) -> None:
    if obj is not None:
        obj.unref()
