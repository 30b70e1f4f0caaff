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

from kvtier.diagnosis.history import Event
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
                    self.tier.history.note(key.id, Event.REFUSED, self.tier.name, "write queue full")
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
                batch = self._take_batch()
                self._active += len(batch)
            try:
                self._write(batch)
            finally:
                for _, obj in batch:
                    obj.unref()
                with self._cond:
                    for key, obj in batch:
                        self._queued_ids.discard(key.id)
                        self.queued_bytes -= obj.nbytes
                    self._active -= len(batch)
                    self._cond.notify_all()

    def _write(self, batch: list[tuple[CacheKey, MemoryObj]]) -> None:
        try:
            self.tier.put_many([k for k, _ in batch], [o for _, o in batch])  # tiers skip keys they hold
        except Exception as exc:  # a failing tier must not kill the writer, nor one chunk lose its neighbours
            if len(batch) > 1:
                for item in batch:
                    self._write([item])
                return
            log.warning("background write to %s failed: %s", self.tier.name, exc)
            self.metrics.errors.inc(tier=self.tier.name, kind="write_failed")
            self.tier.history.note(batch[0][0].id, Event.REFUSED, self.tier.name, f"write failed: {exc}")

    def _take_batch(self) -> list[tuple[CacheKey, MemoryObj]]:
        """The next queued chunks up to the tier's ``write_batch_bytes`` together (at least one): small chunks go
        to a store that pipelines in one round trip, while large ones stay one per thread, written in parallel."""
        batch = [self._queue.popleft()]
        nbytes = batch[0][1].nbytes
        while self._queue and nbytes + self._queue[0][1].nbytes <= self.tier.write_batch_bytes:
            batch.append(self._queue.popleft())
            nbytes += batch[-1][1].nbytes
        return batch

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
