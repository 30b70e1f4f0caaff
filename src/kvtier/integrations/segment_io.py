"""Loading and storing a prompt's segments through a backend, for both integrations (transformers, vLLM).

A segment's keys are stored unrotated and turned to the positions they are loaded at (``turn``: a model's
:class:`~kvtier.integrations.transformers.rope.RotaryKeys`). Loading writes each segment's cached tokens into the
prompt's staging tensor ``(layers, kv, tokens, heads, head_dim)`` at its position; storing takes each segment the
cache lacked from wherever the engine keeps the prompt's KV (``kv_of``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kvtier.config import KVTierConfig
from kvtier.integrations.backend import KVBackend
from kvtier.tokens import segments as segmenting
from kvtier.tokens.segments import Segment

if TYPE_CHECKING:  # a model's: the transformers integration imports this module
    from kvtier.integrations.transformers.rope import RotaryKeys


class SegmentFinder:
    """Where a prompt's segments worth caching are (``blend_min_tokens`` or more): at the boundaries given, or
    between occurrences of ``blend_special_str``'s ids (``tokenizer`` turns it into ids; without one, only given
    boundaries work)."""

    def __init__(self, config: KVTierConfig, tokenizer: Any = None) -> None:
        self.min_tokens = config.blend_min_tokens
        self.separator: list[int] = []
        if tokenizer is not None:
            self.separator = list(tokenizer(config.blend_special_str, add_special_tokens=False).input_ids)

    def find(self, tokens: Any, given: list[tuple[int, int]] | None = None) -> list[Segment]:
        if given is not None:
            found = segmenting.spans(given, len(tokens))
        else:
            found = segmenting.split(np.asarray(tokens), self.separator) if self.separator else []
        return [s for s in found if s.num_tokens >= self.min_tokens]


def load_segments(
    backend: KVBackend,
    rotary: RotaryKeys,
    tokens: Any,
    staged: torch.Tensor,
    pieces: list[Segment],
    exact: int,
    tiers: dict[str, int],
    cache_salt: str,
) -> tuple[torch.Tensor | None, list[int]]:
    """Load each segment past the exact prefix ``[0, exact)`` into ``staged`` at its position, keys turned there,
    adding the tokens found to ``tiers``. Returns which tokens were loaded (None when no segment was found) and
    each segment's cached tokens (-1 for one inside the prefix)."""
    reused = torch.zeros(len(tokens), dtype=torch.bool)
    hits = []
    for piece in pieces:
        if piece.end <= exact:
            hits.append(-1)
            continue
        hits.append(_load_one(backend, rotary, tokens, staged, piece, exact, tiers, cache_salt, reused))
    backend.metrics.blend_segments.inc(sum(1 for h in hits if h > 0), result="hit")
    backend.metrics.blend_segments.inc(sum(1 for h in hits if h == 0), result="miss")
    return (reused if any(h > 0 for h in hits) else None), hits


def _load_one(
    backend: KVBackend,
    rotary: RotaryKeys,
    tokens: Any,
    staged: torch.Tensor,
    piece: Segment,
    exact: int,
    tiers: dict[str, int],
    cache_salt: str,
    reused: torch.Tensor,
) -> int:
    aside = piece.start < exact  # reaching into the prefix: loaded aside, so the prefix's exact KV is kept
    target = staged[:, :, piece.start : piece.end]
    if aside:
        target = torch.empty_like(target)
    got = backend.retrieve(tokens[piece.start : piece.end], target, cache_salt=cache_salt, segment=True)
    count = got.loaded_end
    if not count:
        return 0
    for tier, loaded in got.tier_tokens.items():
        tiers[tier] = tiers.get(tier, 0) + loaded
    target[:, 0, :count] = rotary.turn(target[:, 0, :count], torch.arange(piece.start, piece.start + count))
    keep = max(piece.start, exact)
    if aside:
        staged[:, :, keep : piece.start + count] = target[:, :, keep - piece.start : count]
    reused[keep : piece.start + count] = True
    return count


def store_segments(
    backend: KVBackend,
    rotary: RotaryKeys,
    tokens: Any,
    pieces: list[Segment],
    hits: list[int],
    kv_of: Callable[[Segment], torch.Tensor],
    cache_salt: str,
) -> int:
    """Store the segments the cache lacked (``hits``: their cached tokens, -1 inside the prompt's prefix): their
    KV from ``kv_of(segment)`` (a tensor the caller lets this turn in place), keys turned back to no position.
    Returns the tokens stored."""
    stored = 0
    for piece, have in zip(pieces, hits, strict=True):
        if have < 0 or have >= piece.num_tokens:
            continue  # inside the cached prefix (stored with it), or cached whole
        kv = kv_of(piece)
        kv[:, 0] = rotary.turn(kv[:, 0], torch.arange(piece.start, piece.end), back=True)
        part = tokens[piece.start : piece.end]
        stored += backend.store(part, kv, skip_tokens=have, cache_salt=cache_salt, segment=True)
    return stored
