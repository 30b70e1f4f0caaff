"""Eviction policies: LRU, FIFO and LFU against reference models; S3-FIFO invariants and scan resistance."""

from __future__ import annotations

import itertools
from collections.abc import Hashable

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from kvtier.storage.eviction import (
    EVICTION_POLICIES,
    EvictionPolicy,
    FIFOPolicy,
    LFUPolicy,
    LRUPolicy,
    S3FIFOPolicy,
    make_policy,
)

KEYS = st.integers(0, 5)  # few keys: hits, ties and pinned victims are frequent
PINNED = st.frozensets(KEYS)
S3_KEYS = st.integers(0, 15)  # more keys, so the small queue is a real fraction of the whole
S3_PINNED = st.frozensets(S3_KEYS)
STATEFUL = settings(max_examples=60, stateful_step_count=40, deadline=None)


# -- reference models -----------------------------------------------------------------------------------------


class OrderModel:
    """LRU (``move_on_touch``) or FIFO as a plain list, oldest first."""

    def __init__(self, move_on_touch: bool) -> None:
        self.move_on_touch = move_on_touch
        self.order: list[int] = []

    def insert(self, key: int) -> None:
        self.order.append(key)

    def touch(self, key: int) -> None:
        if self.move_on_touch and key in self.order:
            self.order.remove(key)
            self.order.append(key)

    def remove(self, key: int) -> None:
        if key in self.order:
            self.order.remove(key)

    def victim(self, pinned: frozenset[int]) -> int | None:
        for key in self.order:
            if key not in pinned:
                self.order.remove(key)
                return key
        return None

    def present(self) -> set[int]:
        return set(self.order)


class LFUModel:
    """Lowest hit count first; among equals, the one whose count changed longest ago."""

    def __init__(self) -> None:
        self.entries: dict[int, tuple[int, int]] = {}  # key -> (frequency, when it last changed)
        self.clock = itertools.count()

    def insert(self, key: int) -> None:
        self.entries[key] = (1, next(self.clock))

    def touch(self, key: int) -> None:
        if key in self.entries:
            self.entries[key] = (self.entries[key][0] + 1, next(self.clock))

    def remove(self, key: int) -> None:
        self.entries.pop(key, None)

    def victim(self, pinned: frozenset[int]) -> int | None:
        candidates = [k for k in self.entries if k not in pinned]
        if not candidates:
            return None
        key = min(candidates, key=lambda k: self.entries[k])
        del self.entries[key]
        return key

    def present(self) -> set[int]:
        return set(self.entries)


class PolicyVsModel(RuleBasedStateMachine):
    """Drives a policy and its reference model with the same calls; every answer must agree."""

    def __init__(self) -> None:
        super().__init__()
        self.policy, self.model = self.make()

    def make(self) -> tuple[EvictionPolicy, OrderModel | LFUModel]:
        raise NotImplementedError

    @rule(key=KEYS)
    def insert(self, key: int) -> None:
        if key in self.model.present():  # inserting a present key is outside the contract: hit it instead
            self.policy.touch(key)
            self.model.touch(key)
        else:
            self.policy.insert(key)
            self.model.insert(key)

    @rule(key=KEYS)
    def touch(self, key: int) -> None:
        self.policy.touch(key)
        self.model.touch(key)

    @rule(key=KEYS)
    def remove(self, key: int) -> None:
        self.policy.remove(key)
        self.model.remove(key)

    @rule(pinned=PINNED)
    def victim(self, pinned: frozenset[int]) -> None:
        assert self.policy.victim(lambda k: k not in pinned) == self.model.victim(pinned)

    @invariant()
    def same_keys(self) -> None:
        assert len(self.policy) == len(self.model.present())
        assert {k for k in range(6) if k in self.policy} == self.model.present()


class LRUVsModel(PolicyVsModel):
    def make(self) -> tuple[EvictionPolicy, OrderModel]:
        return LRUPolicy(), OrderModel(move_on_touch=True)


class FIFOVsModel(PolicyVsModel):
    def make(self) -> tuple[EvictionPolicy, OrderModel]:
        return FIFOPolicy(), OrderModel(move_on_touch=False)


class LFUVsModel(PolicyVsModel):
    def make(self) -> tuple[EvictionPolicy, LFUModel]:
        return LFUPolicy(), LFUModel()


@pytest.mark.parametrize("machine", [LRUVsModel, FIFOVsModel, LFUVsModel], ids=["LRU", "FIFO", "LFU"])
def test_policy_matches_reference_model(machine: type[RuleBasedStateMachine]) -> None:
    """Random insert/touch/remove/victim sequences (with random pinned sets) match the reference model."""
    run_state_machine_as_test(machine, settings=STATEFUL)


def test_lfu_breaks_ties_by_recency() -> None:
    """Among keys hit equally often, the one whose count changed longest ago goes first."""
    policy = LFUPolicy()
    for key in "abcd":
        policy.insert(key)
    for key in "bac":
        policy.touch(key)
    assert [policy.victim(lambda k: True) for _ in range(4)] == ["d", "b", "a", "c"]


def test_lru_moves_hits_to_the_back_and_fifo_does_not() -> None:
    lru, fifo = LRUPolicy(), FIFOPolicy()
    for policy in (lru, fifo):
        for key in "abc":
            policy.insert(key)
        policy.touch("a")
        policy.touch("missing")  # a hit on an absent key is ignored
    assert [lru.victim(lambda k: True) for _ in range(3)] == ["b", "c", "a"]
    assert [fifo.victim(lambda k: True) for _ in range(3)] == ["a", "b", "c"]
    assert lru.victim(lambda k: True) is None


# -- S3-FIFO --------------------------------------------------------------------------------------------------


class S3FIFOInvariants(RuleBasedStateMachine):
    """S3-FIFO has no simple model; check what every policy must guarantee instead."""

    def __init__(self) -> None:
        super().__init__()
        self.policy = S3FIFOPolicy()
        self.present: set[int] = set()

    @rule(key=S3_KEYS)
    def insert(self, key: int) -> None:
        if key in self.present:
            self.policy.touch(key)
        else:
            self.policy.insert(key)
            self.present.add(key)

    @rule(key=S3_KEYS)
    def touch(self, key: int) -> None:
        self.policy.touch(key)

    @rule(key=S3_KEYS)
    def remove(self, key: int) -> None:
        self.policy.remove(key)
        self.present.discard(key)

    @rule(pinned=S3_PINNED)
    def victim(self, pinned: frozenset[int]) -> None:
        asked: list[Hashable] = []

        def evictable(key: Hashable) -> bool:
            asked.append(key)
            return key not in pinned

        key = self.policy.victim(evictable)
        assert set(asked) <= self.present, "asked about a key that is not present"
        if key is None:
            assert self.present <= pinned, "no victim although an unpinned key is present"
        else:
            assert key in self.present and key not in pinned
            self.present.remove(key)

    @invariant()
    def no_key_lost_or_duplicated(self) -> None:
        assert len(self.policy) == len(self.present)
        assert {k for k in range(16) if k in self.policy} == self.present
        small, main = list(self.policy._small), list(self.policy._main)
        assert len(small) + len(main) == len(self.present)
        assert set(small) | set(main) == self.present
        assert not set(self.policy._ghost) & self.present

    def teardown(self) -> None:
        drained = []
        while (key := self.policy.victim(lambda k: True)) is not None:
            drained.append(key)
        assert sorted(drained) == sorted(self.present)  # each present key exactly once
        assert len(self.policy) == 0


def test_s3fifo_invariants() -> None:
    """Victims are present and evictable, None only when nothing is evictable, no key lost or duplicated."""
    run_state_machine_as_test(S3FIFOInvariants, settings=STATEFUL)


@pytest.mark.parametrize(("hot_keys", "pinned"), [(5, "the new key in small"), (20, "every key in main")])
def test_s3fifo_finds_the_evictable_key_behind_pinned_ones(hot_keys: int, pinned: str) -> None:
    """A queue holding only pinned keys must not hide an evictable key in the other queue."""
    policy = S3FIFOPolicy()
    hot = list(range(hot_keys))
    for key in hot:
        policy.insert(key)
        policy.touch(key)
    assert policy.victim(lambda k: False) is None  # nothing evictable; the hit keys move to main
    policy.insert("new")
    if pinned == "every key in main":
        assert policy.victim(lambda k: k == "new") == "new"
    else:
        assert policy.victim(lambda k: k != "new") in hot
    assert len(policy) == hot_keys


def _scan(policy: EvictionPolicy, capacity: int, hot: list[int], scan: range) -> tuple[float, int]:
    """Simulate a cache of ``capacity`` keys: warm a hot set, then one pass over ``scan`` while the hot set
    stays in use; return the hit ratio of hot accesses during the scan and how many hot keys are left."""
    present: set[int] = set()

    def access(key: int) -> bool:
        if key in present:
            policy.touch(key)
            return True
        if len(present) >= capacity:
            victim = policy.victim(lambda k: True)
            assert victim is not None
            present.remove(victim)  # type: ignore[arg-type]
        policy.insert(key)
        present.add(key)
        return False

    for _ in range(3):
        for key in hot:
            access(key)
    hits = []
    for i, key in enumerate(scan):
        access(key)
        if i % 10 == 0:
            hits.append(access(hot[(i // 10) % len(hot)]))
    return sum(hits) / len(hits), sum(k in present for k in hot)


def test_s3fifo_resists_a_scan_better_than_lru() -> None:
    """A reused hot set keeps hitting through a one-pass scan of 20x the capacity under S3-FIFO, not LRU."""
    hot, scan = list(range(20)), range(1000, 3000)
    s3_hits, s3_left = _scan(S3FIFOPolicy(), 100, hot, scan)
    lru_hits, lru_left = _scan(LRUPolicy(), 100, hot, scan)
    assert s3_hits >= 0.9 and s3_left == len(hot)
    assert lru_hits <= 0.1 and lru_left <= len(hot) // 2


# -- make_policy ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("LRU", LRUPolicy),
        ("lru", LRUPolicy),
        ("Lru", LRUPolicy),
        ("fifo", FIFOPolicy),
        ("LFU", LFUPolicy),
        ("s3fifo", S3FIFOPolicy),
        ("S3-FIFO", S3FIFOPolicy),
        ("s3_fifo", S3FIFOPolicy),
    ],
)
def test_make_policy_by_name(name: str, cls: type[EvictionPolicy]) -> None:
    """Names are case-insensitive (S3-FIFO spellings too), and each call makes a fresh, empty policy."""
    a, b = make_policy(name), make_policy(name)
    assert type(a) is cls and a is not b and len(a) == 0
    assert a.name == cls.name


def test_every_registered_policy_is_constructible() -> None:
    assert {make_policy(name).name for name in EVICTION_POLICIES} == set(EVICTION_POLICIES)


@pytest.mark.parametrize("name", ["", "MRU", "lru2", "random"])
def test_unknown_policy_name_lists_the_choices(name: str) -> None:
    """An unknown name is a ValueError that names the bad value and every valid choice."""
    with pytest.raises(ValueError, match="unknown eviction policy") as info:
        make_policy(name)
    message = str(info.value)
    assert repr(name) in message
    assert all(choice in message for choice in EVICTION_POLICIES)


def test_the_configuration_names_exactly_the_implemented_policies() -> None:
    from kvtier.config import CACHE_POLICIES

    assert set(CACHE_POLICIES) == set(EVICTION_POLICIES)
