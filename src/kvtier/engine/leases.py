"""Lookup leases: pins taken by ``lookup(pin=True)`` that are released explicitly or expire.

A client that looks up a prefix, is promised its chunks, then dies must not keep them pinned forever: every
lease has a deadline, and expired leases are swept on each engine call.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from kvtier.storage.base import StorageTier
from kvtier.tokens.keys import CacheKey

Pins = list[tuple[StorageTier, list[CacheKey]]]


@dataclass(frozen=True, slots=True)
class Lease:
    """A promise that the chunks of a lookup stay cached until released or ``deadline`` (monotonic)."""

    id: int
    hit_tokens: int
    deadline: float


class LeaseTable:
    def __init__(self, timeout: float, unpin: Callable[[Pins], None]) -> None:
        self.timeout = timeout
        self._unpin = unpin
        self._leases: dict[int, tuple[Lease, Pins]] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def grant(self, pins: Pins, hit_tokens: int) -> Lease:
        with self._lock:  # deadline taken under the lock: insertion order must stay deadline order
            lease = Lease(next(self._ids), hit_tokens, time.monotonic() + self.timeout)
            self._leases[lease.id] = (lease, pins)
        return lease

    def release(self, lease: Lease | int) -> bool:
        """Drop a lease's pins; False if it was already released or expired."""
        lease_id = lease if isinstance(lease, int) else lease.id
        with self._lock:
            entry = self._leases.pop(lease_id, None)
        if entry is None:
            return False
        self._unpin(entry[1])
        return True

    def expire(self, now: float | None = None) -> int:
        """Release every lease past its deadline; return how many."""
        now = time.monotonic() if now is None else now
        expired = []
        with self._lock:
            # One timeout for all leases, so insertion order is deadline order: stop at the first live one.
            for lease_id, (lease, _) in self._leases.items():
                if lease.deadline > now:
                    break
                expired.append(lease_id)
        return sum(self.release(lid) for lid in expired)

    def release_all(self) -> None:
        for lease_id in list(self._leases):
            self.release(lease_id)

    def __len__(self) -> int:
        return len(self._leases)
