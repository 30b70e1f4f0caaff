"""The reason of each miss: for every chunk of a prompt that was not served, why not.

:func:`explain_misses` turns what the engine found out about a prompt (which tier holds each chunk, how far the
cost model let it read, what was read) and the :class:`~kvtier.diagnosis.history.KeyHistory` into one
:class:`ChunkReport` per run of chunks missing for the same reason, plus one for a trailing partial chunk. It asks
no tier anything itself, so the engine can run it on every lookup and retrieve that misses (a prompt served whole
skips it).
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kvtier.diagnosis.history import Event, KeyHistory, Record, Variant
from kvtier.tokens.chunking import Chunk
from kvtier.tokens.keys import CacheKey


class MissReason(enum.StrEnum):
    """Why a chunk was not served (the ``reason`` label of ``kvtier_miss_tokens_total``)."""

    NEVER_STORED = "never_stored"  # nothing this process remembers stored these tokens here
    EVICTED = "evicted"  # stored, then evicted (from which tier, how long ago: in the detail)
    OTHER_NAMESPACE = "other_namespace"  # the same tokens are cached for another model, layout, rank or chunk size
    PARTIAL_CHUNK = "partial_chunk"  # the prompt's tail, shorter than a chunk (not stored: save_unfull_chunk)
    CORRUPT = "corrupt"  # a tier held it but it failed verification (corrupt or truncated) and was dropped
    CODEC_MISMATCH = "codec_mismatch"  # a tier holds it in a codec this engine is not configured to read
    TIER_UNAVAILABLE = "tier_unavailable"  # a tier that may hold it did not answer (down, timed out, circuit open)
    COST_MODEL = "cost_model"  # cached, but fetching it was estimated slower than recomputing
    NOT_ADMITTED = "not_admitted"  # a tier did not take it: admission rule not met yet, full, over quota
    AFTER_PREFIX_BREAK = "after_prefix_break"  # cached, but an earlier chunk missed: KV is only reused as a prefix


@dataclass(frozen=True, slots=True)
class ChunkReport:
    """One chunk of a prompt: served (``reason`` None, from ``tier``) or not, and why. For a miss ``tier`` is the
    tier the reason concerns (evicted from, unavailable, holding it past a break), if any."""

    start: int
    end: int
    tier: str | None
    reason: MissReason | None = None
    detail: str = ""

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class Facts:
    """What the engine found out about a prompt's chunks."""

    chunks: Sequence[Chunk]
    keys: Sequence[CacheKey]
    found: Sequence[str | None]  # per chunk, the first tier holding it, or None
    served: int  # chunks served (a prefix)
    usable: int  # chunks the cost model let through (at most the located prefix)
    num_tokens: int  # the prompt's length: tokens past the last chunk form a partial chunk
    chunk_size: int
    unavailable: Sequence[str] = ()  # tiers that could not answer
    assumed: frozenset[str] = frozenset()  # tiers ``found`` names without having asked them (a read found out)
    # the hash of the prompt's first chunk at another chunk size (to recognise a client chunking differently)
    first_chunk_hash: Callable[[int], bytes | None] | None = None
    reveal_tenants: bool = False  # say when tokens are cached for another tenant (admins only: a side channel)


def explain_misses(facts: Facts, history: KeyHistory) -> list[ChunkReport]:
    """One report per run of chunks not served for the same reason (and tier and detail), and one for a trailing
    partial chunk. Runs keep a 128-chunk miss to a few reports: this runs on every lookup that misses."""
    served, chunks, found = facts.served, facts.chunks, facts.found
    located = next((i for i, tier in enumerate(found) if tier is None), len(found))
    runs = _Runs()
    absent = _Absent(facts, history)
    for i in range(served, len(chunks)):
        tier = found[i]
        if facts.usable <= i < located:
            runs.add(chunks[i], tier, MissReason.COST_MODEL, "fetching estimated slower than recomputing")
        elif tier is not None and tier not in facts.assumed and i > served:
            runs.add(chunks[i], tier, MissReason.AFTER_PREFIX_BREAK, "")
        else:
            runs.add(chunks[i], *absent.why(i))
    reports = runs.close()
    tail = max(facts.num_tokens - facts.num_tokens % facts.chunk_size, chunks[-1].end if chunks else 0)
    if tail < facts.num_tokens:
        detail = f"shorter than a chunk ({facts.chunk_size} tokens): not stored unless save_unfull_chunk"
        reports.append(ChunkReport(tail, facts.num_tokens, None, MissReason.PARTIAL_CHUNK, detail))
    return reports


def miss_tokens(reports: Sequence[ChunkReport]) -> dict[str, int]:
    """Tokens not served, by reason."""
    counts = Counter[str]()
    for report in reports:
        if report.reason is not None:
            counts[report.reason.value] += report.num_tokens
    return dict(counts)


class _Runs:
    """Consecutive chunks with the same tier, reason and detail, as one report each."""

    def __init__(self) -> None:
        self.reports: list[ChunkReport] = []
        self._run: list[Any] | None = None  # [start, end, tier, reason, detail]

    def add(self, chunk: Chunk, tier: str | None, reason: MissReason, detail: str) -> None:
        run = self._run
        if run is not None and run[1] == chunk.start and run[2] == tier and run[3] is reason and run[4] == detail:
            run[1] = chunk.end
            return
        self._flush()
        self._run = [chunk.start, chunk.end, tier, reason, detail]

    def _flush(self) -> None:
        if self._run is not None:
            self.reports.append(ChunkReport(*self._run))
            self._run = None

    def close(self) -> list[ChunkReport]:
        self._flush()
        return self.reports


Why = tuple[str | None, MissReason, str]
NEVER_STORED: Why = (None, MissReason.NEVER_STORED, "")


class _Absent:
    """Why a chunk no tier served is missing: its history, the tiers' health, the other namespaces."""

    def __init__(self, facts: Facts, history: KeyHistory) -> None:
        self.facts = facts
        self.history = history
        namespace = facts.keys[0].namespace if facts.keys else None
        self.mine = Variant(namespace, facts.chunk_size) if namespace is not None else None

    def why(self, i: int) -> Why:
        facts = self.facts
        record = self.history.last(facts.keys[i].id)
        if record is not None:
            return self._from_record(record)
        if facts.unavailable:
            return facts.unavailable[0], MissReason.TIER_UNAVAILABLE, "did not answer"
        other = self._other_namespace(i)
        return (None, MissReason.OTHER_NAMESPACE, other) if other is not None else NEVER_STORED

    def _other_namespace(self, i: int) -> str | None:
        """How the namespace that stored these tokens differs from the request's, if another one did."""
        facts, history = self.facts, self.history
        theirs = history.stored_under(facts.chunks[i].hash)
        if theirs is None and i == 0 and facts.first_chunk_hash is not None:
            for size in sorted(history.chunk_sizes() - {facts.chunk_size}):  # a client chunking at another size
                chunk_hash = facts.first_chunk_hash(size)
                theirs = history.stored_under(chunk_hash) if chunk_hash is not None else None
                if theirs is not None:
                    break
        if theirs is None or self.mine is None:
            return None
        return _difference(self.mine, theirs, facts.reveal_tenants)

    def _from_record(self, record: Record) -> Why:
        events = record.events
        if events & Event.CORRUPT:
            return record.tier, MissReason.CORRUPT, _when(record, record.detail)
        if events & Event.CODEC_MISMATCH:
            return record.tier, MissReason.CODEC_MISMATCH, _when(record, record.detail)
        if self.facts.unavailable:
            return self.facts.unavailable[0], MissReason.TIER_UNAVAILABLE, "did not answer"
        if events & Event.READ_FAILED:
            return record.tier, MissReason.TIER_UNAVAILABLE, _when(record, record.detail or "read failed")
        if events & (Event.NOT_ADMITTED | Event.REFUSED):
            return record.tier, MissReason.NOT_ADMITTED, _when(record, record.detail or "not taken")
        if events & Event.EVICTED:
            return record.tier, MissReason.EVICTED, _when(record, f"evicted from {record.tier}")
        return None, MissReason.EVICTED, _when(record, "stored, now in no tier (evicted by a shared store or deleted)")


def _difference(mine: Variant, theirs: Variant, reveal_tenants: bool) -> str | None:
    a, b = mine.namespace, theirs.namespace
    if a.cache_salt != b.cache_salt and not reveal_tenants:
        return None  # another tenant's: its existence is that tenant's business
    fields = [
        ("model", a.model_name, b.model_name),
        ("layout", a.layout, b.layout),
        ("world size", a.world_size, b.world_size),
        ("rank", a.rank, b.rank),
        ("chunk size", mine.chunk_size, theirs.chunk_size),
        ("hash scheme", a.hash_scheme, b.hash_scheme),
    ]
    differences = [f"{name} {there!r} (this request: {here!r})" for name, here, there in fields if here != there]
    if a.cache_salt != b.cache_salt:
        differences.append("another tenant's cache_salt")
    return "cached under " + ", ".join(differences) if differences else None


def _when(record: Record, what: str) -> str:
    return f"{what} {record.age():.1f} s ago"
