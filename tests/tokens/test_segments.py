"""Cutting prompts into segments at a separator or at given boundaries."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvtier.tokens.segments import Segment, find_separators, join, spans, split

SEP = [7, 7, 9]


def ids(*values: int) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def test_segments_lie_between_separators_and_exclude_them() -> None:
    tokens = ids(1, 2, 7, 7, 9, 3, 4, 5, 7, 7, 9, 6)
    assert find_separators(tokens, SEP) == [2, 8]
    assert split(tokens, SEP) == [Segment(0, 2), Segment(5, 8), Segment(11, 12)]


def test_overlapping_and_partial_occurrences() -> None:
    """7 7 7 9: the separator starts at the second 7; 7 7 at the end is no separator."""
    assert find_separators(ids(7, 7, 7, 9, 1, 7, 7), SEP) == [1]
    assert find_separators(ids(7, 7, 9, 7, 7, 9), SEP) == [0, 3]
    assert split(ids(7, 7, 9, 7, 7, 9), SEP) == []  # only empty pieces


def test_short_pieces_are_no_segments_and_no_separator_means_none() -> None:
    tokens = ids(1, 7, 7, 9, 2, 3, 4)
    assert split(tokens, SEP, min_tokens=2) == [Segment(4, 7)]
    assert split(ids(1, 2, 3), SEP) == []


def test_join_places_every_piece_where_split_finds_it() -> None:
    pieces = [[1, 2], [3, 4, 5], [6]]
    joined, segments = join(pieces, SEP)
    assert joined == [1, 2, *SEP, 3, 4, 5, *SEP, 6]
    assert split(np.asarray(joined), SEP) == segments


def test_explicit_boundaries_are_checked() -> None:
    assert spans([(0, 3), (5, 9)], 10) == [Segment(0, 3), Segment(5, 9)]
    for bad in ([(3, 3)], [(5, 9), (0, 3)], [(0, 11)], [(-1, 2)]):
        with pytest.raises(ValueError, match="segment"):
            spans(bad, 10)


@given(st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=8), min_size=1, max_size=6))
def test_joined_pieces_that_hold_no_separator_split_back(pieces) -> None:  # type: ignore[no-untyped-def]
    joined, segments = join(pieces, SEP)
    assert split(np.asarray(joined), SEP) == (segments if len(pieces) > 1 else [])
