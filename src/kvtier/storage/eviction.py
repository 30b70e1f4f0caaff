"""Eviction policies, by name: LRU, LFU, FIFO and S3-FIFO (scan-resistant).

A policy only orders keys; the tier owns the data and the byte budget. ``victim(evictable)`` picks the next
key to evict among those ``evictable`` accepts (pinned or in-use keys are skipped), forgets it and returns it.
Tiers record a prompt's chunks in reverse order (tail first) when they store and when they are used, so the
head of a prefix counts as newer than its tail and, within a prompt, the tail goes first: a prefix with a
hole is worthless. Across prompts that share a head this holds for LRU; FIFO ignores uses by definition, and
LFU and S3-FIFO favour the shared head through its higher use count.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import TypeVar

from kvtier.config import policy_name

K = TypeVar("K", bound=Hashable)
Evictable = Callable[[K], bool]


class EvictionPolicy(ABC):
    """Orders the keys of one tier for eviction. Not thread-safe: the tier serialises calls."""

    name = ""

    @abstractmethod
    def insert(self, key: Hashable) -> None:
        """Record a newly stored key (must not be present)."""

    @abstractmethod
    def touch(self, key: Hashable) -> None:
        """Record a hit on a present key."""

    @abstractmethod
    def remove(self, key: Hashable) -> None:
        """Forget a key that left the tier for another reason (delete, corruption)."""

    @abstractmethod
    def victim(self, evictable: Evictable) -> Hashable | None:
        """Remove and return the next key to evict that ``evictable`` accepts, or None."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __contains__(self, key: object) -> bool: ...


class _OrderedPolicy(EvictionPolicy):
    """A single queue, oldest first; subclasses decide whether a hit moves a key to the back."""

    move_on_touch = True

    def __init__(self) -> None:
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def insert(self, key: Hashable) -> None:
        self._order[key] = None

    def touch(self, key: Hashable) -> None:
        if self.move_on_touch and key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: Hashable) -> None:
        self._order.pop(key, None)

    def victim(self, evictable: Evictable) -> Hashable | None:
        for key in self._order:
            if evictable(key):
                del self._order[key]
                return key
        return None

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: object) -> bool:
        return key in self._order

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._order)


class LRUPolicy(_OrderedPolicy):
    """Least recently used goes first."""

    name = "LRU"


class FIFOPolicy(_OrderedPolicy):
    """First stored goes first; hits do not matter."""

    name = "FIFO"
    move_on_touch = False


class LFUPolicy(EvictionPolicy):
    """Least frequently used goes first; ties go to the least recently used. O(1) per operation."""

    name = "LFU"

    def __init__(self) -> None:
        self._freq: dict[Hashable, int] = {}
        self._buckets: dict[int, OrderedDict[Hashable, None]] = {}

    def insert(self, key: Hashable) -> None:
        self._freq[key] = 1
        self._buckets.setdefault(1, OrderedDict())[key] = None

    def touch(self, key: Hashable) -> None:
        freq = self._freq.get(key)
        if freq is None:
            return
        self._drop_from_bucket(key, freq)
        self._freq[key] = freq + 1
        self._buckets.setdefault(freq + 1, OrderedDict())[key] = None

    def remove(self, key: Hashable) -> None:
        freq = self._freq.pop(key, None)
        if freq is not None:
            self._drop_from_bucket(key, freq)

    def _drop_from_bucket(self, key: Hashable, freq: int) -> None:
        bucket = self._buckets[freq]
        del bucket[key]
        if not bucket:
            del self._buckets[freq]

    def victim(self, evictable: Evictable) -> Hashable | None:
        for freq in sorted(self._buckets):
            for key in self._buckets[freq]:
                if evictable(key):
                    self.remove(key)
                    return key
        return None

    def __len__(self) -> int:
        return len(self._freq)

    def __contains__(self, key: object) -> bool:
        return key in self._freq


class S3FIFOPolicy(EvictionPolicy):
    """S3-FIFO (Yang et al., SOSP'23): a small probation FIFO, a main FIFO and a ghost list of keys.

    New keys enter the small queue; keys hit while there move to main, the rest leave quickly, so one pass
    over many never-reused chunks (a scan) cannot flush the reused working set. Keys evicted from small are
    remembered in the ghost list and go straight to main if they come back.
    """

    name = "S3FIFO"
    SMALL_RATIO = 0.1
    MAX_FREQ = 3

    def __init__(self) -> None:
        self._small: OrderedDict[Hashable, None] = OrderedDict()
        self._main: OrderedDict[Hashable, None] = OrderedDict()
        self._ghost: OrderedDict[Hashable, None] = OrderedDict()
        self._freq: dict[Hashable, int] = {}

    def insert(self, key: Hashable) -> None:
        self._freq[key] = 0
        if key in self._ghost:
            del self._ghost[key]
            self._main[key] = None
        else:
            self._small[key] = None

    def touch(self, key: Hashable) -> None:
        if key in self._freq:
            self._freq[key] = min(self._freq[key] + 1, self.MAX_FREQ)

    def remove(self, key: Hashable) -> None:
        if self._freq.pop(key, None) is not None:
            self._small.pop(key, None)
            self._main.pop(key, None)

    def victim(self, evictable: Evictable) -> Hashable | None:
        # Each key can be looked at a bounded number of times (frequency drops by one per pass), so the
        # loop ends even when everything is pinned.
        budget = (self.MAX_FREQ + 2) * (len(self._freq) + 1)
        while budget > 0 and self._freq:
            budget -= 1
            from_small = (self._small and len(self._small) >= self.SMALL_RATIO * len(self._freq)) or not self._main
            key = self._evict_small(evictable) if from_small else self._evict_main(evictable)
            if key is not None:
                return key
        # The queue chosen above held only pinned keys; the other one may still have an evictable key.
        for queue in (self._small, self._main):
            for key in queue:
                if evictable(key):
                    self.remove(key)
                    return key
        return None

    def _evict_small(self, evictable: Evictable) -> Hashable | None:
        key, _ = self._small.popitem(last=False)
        if self._freq[key] > 0:
            self._freq[key] = 0
            self._main[key] = None
            return None
        if not evictable(key):
            self._small[key] = None
            return None
        del self._freq[key]
        self._ghost[key] = None
        while len(self._ghost) > max(len(self._main), 1):
            self._ghost.popitem(last=False)
        return key

    def _evict_main(self, evictable: Evictable) -> Hashable | None:
        key, _ = self._main.popitem(last=False)
        if self._freq[key] > 0 or not evictable(key):
            self._freq[key] = max(self._freq[key] - 1, 0)
            self._main[key] = None
            return None
        del self._freq[key]
        return key

    def __len__(self) -> int:
        return len(self._freq)

    def __contains__(self, key: object) -> bool:
        return key in self._freq


EVICTION_POLICIES: dict[str, type[EvictionPolicy]] = {
    cls.name: cls for cls in (FIFOPolicy, LFUPolicy, LRUPolicy, S3FIFOPolicy)
}  # one per name in kvtier.config.CACHE_POLICIES (the configuration validates names without importing this)


def make_policy(name: str) -> EvictionPolicy:
    """Create a policy by (case-insensitive) name; raise ValueError naming the choices."""
    return EVICTION_POLICIES[policy_name(name)]()
