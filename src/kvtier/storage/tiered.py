"""Tiers composed: memory first, then local disk, then remote stores.

A prompt's chunks may be spread across tiers (the head in memory, the tail on disk). ``locate`` finds, for the
longest prefix of keys held anywhere, which tier to read each chunk from; ``read`` fetches them (slower tiers
in parallel, straight into pool memory) and promotes what came from a slower tier into memory; ``write``
stores into memory synchronously and into every slower tier in the background.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from kvtier.diagnosis.history import Event, KeyHistory
from kvtier.diagnosis.recent import RecentRequests
from kvtier.memory.layout import KVLayout
from kvtier.memory.memory_obj import MemoryObj
from kvtier.memory.pool import MemoryPool
from kvtier.metrics import CacheMetrics
from kvtier.storage.base import StorageTier
from kvtier.storage.disk import DiskTier
from kvtier.storage.memory import MemoryTier
from kvtier.storage.writer import BackgroundWriter
from kvtier.tokens.keys import CacheKey, salt_digest

log = logging.getLogger(__name__)


# Writes to a remote store in flight at once (each is a round trip; the store serves them in parallel).
REMOTE_WRITERS = 4
# Hit counts kept for admission rules (``admit_after_hits``); beyond this the least recent are forgotten.
MAX_TRACKED_HITS = 1 << 20
# Chunks whose last event (stored, evicted, refused, corrupt) is remembered for miss reasons: ~150 bytes each.
DEFAULT_HISTORY_ENTRIES = 1 << 16
# A chunk being read: from memory at once, or (a read of several chunks in flight, position in it).
Pending = MemoryObj | tuple[Future[list[MemoryObj | None]], int] | None


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
        history_entries: int = DEFAULT_HISTORY_ENTRIES,
    ) -> None:
        self.pool = pool
        self.memory = memory
        self.lower = list(lower)
        self.tiers: list[StorageTier] = ([memory] if memory else []) + self.lower
        self.metrics = metrics
        self.history = KeyHistory(history_entries)  # what happened to chunks, for miss reasons
        self.recent = RecentRequests()
        for tier in self.tiers:
            tier.history = self.history
        self.writers = {
            t.name: BackgroundWriter(t, max_queued_bytes, metrics, threads=1 if t.is_local else REMOTE_WRITERS)
            for t in self.lower
        }
        self._readers = ThreadPoolExecutor(read_workers, thread_name_prefix="kvtier-read")
        self._hits: OrderedDict[bytes, int] = OrderedDict()
        self._hits_lock = threading.Lock()
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

    def locate(self, keys: Sequence[CacheKey], *, ask_remote: bool = True) -> list[StorageTier]:
        """For the longest prefix of ``keys`` held by some tier, the first (fastest) tier holding each key.

        ``ask_remote=False`` (for a read that follows at once): keys no local tier holds are assigned to the first
        remote tier without asking it; the read then finds out, and ends the prefix at its first miss. A read of a
        missing value answers as fast as an existence check, so a retrieve costs one round trip, not two."""
        return located_prefix(self.find(keys, ask_remote=ask_remote))

    def find(self, keys: Sequence[CacheKey], *, ask_remote: bool = True) -> list[StorageTier | None]:
        """For each key, the first (fastest) tier holding it, or None (see :meth:`locate` for ``ask_remote``)."""
        found: list[StorageTier | None] = [None] * len(keys)
        for tier in self.tiers:
            pending = [i for i, t in enumerate(found) if t is None]
            if not pending:
                break
            if tier.is_local:
                present = [tier.contains(keys[i]) for i in pending]
            elif not ask_remote:
                present = [True] * len(pending)
            else:  # one batched round trip for everything the local tiers lacked
                present = tier.contains_many([keys[i] for i in pending])
            for i, hit in zip(pending, present, strict=True):
                if hit:
                    found[i] = tier
        return found

    def read_one(self, key: CacheKey, tier: StorageTier) -> MemoryObj | None:
        """``key`` from ``tier`` (one reference for the caller), or None."""
        return self._read_slow([key], tier)[0]

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
        pending = self._start_reads(keys, sources)
        objs: list[MemoryObj] = []
        names: list[str] = []
        promoted: list[tuple[CacheKey, MemoryObj, StorageTier]] = []
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
                    promoted.append((key, obj, source))
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
        self._admit_hits(keys[: len(objs)], objs)
        return ReadChunks(objs, names)

    def _start_reads(self, keys: Sequence[CacheKey], sources: Sequence[StorageTier]) -> list[Pending]:
        """Memory hits now; local slower tiers one chunk per reader thread; each remote tier one batched call."""
        pending: list[Pending] = [None] * len(keys)
        groups: dict[object, list[int]] = {}
        for i, (key, tier) in enumerate(zip(keys, sources, strict=True)):
            if tier is self.memory:
                pending[i] = tier.get(key, self.allocate)
            else:  # a disk reads chunks in parallel; a remote store answers a batch in one round trip
                groups.setdefault(i if tier.is_local else id(tier), []).append(i)
        for positions in groups.values():
            batch = self._readers.submit(self._read_slow, [keys[i] for i in positions], sources[positions[0]])
            for n, i in enumerate(positions):
                pending[i] = (batch, n)
        return pending

    def _read_slow(self, keys: list[CacheKey], tier: StorageTier) -> list[MemoryObj | None]:
        """Read ``keys`` from ``tier``; a failing tier gives misses, never an error."""
        try:
            return tier.get_many(keys, self.allocate)
        except Exception as exc:
            log.warning("read of %d chunks from %s failed: %s", len(keys), tier.name, exc)
            self.metrics.errors.inc(tier=tier.name, kind="read_failed")
            self.history.note_many([k.id for k in keys], Event.READ_FAILED, tier.name, f"read failed: {exc}")
            return [None] * len(keys)

    def _admit_hits(self, keys: Sequence[CacheKey], objs: Sequence[MemoryObj]) -> None:
        """Count hits; a chunk reaching a tier's ``admit_after_hits`` is written there now."""
        gated = [w for w in self.writers.values() if w.tier.admit_after_hits > 0]
        if not gated or not keys:
            return
        with self._hits_lock:
            counts = []
            for key in keys:
                count = self._hits.pop(key.id, 0) + 1
                self._hits[key.id] = count  # most recent last; the oldest are forgotten first
                counts.append(count)
            while len(self._hits) > MAX_TRACKED_HITS:
                self._hits.popitem(last=False)
        for writer in gated:
            due = [(k, o) for k, o, c in zip(keys, objs, counts, strict=True) if c == writer.tier.admit_after_hits]
            if due:
                writer.submit([k for k, _ in due], [o for _, o in due])

    def _read_fallback(self, key: CacheKey, failed: StorageTier) -> tuple[MemoryObj | None, StorageTier]:
        for tier in self.tiers:
            if tier is not failed and tier.is_local and tier.contains(key):
                obj = self._read_slow([key], tier)[0]
                if obj is not None:
                    return obj, tier
        return None, failed

    def _promote(self, promoted: list[tuple[CacheKey, MemoryObj, StorageTier]]) -> None:
        """Keep chunks read from slower tiers in memory and queue them for the other slower tiers (a remote hit
        is also kept on local disk), never for the tier they came from: that would send them back to it."""
        if not promoted:
            return
        if self.memory is not None:
            self.metrics.promotions.inc(self.memory.put_many([k for k, _, _ in promoted], [o for _, o, _ in promoted]))
        for writer in self.writers.values():
            due = [(k, o) for k, o, source in promoted if source is not writer.tier]
            if writer.tier.admit_after_hits == 0 and due:
                writer.submit([k for k, _ in due], [o for _, o in due])

    def write(self, keys: Sequence[CacheKey], objs: Sequence[MemoryObj]) -> int:
        """Store into memory now and into slower tiers in the background; return chunks new to memory."""
        stored = self.memory.put_many(keys, objs) if self.memory is not None else 0
        self.submit_lower(keys, objs)
        return stored

    def submit_lower(self, keys: Sequence[CacheKey], objs: Sequence[MemoryObj]) -> None:
        """Queue chunks for every slower tier that takes them on store (see ``admit_after_hits``)."""
        for writer in self.writers.values():
            gate = writer.tier.admit_after_hits
            if gate == 0:
                writer.submit(keys, objs)
            else:
                detail = f"{writer.tier.name} takes a chunk once it has been hit {gate} times"
                self.history.note_many([k.id for k in keys], Event.NOT_ADMITTED, writer.tier.name, detail)

    def affordable_prefix(
        self,
        sources: Sequence[StorageTier],
        tokens: Sequence[int],
        nbytes: Sequence[int],
        recompute_tokens_per_sec: float,
        count: bool = True,
    ) -> int:
        """How many located chunks are worth reading: a tier's chunks are skipped (and the prefix ends at the
        first of them) when reading them is estimated slower than recomputing their tokens at
        ``recompute_tokens_per_sec`` (0: always read). ``count``: add the skipped tokens to the metrics."""
        if recompute_tokens_per_sec <= 0:
            return len(sources)
        end = len(sources)
        for tier in {id(t): t for t in sources}.values():
            mine = [i for i, t in enumerate(sources) if t is tier]
            fetch = tier.fetch_seconds(sum(nbytes[i] for i in mine))
            if fetch is not None and fetch > sum(tokens[i] for i in mine) / recompute_tokens_per_sec:
                end = min(end, mine[0])
        if count:
            for i in range(end, len(sources)):
                self.metrics.fetch_skipped_tokens.inc(tokens[i], tier=sources[i].name)
        return end

    def pin(self, keys: Sequence[CacheKey], sources: Sequence[StorageTier]) -> list[tuple[StorageTier, list[CacheKey]]]:
        """Pin each key in the tier it was located in; return what to hand to :meth:`unpin`."""
        by_tier: dict[int, list[CacheKey]] = {}
        for key, tier in zip(keys, sources, strict=True):
            by_tier.setdefault(id(tier), []).append(key)
        tiers = {id(t): t for t in self.tiers}
        return [(tiers[i], tiers[i].pin(ks)) for i, ks in by_tier.items()]

    def pin_in_memory(self, keys: Sequence[CacheKey]) -> list[tuple[StorageTier, list[CacheKey]]]:
        """Pin those of ``keys`` the memory tier holds (a store keeps its cached head while it makes room for the
        rest); for :meth:`unpin`."""
        return [(self.memory, self.memory.pin(keys))] if self.memory is not None else []

    @staticmethod
    def unpin(pins: list[tuple[StorageTier, list[CacheKey]]]) -> None:
        for tier, keys in pins:
            tier.unpin(keys)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for background writes; False if some did not finish within ``timeout``."""
        return all(w.flush(timeout) for w in self.writers.values())

    def delete(self, key: CacheKey) -> bool:
        """Remove ``key`` from every tier; queued background writes land first, so none re-adds it later."""
        self.flush(10.0)
        return any([t.delete(key) for t in self.tiers])

    def tenant_namespaces(self, cache_salt: str) -> set[bytes]:
        """Digests of every namespace of tenant ``cache_salt`` with chunks in memory or on a disk tier."""
        digests = (
            {d for d, ns in self.memory.namespaces().items() if ns.cache_salt == cache_salt} if self.memory else set()
        )
        wanted = salt_digest(cache_salt)
        for tier in self.lower:
            if isinstance(tier, DiskTier):
                digests |= {d for d, info in tier.namespaces().items() if info.get("cache_salt_digest") == wanted}
        return digests

    def delete_namespaces(self, digests: set[bytes]) -> int:
        self.flush(10.0)
        return sum(t.delete_namespaces(digests) for t in self.tiers)

    def clear(self) -> int:
        self.flush(10.0)
        self.history.clear()  # a miss after a clear is "never stored", not "evicted"
        return sum(t.clear() for t in self.tiers)

    def unavailable(self) -> list[str]:
        """Names of the tiers that cannot answer now."""
        return [t.name for t in self.tiers if not t.available]

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        self._readers.shutdown(wait=True)
        for tier in self.tiers:
            tier.close()
        self.pool.close()


def located_prefix(found: Sequence[StorageTier | None]) -> list[StorageTier]:
    """The tiers of :meth:`TieredStorage.find`'s answer up to its first key no tier holds."""
    return list(itertools.takewhile(lambda tier: tier is not None, found))  # type: ignore[arg-type]


def _resolve(item: Pending) -> MemoryObj | None:
    if isinstance(item, tuple):  # (read of a batch of chunks, position in it)
        batch, position = item
        return batch.result()[position]
    return item


def _release(obj: MemoryObj | None) -> None:
    if obj is not None:
        obj.unref()
