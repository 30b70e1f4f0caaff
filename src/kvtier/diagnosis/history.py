"""A bounded memory of what happened to chunks: stored, evicted, refused, found corrupt.

The cache itself forgets a chunk when it evicts it; this index remembers, for the most recent ``capacity`` chunks,
the last thing that happened to each and where, so a later miss can say "evicted from disk 40 s ago" instead of
"not found". It also remembers which namespace (model, layout, rank, tenant) and chunk size stored a chunk's
tokens, so a miss under another namespace can say "these tokens are cached, for another model".

Entries are keyed by Python's ``hash()`` of the key id or chunk hash (a 64-bit int: an entry costs ~150 bytes
instead of ~250 with the 48-byte id). That hash differs between processes, which is fine for an in-memory index;
two chunks colliding (odds ~1e-10 at 65,536 entries) would only change the reason reported for a miss, never
what KV is served.
"""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass

from kvtier.tokens.keys import CacheKey, Namespace

MAX_VARIANTS = 1024  # distinct (namespace, chunk size) pairs remembered; beyond it the index starts over


class Event(enum.IntFlag):
    """What happened to a chunk. An entry keeps the flags of everything that happened to it since it was
    stored, and the tier and time of the last event."""

    STORED = enum.auto()
    EVICTED = enum.auto()
    NOT_ADMITTED = enum.auto()  # a slower tier does not take it yet (``admit_after_hits``)
    REFUSED = enum.auto()  # a tier could not take it: full, over a tenant's quota, write queue full, write failed
    CORRUPT = enum.auto()
    CODEC_MISMATCH = enum.auto()
    READ_FAILED = enum.auto()  # the tier holding it failed to answer


@dataclass(frozen=True, slots=True)
class Record:
    """The history of one chunk: every event since it was stored, the last one's tier, detail and time."""

    events: Event
    tier: str
    detail: str
    at: float  # time.monotonic()

    def age(self, now: float | None = None) -> float:
        return (time.monotonic() if now is None else now) - self.at


@dataclass(frozen=True, slots=True)
class Variant:
    """A namespace and the chunk size its client chunks prompts at: together they decide a chunk's key."""

    namespace: Namespace
    chunk_size: int


class KeyHistory:
    """The last event of the most recent ``capacity`` chunks (0: remember nothing). Thread-safe."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._records: dict[int, Record] = {}
        self._stored_by: dict[int, int] = {}  # hash(chunk hash) -> index into _variants
        self._variants: list[Variant] = []
        self._variant_ids: dict[tuple[bytes, int], int] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._records)

    def note(self, key_id: bytes, event: Event, tier: str, detail: str = "") -> None:
        """Record ``event`` for the chunk with id ``key_id`` in ``tier``."""
        if not self.capacity:
            return
        h = hash(key_id)
        with self._lock:
            previous = self._records.pop(h, None)
            events = event | previous.events if previous is not None and event != Event.STORED else event
            self._records[h] = Record(events, tier, detail, time.monotonic())
            _bound(self._records, self.capacity)

    def note_many(self, key_ids: list[bytes], event: Event, tier: str, detail: str = "") -> None:
        for key_id in key_ids:
            self.note(key_id, event, tier, detail)

    def stored(self, keys: list[CacheKey], chunk_size: int) -> None:
        """Chunks were stored (into memory, or the first tier): their history starts over, and their tokens are
        remembered as cached under their namespace and chunk size."""
        if not self.capacity or not keys:
            return
        now = time.monotonic()
        with self._lock:
            variant = self._variant_id(keys[0].namespace, chunk_size)
            for key in keys:
                h = hash(key.id)
                self._records.pop(h, None)
                self._records[h] = Record(Event.STORED, "", "", now)
                c = hash(key.chunk_hash)
                self._stored_by.pop(c, None)
                self._stored_by[c] = variant
            _bound(self._records, self.capacity)
            _bound(self._stored_by, self.capacity)

    def _variant_id(self, namespace: Namespace | None, chunk_size: int) -> int:
        assert namespace is not None, "stored keys carry their namespace"
        wanted = (namespace.digest, chunk_size)
        found = self._variant_ids.get(wanted)
        if found is None:
            if len(self._variants) >= MAX_VARIANTS:  # start over rather than grow without bound
                self._variants, self._variant_ids, self._stored_by = [], {}, {}
            found = self._variant_ids[wanted] = len(self._variants)
            self._variants.append(Variant(namespace, chunk_size))
        return found

    def last(self, key_id: bytes) -> Record | None:
        """What last happened to the chunk ``key_id``, if it is remembered."""
        return self._records.get(hash(key_id))

    def stored_under(self, chunk_hash: bytes) -> Variant | None:
        """The namespace and chunk size that last stored a chunk with these tokens (``chunk_hash``: a chunk's
        prefix-chained hash, which depends on the tokens and the chunk size only)."""
        variant = self._stored_by.get(hash(chunk_hash))
        return self._variants[variant] if variant is not None else None

    def chunk_sizes(self) -> set[int]:
        """The chunk sizes chunks were stored at."""
        return {v.chunk_size for v in self._variants}

    def clear(self) -> None:
        with self._lock:
            self._records.clear()
            self._stored_by.clear()


# A tier that is not part of a TieredStorage (a test's, a tool's) records into this one: it remembers nothing.
NO_HISTORY = KeyHistory(0)


def _bound(entries: dict[int, object], capacity: int) -> None:
    """Drop the oldest entries (dicts keep insertion order) until at most ``capacity`` remain."""
    while len(entries) > capacity:
        del entries[next(iter(entries))]
