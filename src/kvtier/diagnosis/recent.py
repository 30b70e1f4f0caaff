"""The last requests with their hit/miss breakdown, for the dashboard and ``GET /requests``."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One lookup, retrieve or store: how many tokens it asked for, how many hit (by tier), and the misses by
    reason. ``cache_salt`` never leaves the process: the server shows a tenant id instead."""

    at: float  # time.time()
    op: str
    model: str
    total_tokens: int
    hit_tokens: int
    tier_tokens: dict[str, int]
    miss_tokens: dict[str, int]
    seconds: float
    stored_tokens: int = 0
    cache_salt: str = field(default="", repr=False)


class RecentRequests:
    """The last ``capacity`` requests, newest last. Thread-safe."""

    def __init__(self, capacity: int = 200) -> None:
        self._records: deque[RequestRecord] = deque(maxlen=capacity)
        self._lock = threading.Lock()

    def add(self, record: RequestRecord) -> None:
        with self._lock:
            self._records.append(record)

    def latest(self, n: int | None = None) -> list[RequestRecord]:
        """The last ``n`` (all by default), newest first."""
        with self._lock:
            records = list(self._records)
        records.reverse()
        return records[:n] if n is not None else records
