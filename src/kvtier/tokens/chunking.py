"""Split a prompt's token ids into fixed-size chunks with their prefix-chained hashes.

Chunks cover ``[0, chunk_size)``, ``[chunk_size, 2*chunk_size)``, ... The trailing partial chunk (the last
``len % chunk_size`` tokens) is its own chunk only when ``include_partial`` is set: its hash commits to its
length, so it is found again only for a prompt with exactly the same tokens, never for a longer prompt
(where that position holds a full chunk with a different hash). By default partial chunks are not stored,
as in LMCache (``save_unfull_chunk: false``), because multi-turn prompts always extend past them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvtier.tokens.hashing import chained_hashes, token_bytes


@dataclass(frozen=True, slots=True)
class Chunk:
    """One chunk of a prompt: token range ``[start, end)`` and its chained hash."""

    index: int
    start: int
    end: int
    hash: bytes

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class Chunker:
    """Turns token ids into chunks; ``chunk_size`` >= 1."""

    chunk_size: int = 256
    include_partial: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"chunk_size must be an int >= 1, got {self.chunk_size!r}")

    def chunks(self, tokens: Any) -> list[Chunk]:
        encoded = token_bytes(tokens)
        num_tokens = len(encoded) // 4
        hashes = chained_hashes(encoded, self.chunk_size, self.include_partial)
        size = self.chunk_size
        return [Chunk(i, i * size, min((i + 1) * size, num_tokens), h) for i, h in enumerate(hashes)]

    def aligned(self, num_tokens: int) -> int:
        """``num_tokens`` rounded down to whole chunks."""
        return num_tokens - num_tokens % self.chunk_size
