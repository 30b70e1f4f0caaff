"""The one small interface every storage tier implements.

A tier stores whole chunks under :class:`~kvtier.tokens.keys.CacheKey`. Reads return a
:class:`~kvtier.memory.MemoryObj` that the caller owns one reference to (and must ``unref``). A tier that keeps
bytes outside process memory reads into memory obtained from the ``allocate`` callback it is given, so a
chunk read from disk or the network lands directly where the engine will use it. Batched calls have default
loops; a tier that can do better (one round trip for many keys) overrides them.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from kvtier.diagnosis.history import NO_HISTORY, Event, KeyHistory
from kvtier.errors import CodecMismatchError, CorruptChunkError, TruncatedChunkError
from kvtier.memory.layout import KVLayout
from kvtier.memory.memory_obj import MemoryObj
from kvtier.metrics import CacheMetrics
from kvtier.tokens.keys import CacheKey

log = logging.getLogger("kvtier.storage")

Allocate = Callable[[KVLayout, int], MemoryObj | None]
"""Returns a new object for ``(layout, num_tokens)`` with one reference, or None when memory is short."""


@dataclass(frozen=True, slots=True)
class TierUsage:
    """How full a tier is."""

    used_bytes: int
    capacity_bytes: int
    chunks: int
    pinned_chunks: int = 0


class StorageTier(ABC):
    """One storage tier: memory, local disk, Redis, S3, a kvtier server..."""

    name: str = ""
    #: True when ``contains`` is a cheap in-process check (no I/O); the tiered store relies on it.
    is_local: bool = True
    #: Write a chunk here only once it has been hit this many times (0: on store). Keeps one-off prompts
    #: out of a shared remote store.
    admit_after_hits: int = 0
    #: The background writer hands this tier consecutive chunks up to this many bytes in one ``put_many``
    #: (a store that sends them in one round trip); 0: one chunk per call, writer threads in parallel.
    write_batch_bytes: int = 0
    #: Where the tier records what happens to chunks (evicted, refused, corrupt) so a later miss can say why; the
    #: tiered store gives each of its tiers its own. A tier on its own remembers nothing.
    history: KeyHistory = NO_HISTORY
    #: False while the tier cannot answer (a remote store down or timing out): a miss may then be its fault.
    available: bool = True

    @abstractmethod
    def contains(self, key: CacheKey) -> bool:
        """Whether the tier holds ``key`` now (a later ``get`` may still miss)."""

    def contains_many(self, keys: Sequence[CacheKey]) -> list[bool]:
        return [self.contains(k) for k in keys]

    @abstractmethod
    def get(self, key: CacheKey, allocate: Allocate) -> MemoryObj | None:
        """The chunk, verified, with one reference owned by the caller; None on a miss or a bad chunk."""

    def get_many(self, keys: Sequence[CacheKey], allocate: Allocate) -> list[MemoryObj | None]:
        """:meth:`get` for many keys; tiers with batched reads (one round trip) override it."""
        return [self.get(k, allocate) for k in keys]

    def fetch_seconds(self, nbytes: int) -> float | None:
        """Estimated time to read ``nbytes`` from this tier, if it measures that (remote tiers do)."""
        return None

    @abstractmethod
    def put(self, key: CacheKey, obj: MemoryObj) -> bool:
        """Store ``obj`` under ``key``; False if it was already present or could not be stored.

        The tier takes its own reference if it keeps ``obj``; the caller's reference is untouched.
        """

    def put_many(self, keys: Sequence[CacheKey], objs: Sequence[MemoryObj]) -> int:
        """Store a prompt's chunks (in prompt order); return how many were newly stored."""
        return sum(self.put(k, o) for k, o in zip(keys, objs, strict=True))

    @abstractmethod
    def delete(self, key: CacheKey) -> bool:
        """Remove ``key``; True if it was present."""

    @abstractmethod
    def clear(self) -> int:
        """Remove every chunk; return how many were removed."""

    @abstractmethod
    def usage(self) -> TierUsage: ...

    def delete_namespaces(self, digests: Collection[bytes]) -> int:
        """Remove every chunk of the namespaces with these digests (e.g. one tenant's); return how many.
        Tiers that cannot list their contents (shared remote stores) remove nothing."""
        return 0

    def pin(self, keys: Sequence[CacheKey]) -> list[CacheKey]:
        """Protect ``keys`` from eviction; return those actually pinned (present here)."""
        return []

    def unpin(self, keys: Sequence[CacheKey]) -> None:
        """Release pins taken by :meth:`pin` (one level per key)."""

    def touch_prefix(self, keys: Sequence[CacheKey]) -> None:
        """Record a hit on a prompt's chunks (tail first, so the head stays longest)."""

    def close(self) -> None:
        """Release resources; pending work is finished or safely discarded."""


class PinTable:
    """Per-key pin counts for tiers that support pinning. Not thread-safe: the tier's lock guards it."""

    def __init__(self) -> None:
        self._counts: dict[object, int] = {}

    def pin(self, key: object) -> None:
        self._counts[key] = self._counts.get(key, 0) + 1

    def unpin(self, key: object) -> None:
        count = self._counts.get(key, 0)
        if count <= 0:
            raise RuntimeError(f"unpin of a key that is not pinned: {key!r}")
        if count == 1:
            del self._counts[key]
        else:
            self._counts[key] = count - 1

    def is_pinned(self, key: object) -> bool:
        return key in self._counts

    def __len__(self) -> int:
        return len(self._counts)


def discard_bad_chunk(
    tier: StorageTier, metrics: CacheMetrics, key: CacheKey, exc: CorruptChunkError, delete: bool
) -> None:
    """What every tier does with a chunk that fails verification: log it, count it by kind (corrupt, truncated
    or codec_mismatch) and, if ``delete``, delete it, unless it is sound and only in a codec this reader does not
    take (others may). The read is then a miss, never wrong KV."""
    if isinstance(exc, CodecMismatchError):
        log.debug("%s tier: chunk %s: %s", tier.name, key.to_str(), exc)
        metrics.errors.inc(tier=tier.name, kind="codec_mismatch")
        tier.history.note(key.id, Event.CODEC_MISMATCH, tier.name, str(exc))
        return
    kind = "truncated" if isinstance(exc, TruncatedChunkError) else "corrupt"
    log.warning("%s tier: %s chunk %s: %s", tier.name, kind, key.to_str(), exc)
    metrics.errors.inc(tier=tier.name, kind=kind)
    tier.history.note(key.id, Event.CORRUPT, tier.name, f"{kind} in {tier.name}")
    if delete:
        tier.delete(key)
