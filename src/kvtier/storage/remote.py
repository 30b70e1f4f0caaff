"""Remote tiers: chunks in a store that many machines share (Redis/Valkey, S3, ...), behind one adapter.

A backend implements :class:`RemoteStore`: a handful of byte operations on named values, batched where the store
can answer many names in one round trip. :class:`RemoteTier` turns any of them into a :class:`StorageTier`:

- names derived from cache keys under a configurable prefix, so one store can hold many models and tenants;
- every value in the versioned, checksummed chunk format (``kvtier.codecs.chunk_format``); a value that fails
  verification is a miss, counted, and (optionally) deleted, never returned;
- every call through a :class:`CircuitBreaker`: a dead or slow store (per-operation timeouts are the backend
  client's) turns into fast misses after a few failures and is probed again after a cool-down, so it recovers by
  itself; errors are counted per operation and logged once per incident, not per request;
- measured read bandwidth and latency, which the tiered store uses to skip fetches slower than recomputing.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TypeVar
from urllib.parse import urlsplit

from kvtier.codecs.base import Codec
from kvtier.codecs.chunk_format import decode_chunk, encode_chunk
from kvtier.codecs.registry import NAIVE, codec_named
from kvtier.config import KVTierConfig
from kvtier.errors import ConfigError, CorruptChunkError
from kvtier.memory.memory_obj import MemoryObj
from kvtier.metrics import CacheMetrics
from kvtier.storage.base import Allocate, StorageTier, TierUsage, discard_bad_chunk
from kvtier.tokens.keys import CacheKey, Namespace

log = logging.getLogger(__name__)
T = TypeVar("T")
Value = bytes | bytearray | memoryview
PutItem = tuple[str, Sequence[Value], Namespace | None]  # a value's name, its parts, the chunk's namespace


class RemoteStore(ABC):
    """Byte operations on named values in one remote store. Implementations raise on failure (timeouts
    included); :class:`RemoteTier` turns failures into misses."""

    @abstractmethod
    def get_many(self, names: Sequence[str]) -> list[Value | None]:
        """The values of ``names`` (None where absent), in as few round trips as the store allows."""

    @abstractmethod
    def put(self, name: str, parts: Sequence[Value], ttl_sec: float | None, namespace: Namespace | None = None) -> bool:
        """Store the concatenation of ``parts`` under ``name`` so that readers see all of it or nothing. False if
        ``name`` already held a value (kept as it was): a store that can, writes only if absent, atomically.
        ``namespace``: the chunk's, for a store that accounts by tenant (a kvtier server); others ignore it."""

    #: A store that sends many values in one round trip overrides :meth:`put_many` and sets this: the bytes of
    #: chunks it wants per call (see ``StorageTier.write_batch_bytes``).
    write_batch_bytes = 0

    def put_many(self, items: Sequence[PutItem], ttl_sec: float | None) -> list[bool]:
        """:meth:`put` for each ``(name, parts, namespace)``; a store that can send many in one round trip
        overrides it. Which were newly stored."""
        return [self.put(name, parts, ttl_sec, namespace) for name, parts, namespace in items]

    @abstractmethod
    def exists_many(self, names: Sequence[str]) -> list[bool]:
        """Which of ``names`` exist, in as few round trips as the store allows."""

    @abstractmethod
    def delete_many(self, names: Sequence[str]) -> int:
        """Delete ``names``; return how many existed (or were deleted)."""

    @abstractmethod
    def clear(self, prefix: str) -> int:
        """Delete every value whose name starts with ``prefix``; return how many."""

    def close(self) -> None:
        """Release connections."""


def value_size(parts: Sequence[Value]) -> int:
    """Bytes of a value given as its parts."""
    return sum(memoryview(p).nbytes for p in parts)


def host_port(item: str, default_port: int, shown_url: str) -> tuple[str, int]:
    """One ``host[:port]`` of a remote_url's server list. Raises ConfigError naming ``shown_url``."""
    try:
        parsed = urlsplit("//" + item)
        host, port = parsed.hostname, parsed.port
    except ValueError:
        host = port = None
    if not host or parsed.path or port == 0:
        raise ConfigError(f"remote_url {shown_url!r}: {item!r} is not host[:port]")
    return host, port or default_port


class CircuitBreaker:
    """Closed: calls go through. After ``failures`` consecutive failures it opens: calls are refused (fast
    misses) for ``cooldown_sec``; then one probe call is let through (half-open), which closes it on success or
    opens it again on failure. Thread-safe."""

    def __init__(self, failures: int, cooldown_sec: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_failures = failures
        self.cooldown_sec = cooldown_sec
        self._clock = clock
        self._failures = 0
        self._open_until: float | None = None
        self._probing = False
        self._lock = threading.Lock()

    @property
    def state(self) -> str:
        if self._open_until is None:
            return "closed"
        return "half-open" if self._clock() >= self._open_until else "open"

    def allow(self) -> bool:
        with self._lock:
            if self._open_until is None:
                return True
            if self._clock() < self._open_until or self._probing:
                return False
            self._probing = True  # exactly one probe at a time
            return True

    def success(self) -> bool:
        """Record a success; True if this closed an open breaker."""
        with self._lock:
            was_open = self._open_until is not None
            self._failures, self._open_until, self._probing = 0, None, False
            return was_open

    def failure(self) -> bool:
        """Record a failure; True if this opened the breaker (the start of an incident)."""
        with self._lock:
            self._failures += 1
            self._probing = False
            if self._open_until is not None or self._failures >= self.max_failures:
                opened = self._open_until is None
                self._open_until = self._clock() + self.cooldown_sec
                return opened
            return False


class RemoteTier(StorageTier):
    """A :class:`RemoteStore` as a storage tier (see the module docstring)."""

    is_local = False

    def __init__(
        self,
        name: str,
        store: RemoteStore,
        metrics: CacheMetrics,
        *,
        prefix: str = "kvtier",
        breaker: CircuitBreaker | None = None,
        ttl_sec: float | None = None,
        delete_corrupt: bool = True,
        admit_after_hits: int = 0,
        codec: Codec = NAIVE,
    ) -> None:
        self.name = name
        self.store = store
        self.metrics = metrics
        self.prefix = prefix.rstrip("/") + "/"
        self.breaker = breaker or CircuitBreaker(3, 5.0)
        self.ttl_sec = ttl_sec or None
        self.delete_corrupt = delete_corrupt
        self.admit_after_hits = admit_after_hits
        self.codec = codec  # how payloads are encoded on the way out (encoding runs on the background writer)
        self.read_bandwidth: float | None = None  # bytes/s of batched reads (latency included), moving average
        self._incident_errors = 0

    @classmethod
    def from_config(
        cls, name: str, store: RemoteStore, config: KVTierConfig, metrics: CacheMetrics, *, prefix: str | None = None,
        applies_ttl: bool = True,
    ) -> RemoteTier:  # fmt: skip
        """The tier with the ``remote_*`` settings every backend shares. ``prefix``: the backend's own, where it
        differs from ``remote_prefix``; ``applies_ttl``: False for a store that cannot expire values (S3)."""
        return cls(
            name,
            store,
            metrics,
            prefix=config.remote_prefix if prefix is None else prefix,
            breaker=CircuitBreaker(config.remote_circuit_failures, config.remote_circuit_cooldown_sec),
            ttl_sec=config.remote_ttl_sec if applies_ttl else None,
            delete_corrupt=config.remote_delete_corrupt,
            admit_after_hits=config.remote_admit_after_hits,
            codec=codec_named(config.remote_serde),
        )

    @property
    def write_batch_bytes(self) -> int:  # type: ignore[override]
        return self.store.write_batch_bytes

    def name_for(self, key: CacheKey) -> str:
        return self.prefix + key.to_str()

    # -- failure handling ---------------------------------------------------------------------------
    def _call(self, op: str, fn: Callable[[], T], fallback: T) -> T:
        if not self.breaker.allow():
            self.metrics.errors.inc(tier=self.name, kind="circuit_open")
            return fallback
        try:
            result = fn()
        except Exception as exc:  # any client error is a miss for the caller, never an exception
            self.metrics.errors.inc(tier=self.name, kind=f"{op}_failed")
            self._incident_errors += 1
            if self.breaker.failure():
                log.warning(
                    "remote tier %s unavailable (%s failed: %s); serving misses, retrying in %.0f s",
                    self.name,
                    op,
                    exc,
                    self.breaker.cooldown_sec,
                )
            return fallback
        if self.breaker.success():
            log.warning("remote tier %s recovered after %d failed calls", self.name, self._incident_errors)
            self._incident_errors = 0
        return result

    @property
    def available(self) -> bool:  # type: ignore[override]
        """False from a failed call until the next one succeeds (the breaker may not be open yet)."""
        return self._incident_errors == 0 and self.breaker.state == "closed"

    # -- StorageTier ---------------------------------------------------------------------------------
    def contains(self, key: CacheKey) -> bool:
        return self.contains_many([key])[0]

    def contains_many(self, keys: Sequence[CacheKey]) -> list[bool]:
        if not keys:
            return []
        names = [self.name_for(k) for k in keys]
        return self._call("exists", lambda: self.store.exists_many(names), [False] * len(keys))

    def get(self, key: CacheKey, allocate: Allocate) -> MemoryObj | None:
        return self.get_many([key], allocate)[0]

    def get_many(self, keys: Sequence[CacheKey], allocate: Allocate) -> list[MemoryObj | None]:
        """Read many chunks in one batched call; each verified value is copied into memory from ``allocate``."""
        started = time.perf_counter()
        names = [self.name_for(k) for k in keys]
        values = self._call("get", lambda: self.store.get_many(names), [None] * len(keys))
        objs = [None if v is None else self._decode(k, v, allocate) for k, v in zip(keys, values, strict=True)]
        elapsed = time.perf_counter() - started
        nbytes = sum(memoryview(v).nbytes for v, o in zip(values, objs, strict=True) if o is not None)  # as stored
        if nbytes:
            self.metrics.read_bytes.inc(nbytes, tier=self.name)
            self.metrics.read_seconds.observe(elapsed, tier=self.name)
            self._observe(nbytes, elapsed)
        return objs

    def _decode(self, key: CacheKey, value: Value, allocate: Allocate) -> MemoryObj | None:
        try:
            obj = decode_chunk(value, key.id, allocate, self.codec)
        except CorruptChunkError as exc:
            discard_bad_chunk(self, self.metrics, key, exc, self.delete_corrupt)
            return None
        if obj is None:
            self.metrics.errors.inc(tier=self.name, kind="no_memory")
        return obj

    def _observe(self, nbytes: int, seconds: float) -> None:
        rate = nbytes / max(seconds, 1e-9)
        previous = self.read_bandwidth
        self.read_bandwidth = rate if previous is None else 0.8 * previous + 0.2 * rate

    def fetch_seconds(self, nbytes: int) -> float | None:
        """Estimated time to read ``nbytes`` in one batched call; None before the first measured read."""
        return None if self.read_bandwidth is None else nbytes / self.read_bandwidth

    def put(self, key: CacheKey, obj: MemoryObj) -> bool:
        return self.put_many([key], [obj]) == 1

    def put_many(self, keys: Sequence[CacheKey], objs: Sequence[MemoryObj]) -> int:
        """Write chunks in one call to the store (one round trip where it can); return how many were new."""
        started = time.perf_counter()
        items = [
            (self.name_for(k), encode_chunk(k.id, o, self.codec), k.namespace) for k, o in zip(keys, objs, strict=True)
        ]
        stored = self._call("put", lambda: self.store.put_many(items, self.ttl_sec), [False] * len(items))
        nbytes = sum(value_size(parts) for (_, parts, _), new in zip(items, stored, strict=True) if new)
        if nbytes:
            self.metrics.write_bytes.inc(nbytes, tier=self.name)
            self.metrics.write_seconds.observe(time.perf_counter() - started, tier=self.name)
        return sum(stored)

    def delete(self, key: CacheKey) -> bool:
        return self._call("delete", lambda: self.store.delete_many([self.name_for(key)]), 0) > 0

    def clear(self) -> int:
        return self._call("clear", lambda: self.store.clear(self.prefix), 0)

    def usage(self) -> TierUsage:
        # A shared store's size is the operator's to watch (and costly to count); report what is known.
        return TierUsage(used_bytes=0, capacity_bytes=0, chunks=0)

    def close(self) -> None:
        self.store.close()
