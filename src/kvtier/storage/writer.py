"""Background writes to a slower tier: bounded, deduplicated, never blocking the caller.

Each slower tier gets its writer threads (one for a disk, several for a remote store, whose writes are
round trips) and a queue bounded in bytes. A queued chunk holds a reference to its
memory object, so the bound is also a bound on memory kept alive for writes; when the queue is full new
chunks are dropped (and counted) instead of growing memory or stalling the engine.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence

from kvtier.memory.memory_obj import MemoryObj
from kvtier.metrics import CacheMetrics
from kvtier.storage.base import StorageTier
from kvtier.tokens.keys import CacheKey

log = logging.getLogger(__name__)


class BackgroundWriter:
    def __init__(self, tier: StorageTier, max_queued_bytes: int, metrics: CacheMetrics, threads: int = 1) -> None:
        self.tier = tier
        self.max_queued_bytes = max_queued_bytes
        self.metrics = metrics
        self._queue: deque[tuple[CacheKey, MemoryObj]] = deque()
        self._queued_ids: set[bytes] = set()
        self.queued_bytes = 0
        self._active = 0  # chunks being written now
        self._closed = False
        self._cond = threading.Condition()
        self._threads = [
            threading.Thread(target=self._run, name=f"kvtier-writer-{tier.name}-{i}", daemon=True)
            for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, keys: Sequence[CacheKey], objs: Sequence[MemoryObj]) -> int:
        """Queue chunks the tier lacks; return how many were queued."""
        queued = 0
        with self._cond:
            for key, obj in zip(keys, objs, strict=True):
                # A remote tier's contains is a round trip: asked on the writer thread, not the caller's.
                if self._closed or key.id in self._queued_ids or (self.tier.is_local and self.tier.contains(key)):
                    continue
                if self.queued_bytes + obj.nbytes > self.max_queued_bytes:
                    self.metrics.errors.inc(tier=self.tier.name, kind="write_dropped")
                    continue
                self._queue.append((key, obj.ref()))
                self._queued_ids.add(key.id)
                self.queued_bytes += obj.nbytes
                queued += 1
            if queued:
                self._cond.notify_all()
        return queued

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                key, obj = self._queue.popleft()
                self._active += 1
            try:
                self.tier.put(key, obj)  # tiers skip keys they already hold
            except Exception as exc:  # a failing tier must not kill the writer
                log.warning("background write to %s failed: %s", self.tier.name, exc)
                self.metrics.errors.inc(tier=self.tier.name, kind="write_failed")
            finally:
                obj.unref()
                with self._cond:
                    self._queued_ids.discard(key.id)
                    self.queued_bytes -= obj.nbytes
                    self._active -= 1
                    self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued chunk is written; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._queue or self._active:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Finish queued writes within ``timeout``; discard (and release) whatever is left."""
        self.flush(timeout)
        with self._cond:
            self._closed = True
            dropped = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for key, obj in dropped:
            obj.unref()
            self._queued_ids.discard(key.id)
            self.queued_bytes -= obj.nbytes
        if dropped:
            log.warning("discarded %d unwritten chunks for %s at close", len(dropped), self.tier.name)
        for thread in self._threads:
            thread.join(timeout)
