"""MemoryTier: the storage contract, the byte budget, pins, readers of evicted chunks and eviction order."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from contract import StorageTierContract
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from kvtier.memory.layout import KVLayout
from kvtier.memory.memory_obj import MemoryObj
from kvtier.memory.pool import MemoryPool
from kvtier.metrics import CacheMetrics
from kvtier.storage.eviction import EVICTION_POLICIES, make_policy
from kvtier.storage.memory import MemoryTier
from kvtier.tokens.keys import CacheKey, Namespace

POLICIES = sorted(EVICTION_POLICIES)
PAGE = 4096  # allocator alignment; one full test chunk (32 tokens x 128 bytes)
CAPACITY_CHUNKS = 8

Content = Callable[[bytes, int], np.ndarray]


@pytest.fixture(params=POLICIES)
def policy_name(request: pytest.FixtureRequest) -> str:
    return request.param  # type: ignore[no-any-return]


class TestMemoryTierContract(StorageTierContract):
    @pytest.fixture
    def tier(self, pool: MemoryPool, policy_name: str, metrics: CacheMetrics) -> Iterator[MemoryTier]:
        t = MemoryTier(pool, make_policy(policy_name), metrics)
        yield t
        t.close()


# -- a small, full pool -----------------------------------------------------------------------------------------


@pytest.fixture
def small_pool(layout: KVLayout, chunk_tokens: int) -> Iterator[MemoryPool]:
    assert layout.chunk_bytes(chunk_tokens) == PAGE
    p = MemoryPool(CAPACITY_CHUNKS * PAGE)
    yield p
    p.close()


@pytest.fixture
def small_tier(small_pool: MemoryPool, policy_name: str, metrics: CacheMetrics) -> Iterator[MemoryTier]:
    t = MemoryTier(small_pool, make_policy(policy_name), metrics)
    yield t
    t.close()


def fill(tier: MemoryTier, key: CacheKey, layout: KVLayout, content: Content, num_tokens: int = 32) -> bool:
    """Allocate through the tier (evicting as needed), fill for ``key``, store, release; False if no memory."""
    obj = tier.allocate(layout, num_tokens)
    if obj is None:
        return False
    obj.data[:] = content(key.id, obj.nbytes)
    try:
        return tier.put(key, obj)
    finally:
        obj.unref()


def assert_intact(tier: MemoryTier, keys: list[CacheKey], content: Content) -> None:
    for key in keys:
        got = tier.get(key)
        assert got is not None, f"{key} missing"
        try:
            np.testing.assert_array_equal(got.data, content(key.id, got.nbytes))
        finally:
            got.unref()


def test_allocate_evicts_until_it_fits(small_tier: MemoryTier, make_keys, layout, content, metrics) -> None:
    """Storing far more than the budget keeps pool.used_bytes within capacity and evicts the excess."""
    pool = small_tier.pool
    keys = make_keys(40)
    for key in keys:
        assert fill(small_tier, key, layout, content)
        assert pool.used_bytes <= pool.capacity_bytes
    assert small_tier.usage().chunks == CAPACITY_CHUNKS
    assert metrics.evictions.value(tier="memory") == len(keys) - CAPACITY_CHUNKS
    assert pool.live_objects == CAPACITY_CHUNKS
    assert_intact(small_tier, small_tier.keys(), content)


def test_budget_holds_with_mixed_chunk_sizes(small_tier: MemoryTier, make_keys, layout, content) -> None:
    """Chunks of 1 to 96 tokens (1 to 3 pages) never push the pool past capacity and never fail to fit."""
    pool = small_tier.pool
    rng = np.random.default_rng(7)
    for key in make_keys(120):
        assert fill(small_tier, key, layout, content, int(rng.integers(1, 97)))
        assert pool.used_bytes <= pool.capacity_bytes
        pool.allocator.check_integrity()
    assert_intact(small_tier, small_tier.keys(), content)


def test_allocate_larger_than_the_pool_evicts_nothing(small_tier: MemoryTier, make_keys, layout, content) -> None:
    """A chunk that can never fit is refused up front, without emptying the cache for nothing."""
    keys = make_keys(3)
    for key in keys:
        fill(small_tier, key, layout, content)
    assert small_tier.allocate(layout, 32 * (CAPACITY_CHUNKS + 1)) is None
    assert small_tier.usage().chunks == 3


def test_pinned_keys_are_never_evicted(small_tier: MemoryTier, make_keys, layout, content) -> None:
    """Pinned chunks survive any amount of eviction pressure, then become evictable again when unpinned."""
    keys = make_keys(CAPACITY_CHUNKS)
    for key in keys:
        fill(small_tier, key, layout, content)
    protected = [keys[0], keys[3], keys[7]]
    assert small_tier.pin(protected) == protected
    for key in make_keys(50, start=100):
        assert fill(small_tier, key, layout, content)
        assert all(small_tier.contains(k) for k in protected)
    assert small_tier.usage().pinned_chunks == 3
    assert_intact(small_tier, protected, content)
    small_tier.unpin(protected)
    assert small_tier.usage().pinned_chunks == 0
    held = [small_tier.allocate(layout, 32) for _ in range(CAPACITY_CHUNKS)]  # needs every page
    assert all(obj is not None for obj in held)
    assert small_tier.usage().chunks == 0
    for obj in held:
        obj.unref()  # type: ignore[union-attr]


def test_allocate_returns_none_when_everything_is_pinned(
    small_tier: MemoryTier, make_keys, layout, content, metrics
) -> None:
    """With every chunk pinned and the pool full, allocate fails instead of evicting a pinned chunk."""
    keys = make_keys(CAPACITY_CHUNKS)
    for key in keys:
        fill(small_tier, key, layout, content)
    small_tier.pin(keys)
    assert small_tier.allocate(layout, 1) is None
    assert small_tier.usage().chunks == CAPACITY_CHUNKS
    assert metrics.evictions.value(tier="memory") == 0
    small_tier.unpin(keys[5:6])
    obj = small_tier.allocate(layout, 32)
    assert obj is not None
    obj.unref()
    assert not small_tier.contains(keys[5])
    assert all(small_tier.contains(k) for k in keys if k != keys[5])
    small_tier.unpin([k for k in keys if k != keys[5]])
    assert small_tier.usage().pinned_chunks == 0


def test_nested_pins_need_as_many_unpins(small_tier: MemoryTier, make_keys, layout, content) -> None:
    """Two pins of one key (two leases) keep it protected until both are released; extra unpins raise."""
    keys = make_keys(2)
    fill(small_tier, keys[0], layout, content)
    assert small_tier.pin(keys) == [keys[0]]  # the missing key is not pinned
    assert small_tier.pin(keys[:1]) == [keys[0]]
    small_tier.unpin(keys[:1])
    assert small_tier.usage().pinned_chunks == 1
    small_tier.unpin(keys[:1])
    assert small_tier.usage().pinned_chunks == 0
    with pytest.raises(RuntimeError):
        small_tier.unpin(keys[:1])


@pytest.mark.parametrize("policy_name", ["FIFO", "LRU"])
def test_a_chunk_held_by_a_reader_is_not_evicted(small_tier: MemoryTier, make_keys, layout, content) -> None:
    """Evicting a chunk a reader still holds would free no memory: it stays cached and intact while the others
    make room, and becomes evictable once released."""
    pool = small_tier.pool
    first, *rest = make_keys(30)
    fill(small_tier, first, layout, content)
    reader = small_tier.get(first)
    assert reader is not None
    for key in rest:
        assert fill(small_tier, key, layout, content)
        assert pool.used_bytes <= pool.capacity_bytes
    assert small_tier.contains(first)
    np.testing.assert_array_equal(reader.data, content(first.id, reader.nbytes))
    assert small_tier.usage().chunks == CAPACITY_CHUNKS
    reader.unref()
    for key in make_keys(CAPACITY_CHUNKS, start=100):
        assert fill(small_tier, key, layout, content)
    assert not small_tier.contains(first)
    assert pool.live_objects == CAPACITY_CHUNKS


def test_put_many_evicts_the_tail_of_a_prefix_first(small_tier: MemoryTier, make_keys, layout, content) -> None:
    """For every policy, a stored prompt loses its last chunk first: what remains is always a head prefix."""
    keys = make_keys(CAPACITY_CHUNKS)
    objs = []
    for key in keys:
        obj = small_tier.allocate(layout, 32)
        assert obj is not None
        obj.data[:] = content(key.id, obj.nbytes)
        objs.append(obj)
    assert small_tier.put_many(keys, objs) == len(keys)
    for obj in objs:
        obj.unref()
    held = []
    for n in range(len(keys) - 1, 0, -1):
        obj = small_tier.allocate(layout, 32)  # evicts exactly one chunk
        assert obj is not None
        held.append(obj)
        assert set(small_tier.keys()) == set(keys[:n])
    for obj in held:
        obj.unref()


@pytest.mark.parametrize(("policy_name", "first_evicted"), [("LRU", "B"), ("LFU", "B"), ("S3FIFO", "B"), ("FIFO", "A")])
def test_touch_prefix_keeps_a_reused_prompt(
    small_tier: MemoryTier, make_keys, layout, content, first_evicted: str
) -> None:
    """After a hit on prompt A, prompt B goes first (tail first) - except under FIFO, which ignores hits."""
    prompts = {"A": make_keys(4), "B": make_keys(4, start=10)}
    for keys in prompts.values():
        objs = [small_tier.allocate(layout, 32) for _ in keys]
        for key, obj in zip(keys, objs, strict=True):
            assert obj is not None
            obj.data[:] = content(key.id, obj.nbytes)
        small_tier.put_many(keys, objs)  # type: ignore[arg-type]
        for obj in objs:
            obj.unref()  # type: ignore[union-attr]
    small_tier.touch_prefix(prompts["A"])
    victims, survivors = prompts[first_evicted], prompts["B" if first_evicted == "A" else "A"]
    held = []
    for n in range(3, -1, -1):
        obj = small_tier.allocate(layout, 32)
        assert obj is not None
        held.append(obj)
        assert [small_tier.contains(k) for k in victims] == [True] * n + [False] * (4 - n)
        assert all(small_tier.contains(k) for k in survivors)
    for obj in held:
        obj.unref()


def test_clear_returns_every_page(small_tier: MemoryTier, make_keys, layout, content) -> None:
    """clear drops every chunk and its memory; the tier keeps working afterwards."""
    keys = make_keys(CAPACITY_CHUNKS)
    for key in keys:
        fill(small_tier, key, layout, content)
    assert small_tier.clear() == CAPACITY_CHUNKS
    assert (small_tier.pool.used_bytes, small_tier.pool.live_objects) == (0, 0)
    assert fill(small_tier, keys[0], layout, content)
    assert_intact(small_tier, keys[:1], content)


def test_concurrent_use_keeps_the_budget(small_tier: MemoryTier, make_keys, layout, content) -> None:
    """Threads storing, reading and pinning at once: no error, budget kept, nothing leaked."""
    pool = small_tier.pool
    keys = make_keys(24)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for _ in range(300):
                key = keys[int(rng.integers(len(keys)))]
                action = rng.integers(4)
                if action == 0:
                    fill(small_tier, key, layout, content, int(rng.integers(1, 33)))
                elif action == 1:
                    got = small_tier.get(key)
                    if got is not None:
                        assert np.array_equal(got.data, content(key.id, got.nbytes))
                        got.unref()
                elif action == 2:
                    small_tier.unpin(small_tier.pin([key]))
                else:
                    small_tier.delete(key)
                assert pool.used_bytes <= pool.capacity_bytes
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert small_tier.usage().pinned_chunks == 0
    small_tier.clear()
    assert pool.live_objects == 0
    pool.allocator.check_integrity()


# -- random pin / read / store sequences ------------------------------------------------------------------------

_LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16")
_NS = Namespace("test-model", _LAYOUT.descriptor())
_KEYS = [_NS.key(hashlib.blake2b(bytes([i]), digest_size=32).digest()) for i in range(10)]


def _pattern(key: CacheKey, nbytes: int) -> np.ndarray:
    return np.resize(np.frombuffer(key.id, np.uint8), nbytes)


class MemoryTierMachine(RuleBasedStateMachine):
    """Random stores, reads, pins, unpins and deletes on a 6-page pool; checks budget, pins and references."""

    policy_name = "LRU"

    def __init__(self) -> None:
        super().__init__()
        self.pool = MemoryPool(6 * PAGE)
        self.tier = MemoryTier(self.pool, make_policy(self.policy_name))
        self.stored: dict[CacheKey, MemoryObj] = {}  # what the tier should hold, and the object it holds
        self.readers: list[tuple[CacheKey, MemoryObj]] = []
        self.pins: list[list[CacheKey]] = []

    def pinned(self) -> set[CacheKey]:
        return {k for pins in self.pins for k in pins}

    @rule(i=st.integers(0, len(_KEYS) - 1), tokens=st.sampled_from([1, 32, 64]))
    def store(self, i: int, tokens: int) -> None:
        key = _KEYS[i]
        obj = self.tier.allocate(_LAYOUT, tokens)
        evicted = set(self.stored) - set(self.tier.keys())
        assert not evicted & self.pinned(), "a pinned chunk was evicted"
        for gone in evicted:
            del self.stored[gone]
        if obj is None:
            held = {k for k, obj in self.readers if self.stored.get(k) is obj}  # evicting these frees nothing
            assert set(self.tier.keys()) <= self.pinned() | held, "allocate failed with evictable chunks left"
            return
        obj.data[:] = _pattern(key, obj.nbytes)
        assert self.tier.put(key, obj) == (key not in self.stored)
        self.stored.setdefault(key, obj)
        obj.unref()

    @rule(i=st.integers(0, len(_KEYS) - 1))
    def read(self, i: int) -> None:
        key = _KEYS[i]
        got = self.tier.get(key)
        assert (got is not None) == (key in self.stored)
        if got is None:
            return
        assert got is self.stored[key]
        if len(self.readers) < 3:
            self.readers.append((key, got))
        else:
            got.unref()

    @rule(data=st.data())
    def release_reader(self, data: st.DataObject) -> None:
        if self.readers:
            _, obj = self.readers.pop(data.draw(st.integers(0, len(self.readers) - 1)))
            obj.unref()

    @rule(idx=st.sets(st.integers(0, len(_KEYS) - 1), max_size=4))
    def pin(self, idx: set[int]) -> None:
        keys = [_KEYS[i] for i in sorted(idx)]
        pinned = self.tier.pin(keys)
        assert pinned == [k for k in keys if k in self.stored]
        self.pins.append(pinned)

    @rule(data=st.data())
    def unpin(self, data: st.DataObject) -> None:
        if self.pins:
            self.tier.unpin(self.pins.pop(data.draw(st.integers(0, len(self.pins) - 1))))

    @rule(i=st.integers(0, len(_KEYS) - 1))
    def delete(self, i: int) -> None:
        key = _KEYS[i]
        assert self.tier.delete(key) == (key in self.stored)
        self.stored.pop(key, None)

    @invariant()
    def consistent(self) -> None:
        assert set(self.tier.keys()) == set(self.stored)
        assert self.pool.used_bytes <= self.pool.capacity_bytes
        usage = self.tier.usage()
        assert usage.chunks == len(self.stored)
        assert usage.pinned_chunks == len(self.pinned())
        live = {id(o) for o in self.stored.values()} | {id(o) for _, o in self.readers}
        assert self.pool.live_objects == len(live)
        for key, obj in self.readers:
            assert np.array_equal(obj.data, _pattern(key, obj.nbytes)), "a reader's bytes changed"

    def teardown(self) -> None:
        for _, obj in self.readers:
            obj.unref()
        for pins in self.pins:
            self.tier.unpin(pins)
        assert self.tier.usage().pinned_chunks == 0
        self.tier.clear()
        assert (self.pool.live_objects, self.pool.used_bytes) == (0, 0)
        self.pool.allocator.check_integrity()
        self.pool.close()


@pytest.mark.parametrize("policy", POLICIES)
def test_random_pin_read_store_sequences(policy: str) -> None:
    """Under every policy: budget kept, pinned chunks kept, readers' bytes stable, all counts back to zero."""
    machine = type(f"MemoryTierMachine{policy}", (MemoryTierMachine,), {"policy_name": policy})
    run_state_machine_as_test(machine, settings=settings(max_examples=40, stateful_step_count=30, deadline=None))
