"""ArenaAllocator: tiling integrity under random use, coalescing, best/exact fit, and misuse."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from kvtier.memory.allocator import ArenaAllocator

ALIGN = 4096
CAPACITY = 64 * ALIGN


class AllocatorMachine(RuleBasedStateMachine):
    """Random allocate/free sequences; the free and allocated ranges must always tile the arena."""

    def __init__(self) -> None:
        super().__init__()
        self.alloc = ArenaAllocator(CAPACITY, ALIGN)
        self.live: dict[int, int] = {}  # offset -> rounded size

    @rule(nbytes=st.integers(0, 12 * ALIGN))
    def allocate(self, nbytes: int) -> None:
        size = self.alloc.round_up(nbytes)
        offset = self.alloc.allocate(nbytes)
        if offset is None:
            assert self.alloc.largest_free < size, "refused although a free range fits"
            return
        assert offset % ALIGN == 0 and 0 <= offset <= CAPACITY - size
        for other, other_size in self.live.items():
            assert offset + size <= other or other + other_size <= offset, "overlapping allocations"
        assert self.alloc.size_of(offset) == size
        self.live[offset] = size

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        offset = data.draw(st.sampled_from(sorted(self.live)))
        self.alloc.free(offset)
        del self.live[offset]

    @invariant()
    def tiles_the_arena(self) -> None:
        self.alloc.check_integrity()
        assert self.alloc.used_bytes == sum(self.live.values())
        assert self.alloc.free_bytes == CAPACITY - self.alloc.used_bytes

    def teardown(self) -> None:
        for offset in list(self.live):
            self.alloc.free(offset)
        self.alloc.check_integrity()
        assert self.alloc.free_ranges() == [(0, CAPACITY)]


def test_random_allocate_free_sequences() -> None:
    """Integrity holds after every step; freeing everything leaves one range of full capacity."""
    run_state_machine_as_test(
        AllocatorMachine, settings=settings(max_examples=80, stateful_step_count=50, deadline=None)
    )


@settings(max_examples=50, deadline=None)
@given(st.permutations(range(8)), st.lists(st.integers(1, 3), min_size=8, max_size=8))
def test_freeing_in_any_order_coalesces_to_one_range(order: list[int], pages: list[int]) -> None:
    """Whatever order neighbours are freed in, adjacent free ranges merge back into the whole arena."""
    alloc = ArenaAllocator(CAPACITY, ALIGN)
    offsets = [alloc.allocate(p * ALIGN) for p in pages]
    assert None not in offsets
    for i in order:
        alloc.free(offsets[i])  # type: ignore[arg-type]
        alloc.check_integrity()
    assert alloc.free_ranges() == [(0, CAPACITY)]
    assert alloc.largest_free == CAPACITY and alloc.used_bytes == 0


def test_exact_fit_reuses_the_freed_range() -> None:
    """A freed range is reused for a same-size request (the common case: chunks of one size)."""
    alloc = ArenaAllocator(CAPACITY, ALIGN)
    a, b, c = (alloc.allocate(ALIGN) for _ in range(3))
    alloc.free(b)  # type: ignore[arg-type]
    assert alloc.allocate(ALIGN) == b
    alloc.free(a)  # type: ignore[arg-type]
    assert alloc.allocate(100) == a  # rounded up to the same size
    assert c is not None


def test_best_fit_prefers_the_smallest_hole() -> None:
    """A request goes to the smallest free range that fits, keeping large ranges whole."""
    alloc = ArenaAllocator(16 * ALIGN, ALIGN)
    blocks = [alloc.allocate(n * ALIGN) for n in (3, 1, 1, 1, 2, 1)]  # 9 pages used, 7 free at the end
    big, small = blocks[0], blocks[2]
    alloc.free(big)  # type: ignore[arg-type]
    alloc.free(small)  # type: ignore[arg-type]
    assert alloc.allocate(ALIGN) == small
    assert alloc.allocate(3 * ALIGN) == big
    alloc.check_integrity()


def test_allocation_fails_cleanly_when_full_or_too_large() -> None:
    alloc = ArenaAllocator(4 * ALIGN, ALIGN)
    assert alloc.allocate(5 * ALIGN) is None
    offsets = [alloc.allocate(ALIGN) for _ in range(4)]
    assert None not in offsets
    assert alloc.allocate(1) is None
    alloc.check_integrity()


def test_fragmentation_refuses_what_no_single_range_fits() -> None:
    """Free bytes in separate ranges are not one range: the request fails instead of overlapping."""
    alloc = ArenaAllocator(4 * ALIGN, ALIGN)
    offsets = [alloc.allocate(ALIGN) for _ in range(4)]
    alloc.free(offsets[0])  # type: ignore[arg-type]
    alloc.free(offsets[2])  # type: ignore[arg-type]
    assert alloc.free_bytes == 2 * ALIGN and alloc.largest_free == ALIGN
    assert alloc.allocate(2 * ALIGN) is None


def test_double_free_raises() -> None:
    """Freeing twice (or an offset never handed out) is a ValueError and changes nothing."""
    alloc = ArenaAllocator(CAPACITY, ALIGN)
    a = alloc.allocate(ALIGN)
    b = alloc.allocate(ALIGN)
    assert a is not None and b is not None
    alloc.free(a)
    with pytest.raises(ValueError, match="unallocated"):
        alloc.free(a)
    with pytest.raises(ValueError):
        alloc.free(b + 1)
    alloc.check_integrity()
    assert alloc.used_bytes == ALIGN


def test_sizes_round_up_to_the_alignment() -> None:
    alloc = ArenaAllocator(CAPACITY, 512)
    assert [alloc.round_up(n) for n in (0, 1, 512, 513, 1024)] == [512, 512, 512, 1024, 1024]
    offset = alloc.allocate(700)
    assert offset is not None and alloc.size_of(offset) == 1024 and alloc.used_bytes == 1024


def test_capacity_is_rounded_down_and_alignment_checked() -> None:
    assert ArenaAllocator(10 * ALIGN + 123, ALIGN).capacity == 10 * ALIGN
    empty = ArenaAllocator(100, ALIGN)
    assert empty.capacity == 0 and empty.allocate(1) is None
    empty.check_integrity()
    for bad in (0, 3, 1000):
        with pytest.raises(ValueError, match="power of two"):
            ArenaAllocator(CAPACITY, bad)
