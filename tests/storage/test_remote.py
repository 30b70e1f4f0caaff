"""The remote-tier adapter's own logic: circuit breaker, failure -> miss, admission after N hits, cost model.

These drive RemoteTier through a small in-process byte store that can be told to fail, so each rule is checked
exactly (timing included); the same behaviour against real Redis and SeaweedFS servers is covered in
test_redis.py and test_s3.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np
import pytest

from kvtier import CacheEngine, KVLayout, load_config
from kvtier.memory.pool import MemoryPool
from kvtier.metrics import CacheMetrics
from kvtier.storage.eviction import make_policy
from kvtier.storage.memory import MemoryTier
from kvtier.storage.remote import CircuitBreaker, RemoteStore, RemoteTier, Value
from kvtier.storage.tiered import TieredStorage
from kvtier.tokens.keys import Namespace


class FlakyStore(RemoteStore):
    """Values in a dict; ``down`` makes every call raise, as a dead server's client would."""

    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}
        self.down = False
        self.calls = 0

    def _check(self) -> None:
        self.calls += 1
        if self.down:
            raise ConnectionError("store is down")

    def get_many(self, names: Sequence[str]) -> list[Value | None]:
        self._check()
        return [self.values.get(n) for n in names]

    def put(self, name: str, parts: Sequence[Value], ttl_sec: float | None, namespace: Namespace | None = None) -> bool:
        self._check()
        if name in self.values:
            return False
        self.values[name] = b"".join(bytes(p) for p in parts)
        return True

    def exists_many(self, names: Sequence[str]) -> list[bool]:
        self._check()
        return [n in self.values for n in names]

    def delete_many(self, names: Sequence[str]) -> int:
        self._check()
        return sum(self.values.pop(n, None) is not None for n in names)

    def clear(self, prefix: str) -> int:
        self._check()
        names = [n for n in self.values if n.startswith(prefix)]
        return self.delete_many(names)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_consecutive_failures_and_probes_once_after_cooldown() -> None:
    """Closed -> open after N failures -> refuses calls for the cool-down -> one probe -> closed on success."""
    clock = Clock()
    breaker = CircuitBreaker(failures=3, cooldown_sec=5.0, clock=clock)
    assert [breaker.failure() for _ in range(3)] == [False, False, True]
    assert breaker.state == "open" and not breaker.allow()
    clock.now += 5.0
    assert breaker.state == "half-open"
    assert breaker.allow() and not breaker.allow()  # exactly one probe in flight
    assert breaker.success() and breaker.state == "closed" and breaker.allow()


def test_failed_probe_reopens_the_breaker() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures=1, cooldown_sec=2.0, clock=clock)
    assert breaker.failure()
    clock.now += 2.0
    assert breaker.allow()
    assert not breaker.failure()  # still the same incident
    assert breaker.state == "open" and not breaker.allow()


def test_success_resets_the_failure_count() -> None:
    breaker = CircuitBreaker(failures=2, cooldown_sec=1.0)
    breaker.failure()
    breaker.success()
    assert not breaker.failure() and breaker.state == "closed"


def make_tier(store: FlakyStore, metrics: CacheMetrics, clock: Clock | None = None, **kw: object) -> RemoteTier:
    breaker = CircuitBreaker(2, 10.0, clock=clock or Clock())
    return RemoteTier("remote", store, metrics, breaker=breaker, **kw)  # type: ignore[arg-type]


def test_dead_store_gives_misses_then_fast_misses_and_logs_once(pool, make_obj, make_keys, caplog) -> None:
    """Failures become misses (never exceptions); once open, calls do not reach the store at all; the incident
    is logged once, and its end once more."""
    store, metrics, clock = FlakyStore(), CacheMetrics(), Clock()
    tier = make_tier(store, metrics, clock)
    key = make_keys(1)[0]
    obj = make_obj(key)
    assert tier.put(key, obj)
    store.down = True
    with caplog.at_level(logging.WARNING, logger="kvtier"):
        for _ in range(20):
            assert tier.contains(key) is False
            assert tier.get(key, pool.allocate) is None
    assert store.calls == 1 + 2  # one put, then two failures opened the breaker: no more calls
    failed = [metrics.errors.value(tier="remote", kind=k) for k in ("exists_failed", "get_failed")]
    assert failed == [1, 1]
    assert metrics.errors.value(tier="remote", kind="circuit_open") == 38
    assert sum("unavailable" in r.message for r in caplog.records) == 1
    store.down = False
    clock.now += 10.0
    with caplog.at_level(logging.WARNING, logger="kvtier"):
        assert tier.contains(key) is True
    assert sum("recovered" in r.message for r in caplog.records) == 1
    got = tier.get(key, pool.allocate)
    assert got is not None and bytes(got.data) == bytes(obj.data)
    got.unref()
    obj.unref()


def test_corrupt_value_is_a_counted_miss_and_deleted(pool, make_obj, make_keys) -> None:
    store, metrics = FlakyStore(), CacheMetrics()
    tier = make_tier(store, metrics)
    key = make_keys(1)[0]
    obj = make_obj(key)
    tier.put(key, obj)
    name = tier.name_for(key)
    value = bytearray(store.values[name])
    value[-1] ^= 0xFF
    store.values[name] = bytes(value)
    assert tier.get(key, pool.allocate) is None
    assert metrics.errors.value(tier="remote", kind="corrupt") == 1
    assert name not in store.values
    store.values[name] = bytes(value[:200])  # truncated
    assert tier.get(key, pool.allocate) is None
    assert metrics.errors.value(tier="remote", kind="truncated") == 1
    obj.unref()


@pytest.fixture
def engine_with_remote(request):  # type: ignore[no-untyped-def]
    """Factory: a CacheEngine whose slower tier is a RemoteTier over a store (memory in front, no disk)."""

    def make(store: FlakyStore, **overrides: object) -> tuple[CacheEngine, RemoteTier]:
        config = load_config(env={}, overrides={"chunk_size": 4, "max_local_cpu_size": 0.001, **overrides})
        metrics = CacheMetrics()
        pool = MemoryPool(config.local_cpu_bytes)
        tier = RemoteTier("remote", store, metrics, admit_after_hits=config.remote_admit_after_hits)
        storage = TieredStorage(
            pool, MemoryTier(pool, make_policy("LRU"), metrics), [tier], metrics, max_queued_bytes=2**20
        )
        request.addfinalizer(storage.close)  # the engine does not close tiers it was given
        return CacheEngine(config, KVLayout(2, 2, 8), model_name="remote-test", storage=storage), tier

    return make


def random_kv(layout: KVLayout, tokens: int) -> np.ndarray:
    return np.random.default_rng(1).standard_normal(layout.chunk_shape(tokens)).astype(np.float16)


def test_admission_writes_remote_only_after_n_hits(engine_with_remote) -> None:
    """With admit_after_hits=2 a stored chunk reaches the remote store only after its second hit."""
    store = FlakyStore()
    engine, _ = engine_with_remote(store, remote_admit_after_hits=2)
    with engine:
        tokens = list(range(16))
        kv = random_kv(engine.layout, 16)
        engine.store(tokens, kv)
        engine.flush()
        assert store.values == {}
        engine.retrieve(tokens)
        engine.flush()
        assert store.values == {}
        engine.retrieve(tokens)
        engine.flush()
        assert len(store.values) == 4


def test_remote_hit_is_promoted_and_served_bit_exact(engine_with_remote) -> None:
    store = FlakyStore()
    engine, _ = engine_with_remote(store)
    with engine:
        tokens = list(range(16))
        kv = random_kv(engine.layout, 16)
        engine.store(tokens, kv)
        engine.flush()
        engine.storage.memory.clear()
        result = engine.retrieve(tokens)
        assert result.tier_tokens == {"remote": 16}
        assert np.array_equal(result.kv.view(np.uint16), kv.view(np.uint16))
        assert engine.lookup(tokens).tier_tokens == {"memory": 16}


def test_dead_remote_store_makes_retrieve_a_fast_miss(engine_with_remote) -> None:
    store = FlakyStore()
    engine, _ = engine_with_remote(store)
    with engine:
        tokens = list(range(16))
        engine.store(tokens, random_kv(engine.layout, 16))
        engine.flush()
        engine.storage.memory.clear()
        store.down = True
        started = time.perf_counter()
        for _ in range(10):
            assert engine.retrieve(tokens).hit_tokens == 0
        assert time.perf_counter() - started < 1.0


def test_fetch_slower_than_recompute_is_skipped(engine_with_remote) -> None:
    """With a measured remote bandwidth, chunks whose fetch is estimated slower than recomputing their tokens at
    recompute_tokens_per_sec are not used (and counted); with a fast enough store they are."""
    store = FlakyStore()
    engine, tier = engine_with_remote(store, recompute_tokens_per_sec=1000.0)
    with engine:
        tokens = list(range(16))
        engine.store(tokens, random_kv(engine.layout, 16))
        engine.flush()
        engine.storage.memory.clear()
        nbytes = engine.layout.chunk_bytes(16)
        tier.read_bandwidth = nbytes / 1.0  # 16 tokens' KV takes 1 s to fetch; recomputing them takes 16 ms
        assert engine.lookup(tokens).hit_tokens == 0
        assert engine.metrics.fetch_skipped_tokens.value(tier="remote") == 16
        tier.read_bandwidth = nbytes / 0.001  # 1 ms: worth it
        assert engine.lookup(tokens).hit_tokens == 16


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_unmeasured_remote_is_always_tried(engine_with_remote, value: float) -> None:
    """Before the first read there is no bandwidth estimate: the remote tier is used."""
    store = FlakyStore()
    engine, tier = engine_with_remote(store, recompute_tokens_per_sec=1e9 if value else 0.0)
    with engine:
        tokens = list(range(8))
        engine.store(tokens, random_kv(engine.layout, 8))
        engine.flush()
        engine.storage.memory.clear()
        assert tier.read_bandwidth is None
        assert engine.lookup(tokens).hit_tokens == 8
