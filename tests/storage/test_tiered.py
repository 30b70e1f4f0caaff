"""TieredStorage over memory + disk: locate/read across tiers, promotion, bounded background writes, staging mode."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvtier.codecs.chunk_format import CHUNK_HEADER_SIZE
from kvtier.memory.layout import KVLayout
from kvtier.memory.memory_obj import MemoryObj
from kvtier.memory.pool import MemoryPool
from kvtier.metrics import CacheMetrics
from kvtier.storage.disk import DiskTier
from kvtier.storage.eviction import LRUPolicy
from kvtier.storage.memory import MemoryTier
from kvtier.storage.tiered import ReadChunks, TieredStorage
from kvtier.tokens.keys import CacheKey

PAGE = 4096
Content = Callable[[bytes, int], np.ndarray]


@pytest.fixture
def small_pool() -> Iterator[MemoryPool]:
    p = MemoryPool(32 * PAGE)
    yield p
    p.close()


@pytest.fixture
def build(small_pool: MemoryPool, tmp_path: Path, metrics: CacheMetrics) -> Iterator[Callable[..., TieredStorage]]:
    """``build(local_cpu=True, max_queued_bytes=1 MiB, lower=None)``: memory (optional) + disk over one pool."""
    made: list[TieredStorage] = []

    def make(
        local_cpu: bool = True, max_queued_bytes: int = 1 << 20, lower: Sequence[DiskTier] | None = None
    ) -> TieredStorage:
        memory = MemoryTier(small_pool, LRUPolicy(), metrics) if local_cpu else None
        if lower is None:
            lower = [DiskTier(tmp_path / "disk", 64 << 20, LRUPolicy(), metrics)]
        storage = TieredStorage(small_pool, memory, lower, metrics, max_queued_bytes=max_queued_bytes)
        made.append(storage)
        return storage

    yield make
    for storage in made:
        storage.close()


def write(storage: TieredStorage, keys: Sequence[CacheKey], layout: KVLayout, content: Content) -> int:
    """Store a prompt's full chunks the way the engine does: allocate, fill, write, release."""
    objs = []
    for key in keys:
        obj = storage.allocate(layout, 32)
        assert obj is not None
        obj.data[:] = content(key.id, obj.nbytes)
        objs.append(obj)
    try:
        return storage.write(keys, objs)
    finally:
        for obj in objs:
            obj.unref()


def check_and_release(chunks: ReadChunks, keys: Sequence[CacheKey], content: Content) -> None:
    try:
        assert len(chunks.objs) == len(keys)
        for key, obj in zip(keys, chunks.objs, strict=True):
            np.testing.assert_array_equal(obj.data, content(key.id, obj.nbytes))
    finally:
        for obj in chunks.objs:
            obj.unref()


def names(tiers: Sequence[object]) -> list[str]:
    return [t.name for t in tiers]  # type: ignore[attr-defined]


def test_write_then_locate_and_read(build, make_keys, layout, content) -> None:
    """Written chunks are located in memory, read back bit-exact, and reach disk in the background."""
    storage = build()
    keys = make_keys(4)
    assert write(storage, keys, layout, content) == 4
    sources = storage.locate(keys)
    assert names(sources) == ["memory"] * 4
    chunks = storage.read(keys, sources)
    assert chunks.tiers == ["memory"] * 4
    check_and_release(chunks, keys, content)
    assert storage.flush(10)
    disk = storage.lower[0]
    assert disk.contains_many(keys) == [True] * 4
    assert write(storage, keys, layout, content) == 0  # already cached everywhere


def test_prefix_spread_across_tiers_reads_back_and_is_promoted(build, make_keys, layout, content, metrics) -> None:
    """Head in memory, tail only on disk: read returns the whole prefix with the right tier names."""
    storage = build()
    keys = make_keys(6)
    write(storage, keys, layout, content)
    assert storage.flush(10)
    memory = storage.memory
    assert memory is not None
    for key in keys[3:]:
        memory.delete(key)
    sources = storage.locate(keys)
    assert names(sources) == ["memory"] * 3 + ["disk"] * 3
    chunks = storage.read(keys, sources)
    assert chunks.tiers == ["memory"] * 3 + ["disk"] * 3
    check_and_release(chunks, keys, content)
    assert all(memory.contains(k) for k in keys)  # promoted
    assert metrics.promotions.value() == 3
    assert names(storage.locate(keys)) == ["memory"] * 6
    assert storage.memory.usage().pinned_chunks == 0 and storage.lower[0].usage().pinned_chunks == 0


def test_disk_only_chunk_is_promoted_after_a_read(build, make_keys, layout, content) -> None:
    """Reading a chunk that is only on disk puts it back in memory."""
    storage = build()
    (key,) = make_keys(1)
    write(storage, [key], layout, content)
    storage.flush(10)
    storage.memory.delete(key)  # type: ignore[union-attr]
    chunks = storage.read([key], storage.locate([key]))
    assert chunks.tiers == ["disk"]
    check_and_release(chunks, [key], content)
    assert storage.memory.contains(key)  # type: ignore[union-attr]
    chunks = storage.read([key], storage.locate([key]))
    assert chunks.tiers == ["memory"]
    check_and_release(chunks, [key], content)


def test_locate_stops_at_the_first_hole(build, make_keys, layout, content) -> None:
    """Only the prefix before the first chunk missing everywhere counts."""
    storage = build()
    keys = make_keys(5)
    write(storage, keys, layout, content)
    storage.flush(10)
    assert storage.delete(keys[2]) is True
    assert storage.delete(keys[2]) is False
    assert names(storage.locate(keys)) == ["memory"] * 2
    assert storage.locate([]) == []
    assert storage.locate(make_keys(2, start=50)) == []


def test_read_falls_back_when_a_located_chunk_vanishes(build, make_keys, layout, content) -> None:
    """A chunk evicted from memory between locate and read is read from disk instead."""
    storage = build()
    keys = make_keys(3)
    write(storage, keys, layout, content)
    storage.flush(10)
    sources = storage.locate(keys)
    storage.memory.delete(keys[1])  # type: ignore[union-attr]
    chunks = storage.read(keys, sources)
    assert chunks.tiers == ["memory", "disk", "memory"]
    check_and_release(chunks, keys, content)


def test_read_stops_at_a_corrupt_chunk_without_leaking(build, make_keys, layout, content, metrics, small_pool) -> None:
    """A corrupt disk chunk ends the prefix; the chunks after it that were already read are released."""
    storage = build()
    keys = make_keys(4)
    write(storage, keys, layout, content)
    storage.flush(10)
    disk = storage.lower[0]
    storage.memory.clear()  # type: ignore[union-attr]
    path = disk.path_for(keys[1].id)  # type: ignore[attr-defined]
    raw = bytearray(path.read_bytes())
    raw[CHUNK_HEADER_SIZE + 7] ^= 1
    path.write_bytes(bytes(raw))
    chunks = storage.read(keys, storage.locate(keys))
    assert chunks.tiers == ["disk"]
    check_and_release(chunks, keys[:1], content)
    assert metrics.errors.value(tier="disk", kind="corrupt") == 1
    assert small_pool.live_objects == storage.memory.usage().chunks  # type: ignore[union-attr]
    assert disk.usage().pinned_chunks == 0
    storage.clear()
    assert small_pool.live_objects == 0


def test_background_writer_is_bounded(build, make_keys, layout, content, metrics, small_pool) -> None:
    """Past max_queued_bytes, chunks are dropped (counted as write_dropped), never queued; nothing leaks."""
    storage = build(max_queued_bytes=2 * PAGE)
    keys = make_keys(10)
    assert write(storage, keys, layout, content) == 10
    assert metrics.errors.value(tier="disk", kind="write_dropped") == 8
    assert storage.flush(10)
    disk = storage.lower[0]
    assert disk.contains_many(keys) == [True] * 2 + [False] * 8  # the head was queued first
    assert storage.writers["disk"].queued_bytes == 0
    assert metrics.queued_write_bytes.values() == {("disk",): 0}
    assert small_pool.live_objects == 10  # just the memory tier's chunks
    storage.clear()
    assert small_pool.live_objects == 0


def test_blocked_writer_holds_bounded_memory_and_flush_times_out(
    build, make_keys, layout, content, metrics, small_pool, monkeypatch
) -> None:
    """While the slower tier is stuck, only max_queued_bytes of chunks stay alive; flush waits for it."""
    storage = build(local_cpu=False, max_queued_bytes=3 * PAGE)
    disk = storage.lower[0]
    gate, entered = threading.Event(), threading.Event()
    put = disk.put

    def stuck_put(key: CacheKey, obj: MemoryObj) -> bool:
        entered.set()
        gate.wait(10)
        return put(key, obj)

    monkeypatch.setattr(disk, "put", stuck_put)
    keys = make_keys(12)
    write(storage, keys[:1], layout, content)
    assert entered.wait(5)  # the writer holds the first chunk inside put
    for i in range(1, 12, 3):
        write(storage, keys[i : i + 3], layout, content)
        assert small_pool.live_objects <= 3
        assert storage.writers["disk"].queued_bytes <= 3 * PAGE
    assert metrics.errors.value(tier="disk", kind="write_dropped") == 9
    assert storage.flush(timeout=0.2) is False
    gate.set()
    assert storage.flush(timeout=10) is True
    assert disk.usage().chunks == 3
    assert small_pool.live_objects == 0


def test_failing_tier_does_not_stop_the_writer(build, make_keys, layout, content, metrics, monkeypatch) -> None:
    """A slower tier that raises is counted (write_failed); the writer goes on and releases every chunk."""
    storage = build(local_cpu=False)
    disk = storage.lower[0]
    put = disk.put
    bad = make_keys(1, start=99)[0]

    def flaky_put(key: CacheKey, obj: MemoryObj) -> bool:
        if key == bad:
            raise RuntimeError("backend exploded")
        return put(key, obj)

    monkeypatch.setattr(disk, "put", flaky_put)
    keys = make_keys(3)
    write(storage, [keys[0], bad, *keys[1:]], layout, content)
    assert storage.flush(10)
    assert metrics.errors.value(tier="disk", kind="write_failed") == 1
    assert disk.contains_many(keys) == [True] * 3
    assert storage.pool.live_objects == 0


def test_flush_waits_for_every_write(build, make_keys, layout, content) -> None:
    """After flush returns True, every written chunk is on disk."""
    storage = build()
    keys = make_keys(24)
    for i in range(0, 24, 4):
        write(storage, keys[i : i + 4], layout, content)
    assert storage.flush(timeout=30)
    assert storage.lower[0].contains_many(keys) == [True] * 24


def test_memory_off_mode_only_stages_in_the_pool(build, make_keys, layout, content, small_pool, metrics) -> None:
    """local_cpu=false: the pool only stages chunks to and from disk; nothing stays in it."""
    storage = build(local_cpu=False)
    assert storage.memory is None
    assert names(storage.tiers) == ["disk"]
    keys = make_keys(5)
    assert write(storage, keys, layout, content) == 0  # nothing new in memory: there is no memory tier
    assert storage.flush(10)
    assert (small_pool.live_objects, small_pool.used_bytes) == (0, 0)
    sources = storage.locate(keys)
    assert names(sources) == ["disk"] * 5
    chunks = storage.read(keys, sources)
    assert chunks.tiers == ["disk"] * 5
    check_and_release(chunks, keys, content)
    assert (small_pool.live_objects, small_pool.used_bytes) == (0, 0)
    assert metrics.promotions.value() == 0
    assert names(storage.locate(keys)) == ["disk"] * 5


class RemoteLike(DiskTier):
    """A disk tier pretending to be remote: ``contains`` is not local, so locate must batch."""

    name = "remote"
    is_local = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[int] = []

    def contains_many(self, keys: Sequence[CacheKey]) -> list[bool]:
        self.batches.append(len(keys))
        return super().contains_many(keys)


def test_remote_tier_is_asked_once_per_locate(build, make_keys, layout, content, tmp_path: Path, metrics) -> None:
    """locate asks a non-local tier once, in one batch, about only the keys the local tiers lack."""
    disk = DiskTier(tmp_path / "disk", 64 << 20, LRUPolicy(), metrics)
    remote = RemoteLike(tmp_path / "remote", 64 << 20, LRUPolicy(), metrics)
    storage = build(lower=[disk, remote])
    keys = make_keys(6)
    write(storage, keys, layout, content)
    assert storage.flush(10)
    for key in keys[2:]:
        storage.memory.delete(key)  # type: ignore[union-attr]
    for key in keys[4:]:
        disk.delete(key)
    sources = storage.locate(keys)
    assert names(sources) == ["memory"] * 2 + ["disk"] * 2 + ["remote"] * 2
    assert remote.batches == [2]
    chunks = storage.read(keys, sources)
    assert chunks.tiers == names(sources)
    check_and_release(chunks, keys, content)
    assert storage.flush(10)
    assert disk.contains_many(keys) == [True] * 6  # a remote hit is also kept on local disk


def test_gauges_and_exposition(build, make_keys, layout, content, metrics) -> None:
    """The tier gauges follow usage, and the rendered metrics parse as Prometheus text."""
    storage = build()
    keys = make_keys(3)
    write(storage, keys, layout, content)
    storage.flush(10)
    assert metrics.chunks.values() == {("memory",): 3, ("disk",): 3}
    assert metrics.capacity_bytes.values()[("memory",)] == 32 * PAGE
    families = {f.name: f for f in text_string_to_metric_families(metrics.render())}
    chunks = {s.labels["tier"]: s.value for s in families["kvtier_tier_chunks"].samples}
    assert chunks == {"memory": 3, "disk": 3}


def test_close_releases_every_reference(make_keys, layout, content, tmp_path: Path) -> None:
    """close finishes background writes, empties memory and returns every pool page."""
    small_pool = MemoryPool(32 * PAGE)
    metrics = CacheMetrics()
    disk = DiskTier(tmp_path / "disk", 64 << 20, LRUPolicy(), metrics)
    storage = TieredStorage(
        small_pool, MemoryTier(small_pool, LRUPolicy(), metrics), [disk], metrics, max_queued_bytes=1 << 20
    )
    keys = make_keys(8)
    write(storage, keys, layout, content)
    storage.close()
    assert (small_pool.live_objects, small_pool.used_bytes) == (0, 0)
    reopened = DiskTier(tmp_path / "disk", 64 << 20, LRUPolicy())
    assert reopened.usage().chunks == 8
    assert not list((tmp_path / "disk").rglob("*.tmp.*"))
    assert os.path.isdir(tmp_path / "disk")
