"""Cutting a prompt into segments: the pieces of text whose KV is cached by their own content and reused wherever
they appear (a RAG passage, a tool description), as opposed to the prompt's prefix chunks.

A prompt is cut at every occurrence of a separator's token ids (LMCache's ``blend_special_str``, default
``" # # "``) or at boundaries the caller gives. The separator tokens belong to no segment: they are computed
with the prompt, like the text between segments. For the separator to be found, its ids must appear in the
prompt exactly as the separator alone tokenizes: build prompts by joining separately tokenized texts with the
separator's ids (:func:`join`), since a tokenizer may merge a separator with its neighbours inside one string.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Segment:
    """Tokens ``[start, end)`` of a prompt."""

    start: int
    end: int

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


def find_separators(tokens: np.ndarray, separator: Sequence[int]) -> list[int]:
    """Start positions of the non-overlapping occurrences of ``separator`` in ``tokens``, left to right."""
    n, k = len(tokens), len(separator)
    if k == 0 or n < k:
        return []
    sep = np.asarray(separator, dtype=tokens.dtype)
    candidates = np.flatnonzero(tokens[: n - k + 1] == sep[0])
    for offset in range(1, k):  # narrow the candidates one separator token at a time
        candidates = candidates[tokens[candidates + offset] == sep[offset]]
    found: list[int] = []
    for start in candidates.tolist():
        if not found or start >= found[-1] + k:
            found.append(start)
    return found


def split(tokens: np.ndarray, separator: Sequence[int], min_tokens: int = 1) -> list[Segment]:
    """The segments of ``tokens`` between separators (the text before the first and after the last included),
    those of at least ``min_tokens`` tokens. No separator in the prompt: no segments."""
    starts = find_separators(tokens, separator)
    if not starts:
        return []
    bounds = [0, *[b for s in starts for b in (s, s + len(separator))], len(tokens)]
    pieces = [Segment(bounds[i], bounds[i + 1]) for i in range(0, len(bounds), 2)]
    return [p for p in pieces if p.num_tokens >= max(min_tokens, 1)]


def spans(boundaries: Sequence[tuple[int, int]], num_tokens: int) -> list[Segment]:
    """Segments from explicit ``(start, end)`` boundaries: ordered, disjoint, inside the prompt."""
    segments = [Segment(int(s), int(e)) for s, e in boundaries]
    position = 0
    for segment in segments:
        if not position <= segment.start < segment.end <= num_tokens:
            raise ValueError(f"segment [{segment.start}, {segment.end}) is empty, out of order or outside the prompt")
        position = segment.end
    return segments


def join(pieces: Sequence[Sequence[int]], separator: Sequence[int]) -> tuple[list[int], list[Segment]]:
    """Token ids of ``pieces`` joined by ``separator``, and where each piece lies in them."""
    ids: list[int] = []
    segments: list[Segment] = []
    for i, piece in enumerate(pieces):
        if i:
            ids.extend(separator)
        segments.append(Segment(len(ids), len(ids) + len(piece)))
        ids.extend(piece)
    return ids, segments
