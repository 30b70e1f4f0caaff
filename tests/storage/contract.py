"""The contract every storage tier must honour, written against the :class:`StorageTier` interface only.

A tier's test module subclasses :class:`StorageTierContract` and provides a ``tier`` fixture: a fresh, empty
tier that is closed after the test. ``pool`` (from the shared conftest) is where test chunks are allocated;
``allocate`` is what ``get`` is handed and defaults to ``pool.allocate``. Memory, disk and every later tier
(Redis, S3, the kvtier server) run the same tests, so they are interchangeable behind ``TieredStorage``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import numpy as np
import pytest

from kvtier.memory.layout import KVLayout
from kvtier.memory.memory_obj import MemoryObj
from kvtier.memory.pool import MemoryPool
from kvtier.storage.base import Allocate, StorageTier
from kvtier.tokens.keys import CacheKey, Namespace

Content = Callable[[bytes, int], np.ndarray]


def store(tier: StorageTier, make_obj: Callable[..., MemoryObj], keys: Sequence[CacheKey], num_tokens: int) -> None:
    """Put a filled chunk under each key and drop the caller's references."""
    for key in keys:
        obj = make_obj(key, num_tokens)
        try:
            assert tier.put(key, obj) is True
        finally:
            obj.unref()


def read(tier: StorageTier, key: CacheKey, allocate: Allocate) -> tuple[int, bytes] | None:
    """``(num_tokens, bytes)`` of the chunk under ``key``, or None; releases the object it gets."""
    obj = tier.get(key, allocate)
    if obj is None:
        return None
    try:
        return obj.num_tokens, obj.data.tobytes()
    finally:
        obj.unref()


class StorageTierContract:
    """Tests every :class:`StorageTier` must pass. Subclasses provide a ``tier`` fixture.

    ``exact_usage``: whether ``usage()`` counts chunks and bytes. A shared remote store does not (counting
    would scan the whole store); its subclass sets it to False and skips only that check.
    ``atomic_put``: whether of writers racing to store one chunk exactly one is told it stored it. A store
    whose puts of an existing name all answer success (Mooncake) sets it to False: then at least one is.
    """

    exact_usage = True
    atomic_put = True

    def assert_chunks(self, tier: StorageTier, expected: int) -> None:
        if self.exact_usage:
            assert tier.usage().chunks == expected

    @pytest.fixture
    def allocate(self, pool: MemoryPool) -> Allocate:
        return pool.allocate

    def test_put_get_round_trip_is_bit_exact(
        self, tier: StorageTier, make_obj, make_keys, allocate: Allocate, layout: KVLayout, content: Content
    ) -> None:
        """A stored chunk comes back with the same layout, token count and bytes."""
        (key,) = make_keys(1)
        obj = make_obj(key)
        assert tier.put(key, obj) is True
        obj.unref()
        got = tier.get(key, allocate)
        assert got is not None
        try:
            assert got.layout == layout
            assert got.num_tokens == obj.num_tokens
            assert got.shape == layout.chunk_shape(obj.num_tokens)
            np.testing.assert_array_equal(got.data, content(key.id, got.nbytes))
        finally:
            got.unref()

    def test_get_missing_returns_none(self, tier: StorageTier, make_keys, allocate, pool: MemoryPool) -> None:
        """A miss is None (never an exception) and leaves no memory allocated."""
        (key,) = make_keys(1)
        assert tier.contains(key) is False
        assert tier.get(key, allocate) is None
        assert pool.live_objects == 0

    def test_second_put_of_a_key_is_deduplicated(
        self, tier: StorageTier, make_obj, make_keys, allocate, content: Content
    ) -> None:
        """Putting a present key returns False and keeps the first chunk."""
        first, other = make_keys(2)
        obj = make_obj(first)
        assert tier.put(first, obj) is True
        assert tier.put(first, obj) is False
        impostor = make_obj(other)  # same key, different bytes
        assert tier.put(first, impostor) is False
        obj.unref()
        impostor.unref()
        self.assert_chunks(tier, 1)
        got = read(tier, first, allocate)
        assert got is not None
        assert got[1] == content(first.id, len(got[1])).tobytes()

    def test_put_many_counts_only_new_chunks(self, tier: StorageTier, make_obj, make_keys, allocate) -> None:
        """put_many stores every chunk and returns how many were new."""
        keys = make_keys(6)
        objs = [make_obj(k) for k in keys]
        try:
            assert tier.put_many(keys[:4], objs[:4]) == 4
            assert tier.put_many(keys, objs) == 2
            assert tier.put_many(keys, objs) == 0
        finally:
            for obj in objs:
                obj.unref()
        assert all(read(tier, k, allocate) is not None for k in keys)

    def test_contains_and_contains_many(self, tier: StorageTier, make_obj, make_keys, chunk_tokens: int) -> None:
        """contains_many answers per key, in the order asked."""
        keys = make_keys(6)
        store(tier, make_obj, keys[::2], chunk_tokens)
        assert [tier.contains(k) for k in keys] == [True, False] * 3
        assert tier.contains_many(keys) == [True, False] * 3
        assert tier.contains_many(list(reversed(keys))) == [False, True] * 3
        assert tier.contains_many([]) == []

    def test_delete(self, tier: StorageTier, make_obj, make_keys, allocate, chunk_tokens: int) -> None:
        """delete removes exactly one key and reports whether it was there."""
        keys = make_keys(3)
        store(tier, make_obj, keys, chunk_tokens)
        assert tier.delete(keys[1]) is True
        assert tier.delete(keys[1]) is False
        assert not tier.contains(keys[1])
        assert tier.get(keys[1], allocate) is None
        assert tier.contains(keys[0]) and tier.contains(keys[2])
        self.assert_chunks(tier, 2)

    def test_clear(self, tier: StorageTier, make_obj, make_keys, allocate, pool: MemoryPool, chunk_tokens: int) -> None:
        """clear removes everything, returns the count, and frees what the tier held."""
        assert tier.clear() == 0
        keys = make_keys(5)
        store(tier, make_obj, keys, chunk_tokens)
        cleared = tier.clear()
        # A remote store may count a chunk once per copy it kept (e.g. a server's memory and disk).
        assert cleared == 5 if self.exact_usage else cleared >= 5
        assert tier.contains_many(keys) == [False] * 5
        assert all(tier.get(k, allocate) is None for k in keys)
        if self.exact_usage:
            usage = tier.usage()
            assert (usage.chunks, usage.used_bytes) == (0, 0)
        assert pool.live_objects == 0
        store(tier, make_obj, keys[:1], chunk_tokens)  # still usable afterwards
        assert tier.contains(keys[0])

    def test_usage_counts(self, tier: StorageTier, make_obj, make_keys, layout: KVLayout, chunk_tokens: int) -> None:
        """usage() follows puts and deletes: chunk count exact, bytes at least the payload, within capacity."""
        if not self.exact_usage:
            pytest.skip("this tier does not count its contents")
        empty = tier.usage()
        assert (empty.chunks, empty.pinned_chunks) == (0, 0)
        keys = make_keys(5)
        store(tier, make_obj, keys, chunk_tokens)
        full = tier.usage()
        assert full.chunks == 5
        assert full.used_bytes >= 5 * layout.chunk_bytes(chunk_tokens)
        assert full.used_bytes <= full.capacity_bytes
        assert tier.delete(keys[0])
        after = tier.usage()
        assert after.chunks == 4
        assert after.used_bytes < full.used_bytes

    def test_get_hands_the_caller_one_reference(
        self, tier: StorageTier, make_obj, make_keys, allocate, pool: MemoryPool, content: Content
    ) -> None:
        """The caller owns what get returns: it outlives a delete, and unref returns the pool to its baseline."""
        (key,) = make_keys(1)
        store(tier, make_obj, [key], 8)
        got = tier.get(key, allocate)
        assert got is not None and got.refcount >= 1
        assert tier.delete(key)
        np.testing.assert_array_equal(got.data, content(key.id, got.nbytes))  # still ours after the delete
        got.unref()
        assert pool.live_objects == 0

    def test_repeated_gets_do_not_leak(
        self, tier: StorageTier, make_obj, make_keys, allocate, pool: MemoryPool, chunk_tokens: int
    ) -> None:
        """Each get is balanced by one unref; several readers of one chunk may coexist."""
        (key,) = make_keys(1)
        store(tier, make_obj, [key], chunk_tokens)
        baseline = pool.live_objects
        readers = [tier.get(key, allocate) for _ in range(5)]
        assert all(r is not None for r in readers)
        for r in readers:
            r.unref()  # type: ignore[union-attr]
        assert pool.live_objects == baseline

    def test_put_does_not_consume_the_callers_reference(
        self, tier: StorageTier, make_obj, make_keys, allocate, pool: MemoryPool, content: Content
    ) -> None:
        """After put the caller's object is still valid and still the caller's to release."""
        (key,) = make_keys(1)
        obj = make_obj(key)
        refs = obj.refcount
        assert tier.put(key, obj)
        assert obj.refcount >= refs
        np.testing.assert_array_equal(obj.data, content(key.id, obj.nbytes))
        obj.unref()
        assert read(tier, key, allocate) is not None
        tier.clear()
        assert pool.live_objects == 0

    def test_many_keys(self, tier: StorageTier, make_obj, make_keys, allocate, content: Content) -> None:
        """Many chunks of varied sizes each read back as their own bytes, in any order."""
        keys = make_keys(64)
        sizes = {k: 1 + i % 32 for i, k in enumerate(keys)}
        for key in keys:
            obj = make_obj(key, sizes[key])
            assert tier.put(key, obj)
            obj.unref()
        self.assert_chunks(tier, 64)
        for key in reversed(keys):
            got = read(tier, key, allocate)
            assert got is not None
            assert got[0] == sizes[key]
            assert got[1] == content(key.id, len(got[1])).tobytes()

    @pytest.mark.parametrize("num_tokens", [1, 7, 31])
    def test_partial_chunk_round_trip(
        self, tier: StorageTier, make_obj, make_keys, allocate, layout: KVLayout, content: Content, num_tokens: int
    ) -> None:
        """A tail chunk with fewer tokens keeps its token count, shape and bytes."""
        (key,) = make_keys(1)
        store(tier, make_obj, [key], num_tokens)
        got = tier.get(key, allocate)
        assert got is not None
        try:
            assert got.num_tokens == num_tokens
            assert got.nbytes == layout.chunk_bytes(num_tokens)
            assert got.shape == layout.chunk_shape(num_tokens)
            np.testing.assert_array_equal(got.data, content(key.id, got.nbytes))
        finally:
            got.unref()

    def test_namespaces_never_collide(
        self, tier: StorageTier, make_obj, make_keys, allocate, namespace: Namespace, content: Content
    ) -> None:
        """The same chunk hash under another salt, model or rank is another entry with its own bytes."""
        others = [
            Namespace(namespace.model_name, namespace.layout, cache_salt="tenant-a"),
            Namespace(namespace.model_name, namespace.layout, cache_salt="tenant-b"),
            Namespace("other-model", namespace.layout),
            Namespace(namespace.model_name, namespace.layout, world_size=2, rank=1),
        ]
        (key,) = make_keys(1)
        store(tier, make_obj, [key], 16)
        twins = [make_keys(1, ns=ns)[0] for ns in others]
        assert all(t.chunk_hash == key.chunk_hash and t != key for t in twins)
        assert tier.contains_many(twins) == [False] * len(twins)
        assert all(tier.get(t, allocate) is None for t in twins)
        store(tier, make_obj, twins, 16)
        self.assert_chunks(tier, 1 + len(twins))
        for k in [key, *twins]:
            got = read(tier, k, allocate)
            assert got is not None
            assert got[1] == content(k.id, len(got[1])).tobytes()
        assert tier.delete(twins[0])
        assert tier.contains(key) and tier.contains(twins[1])

    def test_pin_and_unpin_balance(self, tier: StorageTier, make_obj, make_keys, chunk_tokens: int) -> None:
        """pin returns only present keys (if the tier pins at all); unpinning them leaves no pins behind."""
        keys = make_keys(4)
        store(tier, make_obj, keys[:2], chunk_tokens)
        pinned = tier.pin(keys)
        assert set(pinned) <= set(keys[:2])
        assert tier.usage().pinned_chunks == len(set(pinned))
        tier.unpin(pinned)
        assert tier.usage().pinned_chunks == 0
        tier.touch_prefix(keys)  # present and missing keys alike; must not raise

    def test_concurrent_puts_of_the_same_keys(
        self, tier: StorageTier, make_obj, make_keys, allocate, pool: MemoryPool, content: Content
    ) -> None:
        """Threads racing to store the same chunks: each key is stored exactly once and accounted once."""
        keys = make_keys(8)
        objs = [[make_obj(k, 16) for k in keys] for _ in range(4)]
        results: list[list[bool]] = [[] for _ in objs]
        barrier = threading.Barrier(len(objs))

        def worker(i: int) -> None:
            barrier.wait()
            results[i] = [tier.put(k, o) for k, o in zip(keys, objs[i], strict=True)]

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(objs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        for row in objs:
            for obj in row:
                obj.unref()
        stored = [sum(r[j] for r in results) for j in range(len(keys))]
        assert stored == [1] * len(keys) if self.atomic_put else all(n >= 1 for n in stored)
        self.assert_chunks(tier, len(keys))
        for key in keys:
            got = read(tier, key, allocate)
            assert got is not None and got[1] == content(key.id, len(got[1])).tobytes()
        tier.clear()
        assert tier.usage().used_bytes == 0
        assert pool.live_objects == 0
