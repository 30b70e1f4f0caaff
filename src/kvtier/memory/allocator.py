"""Best-fit, coalescing allocator of offsets inside one fixed-size arena.

It hands out aligned ranges and never touches memory itself, so the same code manages an anonymous mapping,
a shared-memory segment or (later) a pinned or device buffer. Free ranges are indexed by start, by end (for
O(1) coalescing) and by size (sorted distinct sizes + bisect for best fit); chunks of one model mostly share a
size, so exact fits are the common case and fragmentation stays low.
"""

from __future__ import annotations

import bisect
import itertools


class ArenaAllocator:
    """Allocates ``[offset, offset + size)`` ranges from ``[0, capacity)``. Not thread-safe by itself."""

    def __init__(self, capacity: int, alignment: int = 4096) -> None:
        if alignment < 1 or alignment & (alignment - 1):
            raise ValueError("alignment must be a power of two")
        self.alignment = alignment
        self.capacity = capacity - capacity % alignment
        self._free_by_start: dict[int, int] = {}
        self._free_by_end: dict[int, int] = {}
        self._starts_by_size: dict[int, set[int]] = {}
        self._sizes: list[int] = []
        self._allocated: dict[int, int] = {}
        self.used_bytes = 0
        if self.capacity:
            self._add_free(0, self.capacity)

    def round_up(self, nbytes: int) -> int:
        return max(self.alignment, -(-nbytes // self.alignment) * self.alignment)

    def allocate(self, nbytes: int) -> int | None:
        """Return the offset of a new range of at least ``nbytes``, or None if no free range fits."""
        size = self.round_up(nbytes)
        i = bisect.bisect_left(self._sizes, size)
        if i == len(self._sizes):
            return None
        fit = self._sizes[i]
        start = next(iter(self._starts_by_size[fit]))
        self._remove_free(start, fit)
        if fit > size:
            self._add_free(start + size, fit - size)
        self._allocated[start] = size
        self.used_bytes += size
        return start

    def free(self, offset: int) -> None:
        size = self._allocated.pop(offset, None)
        if size is None:
            raise ValueError(f"free of unallocated offset {offset}")
        self.used_bytes -= size
        start, end = offset, offset + size
        prev_start = self._free_by_end.get(start)
        if prev_start is not None:
            self._remove_free(prev_start, start - prev_start)
            start = prev_start
        next_size = self._free_by_start.get(end)
        if next_size is not None:
            self._remove_free(end, next_size)
            end += next_size
        self._add_free(start, end - start)

    def size_of(self, offset: int) -> int:
        return self._allocated[offset]

    def free_ranges(self) -> list[tuple[int, int]]:
        """``(start, size)`` of every free range."""
        return list(self._free_by_start.items())

    @property
    def free_bytes(self) -> int:
        return self.capacity - self.used_bytes

    @property
    def largest_free(self) -> int:
        return self._sizes[-1] if self._sizes else 0

    def _add_free(self, start: int, size: int) -> None:
        self._free_by_start[start] = size
        self._free_by_end[start + size] = start
        starts = self._starts_by_size.get(size)
        if starts is None:
            self._starts_by_size[size] = {start}
            bisect.insort(self._sizes, size)
        else:
            starts.add(start)

    def _remove_free(self, start: int, size: int) -> None:
        del self._free_by_start[start]
        del self._free_by_end[start + size]
        starts = self._starts_by_size[size]
        starts.discard(start)
        if not starts:
            del self._starts_by_size[size]
            self._sizes.pop(bisect.bisect_left(self._sizes, size))

    def check_integrity(self) -> None:
        """Raise AssertionError if the free and allocated ranges do not tile the arena exactly."""
        ranges = sorted([*self._free_by_start.items(), *self._allocated.items()])
        position = 0
        for start, size in ranges:
            assert start == position, f"gap or overlap at {position} (next range starts at {start})"
            assert size > 0 and start % self.alignment == 0
            position += size
        assert position == self.capacity, f"ranges end at {position}, capacity {self.capacity}"
        frees = sorted(self._free_by_start.items())
        for (a, sa), (b, _) in itertools.pairwise(frees):
            assert a + sa != b, f"adjacent free ranges at {a} and {b} were not coalesced"
        assert self.used_bytes == sum(self._allocated.values())
        assert sorted(self._sizes) == self._sizes == sorted(self._starts_by_size)
