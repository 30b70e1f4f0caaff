"""What the cache engine's calls return: small typed results, never bare tuples or sentinels."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvtier.diagnosis.misses import ChunkReport, miss_tokens
from kvtier.engine.leases import Lease


@dataclass(frozen=True, slots=True)
class LookupResult:
    """``hit_tokens``: length of the longest cached prefix; ``tier_tokens``: how many of them each tier holds."""

    hit_tokens: int
    total_tokens: int
    tier_tokens: dict[str, int] = field(default_factory=dict)
    lease: Lease | None = None
    miss_tokens: dict[str, int] = field(default_factory=dict)  # tokens not found, by reason (MissReason)


@dataclass(frozen=True, slots=True)
class StoreResult:
    """``stored_tokens`` were newly written; ``skipped_tokens`` were already cached or masked out;
    ``dropped_tokens`` could not be stored for lack of memory (always a tail of the prompt)."""

    stored_tokens: int
    skipped_tokens: int
    dropped_tokens: int
    seconds: float


@dataclass(frozen=True, slots=True)
class RetrieveResult:
    """The KV of the longest cached prefix.

    ``hit_tokens`` is the prefix length (including chunks skipped by the mask); ``loaded_tokens`` were
    copied out; ``kv`` is the destination (a new array when none was given) holding the loaded tokens.
    """

    hit_tokens: int
    loaded_tokens: int
    total_tokens: int
    kv: Any
    tier_tokens: dict[str, int]
    seconds: float
    miss_tokens: dict[str, int] = field(default_factory=dict)  # tokens not loaded, by reason (MissReason)


@dataclass(frozen=True, slots=True)
class Explanation:
    """Every chunk of a prompt: served from which tier, or why not (:meth:`CacheEngine.explain`)."""

    hit_tokens: int
    total_tokens: int
    chunks: list[ChunkReport]

    @property
    def miss_tokens(self) -> dict[str, int]:
        return miss_tokens(self.chunks)


def describe_tiers(tier_tokens: dict[str, int], empty: str = "miss") -> str:
    """``"3840 from memory, 256 from disk"``: where a prefix came from, as every log line and report words it."""
    return ", ".join(f"{n} from {tier}" for tier, n in tier_tokens.items() if n) or empty


def describe_misses(miss_tokens: dict[str, int]) -> str:
    """``"; missed 744: 512 evicted, 232 partial_chunk"`` (empty when nothing missed), for log lines."""
    if not miss_tokens:
        return ""
    reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(miss_tokens.items(), key=lambda item: -item[1]))
    return f"; missed {sum(miss_tokens.values())}: {reasons}"
