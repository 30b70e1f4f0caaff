"""The cache engine: store a prompt's KV, look up and retrieve the longest cached prefix.

One engine serves one model / KV layout / parallel rank; tenants are separated by ``cache_salt``. Every call is
thread-safe. A store copies the prompt's new chunks into pool memory, publishes them to the memory tier and
queues them for slower tiers; a retrieve locates the longest prefix across tiers, reads it (promoting chunks
from slower tiers) and copies it out. See ``docs/architecture.md`` for a walk through both.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from kvtier.codecs.gate import check_codecs
from kvtier.config import KVTierConfig
from kvtier.diagnosis import ChunkReport, Event, Facts, RequestRecord, explain_misses, miss_tokens
from kvtier.engine.leases import Lease, LeaseTable, Pins
from kvtier.engine.results import (
    Explanation,
    LookupResult,
    RetrieveResult,
    StoreResult,
    describe_misses,
    describe_tiers,
)
from kvtier.engine.transfer import ArrayKV, KVDestination, KVSource, as_destination, as_source
from kvtier.errors import LayoutError
from kvtier.memory.layout import KVLayout
from kvtier.memory.memory_obj import MemoryObj
from kvtier.metrics import CacheMetrics
from kvtier.storage.base import StorageTier
from kvtier.storage.registry import build_storage
from kvtier.storage.tiered import TieredStorage, located_prefix
from kvtier.tokens.chunking import Chunk, Chunker
from kvtier.tokens.hashing import HASH_SCHEME, chained_hashes, token_bytes
from kvtier.tokens.keys import CacheKey, Namespace

log = logging.getLogger("kvtier")
# Below this chunk size, handing a copy to another thread costs more than the copy itself.
PARALLEL_COPY_MIN_BYTES = 1 << 20
MAX_NAMESPACES = 4096  # tenants' namespaces an engine keeps built
SEGMENT_HASH_SCHEME = HASH_SCHEME + "+segment"  # segments' key space (see CacheEngine.namespace)


@dataclass(slots=True)
class Reservation:
    """Memory set aside by :meth:`CacheEngine.reserve`: ``objs[i]`` is to hold the KV of ``chunks[i]``."""

    chunks: list[Chunk]
    keys: list[CacheKey]
    objs: list[MemoryObj]
    cached_keys: list[CacheKey]  # chunks of the prompt already cached (pinned in memory: ``held``)
    held: Pins
    num_tokens: int
    dropped_tokens: int  # chunks that found no memory (always a tail of the prompt)
    started: float
    segment: bool = False
    cache_salt: str = field(default="", repr=False)


@dataclass(frozen=True, slots=True)
class Located:
    """Where a prompt's chunks are: ``sources``, the tiers to read the prefix worth reading from; ``found``, the
    first tier holding each chunk (None: none), as far as ``asked_remote`` (else remote tiers were assumed)."""

    sources: list[StorageTier]
    found: list[StorageTier | None]
    asked_remote: bool


@dataclass(frozen=True, slots=True)
class Acquired:
    """Chunks handed out by :meth:`CacheEngine.acquire`: ``objs[i]`` holds ``chunks[i]`` (one reference each)."""

    result: RetrieveResult
    chunks: list[Chunk]
    objs: list[MemoryObj]


class CacheEngine:
    """Store, look up and retrieve KV by token prefix, across the configured tiers."""

    def __init__(
        self,
        config: KVTierConfig,
        layout: KVLayout,
        *,
        model_name: str,
        world_size: int = 1,
        rank: int = 0,
        metrics: CacheMetrics | None = None,
        storage: TieredStorage | None = None,
    ) -> None:
        """``storage``: tiers shared with other engines (a server holds many models in one budget); by
        default the engine builds its own from ``config`` and closes it with itself."""
        check_codecs(config, model_name)  # a lossy codec only for a model it was measured on
        self.config = config
        self.layout = layout
        self.metrics = storage.metrics if storage is not None else metrics or CacheMetrics()
        self.chunker = Chunker(config.chunk_size, config.save_unfull_chunk)
        self._segment_chunker = Chunker(config.chunk_size, include_partial=True)
        self._base_namespace = Namespace(model_name, layout.descriptor(), world_size, rank)
        self._namespaces: dict[tuple[str, bool], Namespace] = {("", False): self._base_namespace}
        self._owns_storage = storage is None
        self.storage = build_storage(config, self.metrics) if storage is None else storage
        self.leases = LeaseTable(config.pin_timeout_sec, self.storage.unpin)
        self._lease_gauge = self.metrics.active_leases.add_source(lambda: {(): len(self.leases)})
        self._closed = False
        self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="kvtier-prefetch")
        self._copiers = (
            ThreadPoolExecutor(config.copy_threads, thread_name_prefix="kvtier-copy")
            if config.copy_threads > 1 and layout.chunk_bytes(config.chunk_size) >= PARALLEL_COPY_MIN_BYTES
            else None
        )
        logging.getLogger("kvtier").setLevel(config.log_level.upper())

    # -- keys ---------------------------------------------------------------------------------------
    def namespace(self, cache_salt: str = "", segment: bool = False) -> Namespace:
        """The namespace of tenant ``cache_salt``: of prompts (prefix-chained from the prompt's start), or of
        segments (``segment``: text cached by its own content, to be reused at any position; a key space of its
        own, so a segment's chunk never answers for a prompt's). Namespaces are kept for reuse (their digest costs
        a hash), at most ``MAX_NAMESPACES`` of them: a server's clients may send any number of salts."""
        ns = self._namespaces.get((cache_salt, segment))
        if ns is None:
            base = self._base_namespace
            scheme = SEGMENT_HASH_SCHEME if segment else base.hash_scheme
            ns = Namespace(base.model_name, base.layout, base.world_size, base.rank, cache_salt, scheme)
            if len(self._namespaces) >= MAX_NAMESPACES:
                self._namespaces = {("", False): self._base_namespace}  # start over: rebuilding one is cheap
            self._namespaces[(cache_salt, segment)] = ns
        return ns

    def chunk_keys(
        self, tokens: Any, cache_salt: str = "", segment: bool = False
    ) -> tuple[list[Chunk], list[CacheKey]]:
        """The chunks of ``tokens`` and their keys. A segment keeps its trailing partial chunk: it is found again
        only as the same whole segment, which is how segments are reused."""
        chunks = (self._segment_chunker if segment else self.chunker).chunks(tokens)
        ns = self.namespace(cache_salt, segment)
        return chunks, [ns.key(c.hash) for c in chunks]

    # -- lookup -------------------------------------------------------------------------------------
    def lookup(self, tokens: Any, *, cache_salt: str = "", pin: bool = False, segment: bool = False) -> LookupResult:
        """Length of the longest cached prefix of ``tokens``. Adds or removes nothing; it counts as a use of
        the prefix for eviction (tail first, so the head is kept longest).

        With ``pin=True`` the prefix's chunks are pinned under a :class:`Lease` (in the result) until
        :meth:`release` or ``pin_timeout_sec``, so a following retrieve finds them. Every call takes ``segment``:
        ``tokens`` are then one segment, cached by its own content (see :meth:`namespace`).
        """
        started = time.perf_counter()
        self.leases.expire()
        num_tokens = _token_count(tokens)
        chunks, keys = self.chunk_keys(tokens, cache_salt, segment)
        located = self._locate(chunks, keys)
        sources = located.sources
        hit = chunks[len(sources) - 1].end if sources else 0
        lease = None
        if pin and sources:
            lease = self.leases.grant(self.storage.pin(keys[: len(sources)], sources), hit)
        self.storage.touch(keys[: len(sources)])
        m = self.metrics
        m.lookups.inc()
        m.lookup_tokens.inc(num_tokens)
        m.lookup_hit_tokens.inc(hit)
        seconds = time.perf_counter() - started
        m.lookup_seconds.observe(seconds)
        tiers = Counter[str]()
        for chunk, tier in zip(chunks, sources, strict=False):
            tiers[tier.name] += chunk.num_tokens
        misses = miss_tokens(self._misses(tokens, chunks, keys, located, len(sources), num_tokens, segment))
        self._note_request("lookup", cache_salt, num_tokens, hit, tiers, misses, seconds)
        log.debug("Looked up %d tokens: %s%s", num_tokens, describe_tiers(tiers), describe_misses(misses))
        return LookupResult(hit, num_tokens, dict(tiers), lease, misses)

    def explain(
        self, tokens: Any, *, cache_salt: str = "", segment: bool = False, reveal_tenants: bool = False
    ) -> Explanation:
        """Each chunk of ``tokens``: the tier that would serve it, or why none would (``docs/operations.md``).

        Asks every tier, remote ones too, and changes nothing (eviction order, counters). ``reveal_tenants``: also
        say when the tokens are cached for another tenant, which one tenant must never learn of another's
        prompts: for administrators only."""
        num_tokens = _token_count(tokens)
        chunks, keys = self.chunk_keys(tokens, cache_salt, segment)
        located = self._locate(chunks, keys, count=False)
        readable = located.sources[: self._readable(keys, located.sources)]
        served = [ChunkReport(c.start, c.end, t.name) for c, t in zip(chunks, readable, strict=False)]
        misses = self._misses(tokens, chunks, keys, located, len(served), num_tokens, segment, reveal_tenants)
        return Explanation(served[-1].end if served else 0, num_tokens, served + misses)

    def _readable(self, keys: Sequence[CacheKey], sources: Sequence[StorageTier]) -> int:
        """How many of the located chunks can be read: up to the first one its tier holds in a codec this engine
        does not read (a read found out before; the chunk stays there for engines that do read it)."""
        history = self.storage.history
        for i, (key, tier) in enumerate(zip(keys, sources, strict=False)):
            record = history.last(key.id)
            if record is not None and record.events & Event.CODEC_MISMATCH and record.tier == tier.name:
                return i
        return len(sources)

    def _locate(
        self, chunks: Sequence[Chunk], keys: Sequence[CacheKey], *, reading: bool = False, count: bool = True
    ) -> Located:
        """Where the longest cached prefix lives, cut where fetching would be slower than recomputing.

        ``reading``: a read follows at once. Then, unless the cost model needs to know which chunks a remote tier
        holds before fetching them, the remote tier is not asked first: the read finds out (one round trip).
        ``count``: count the tokens the cost model skips in the metrics."""
        ask_remote = not reading or self.config.recompute_tokens_per_sec > 0
        found = self.storage.find(keys, ask_remote=ask_remote)
        located = located_prefix(found)
        if self.config.recompute_tokens_per_sec > 0:  # the cost model: how much of the prefix is worth reading
            end = self.storage.affordable_prefix(
                located,
                [c.num_tokens for c in chunks],
                [self.layout.chunk_bytes(c.num_tokens) for c in chunks],
                self.config.recompute_tokens_per_sec,
                count,
            )
            located = located[:end]
        return Located(located, found, ask_remote)

    def _misses(
        self,
        tokens: Any,
        chunks: Sequence[Chunk],
        keys: Sequence[CacheKey],
        located: Located,
        served: int,
        num_tokens: int,
        segment: bool,
        reveal_tenants: bool = False,
    ) -> list[ChunkReport]:
        """A report for each chunk not served (and a trailing partial chunk): why not."""
        if served == len(chunks) and (chunks[-1].end if chunks else 0) >= num_tokens:
            return []  # all served: the common case costs nothing
        remote = frozenset(t.name for t in self.storage.lower if not t.is_local)
        facts = Facts(
            chunks,
            keys,
            [t.name if t is not None else None for t in located.found],
            served,
            len(located.sources),
            num_tokens,
            self.config.chunk_size,
            unavailable=self.storage.unavailable(),
            assumed=frozenset() if located.asked_remote else remote,
            first_chunk_hash=None if segment else partial(_first_chunk_hash, tokens),
            reveal_tenants=reveal_tenants,
        )
        return explain_misses(facts, self.storage.history)

    def _note_request(
        self,
        op: str,
        cache_salt: str,
        total: int,
        hit: int,
        tiers: dict[str, int],
        misses: dict[str, int],
        seconds: float,
        stored: int = 0,
    ) -> None:
        """Count a request's misses by reason and keep it among the recent requests."""
        for reason, n in misses.items():
            self.metrics.miss_tokens.inc(n, op=op, reason=reason)
        model = self._base_namespace.model_name
        record = RequestRecord(time.time(), op, model, total, hit, dict(tiers), misses, seconds, stored, cache_salt)
        self.storage.recent.add(record)

    def release(self, lease: Lease | int) -> bool:
        """Release a lookup lease's pins; False if it was already released or had expired."""
        return self.leases.release(lease)

    # -- store --------------------------------------------------------------------------------------
    def store(
        self,
        tokens: Any,
        kv: Any,
        *,
        skip_tokens: int = 0,
        mask: Any = None,
        cache_salt: str = "",
        segment: bool = False,
    ) -> StoreResult:
        """Store the KV of ``tokens``; chunks already cached are skipped (cheap dedup).

        ``kv`` covers tokens ``[0, len(tokens))``: a ``(layers, kv, tokens, heads, head_dim)`` numpy array or
        torch tensor, or a :class:`~kvtier.engine.transfer.KVSource`. ``skip_tokens`` (a multiple of
        ``chunk_size``) is a leading part the caller knows is cached, not read; LMCache's form of it, a ``mask``
        (False...False True...True), is accepted too. When memory is short only a prefix is stored (the rest is
        reported as dropped).
        """
        source = as_source(kv, self.layout)
        _check_covers(source, _token_count(tokens), "kv")
        reservation = self.reserve(
            tokens, skip_tokens=skip_tokens, mask=mask, cache_salt=cache_salt, segment=segment, source=source
        )
        try:
            copies = [
                partial(source.read_into, obj, c.start, c.end)
                for c, obj in zip(reservation.chunks, reservation.objs, strict=True)
            ]
            self._wait(self._copy_all(copies, source))
            source.synchronize()  # chunks are published (and may be read by others) only once complete
        except BaseException:
            self.abandon(reservation)
            raise
        return self.commit(reservation)

    def reserve(
        self,
        tokens: Any,
        *,
        skip_tokens: int = 0,
        mask: Any = None,
        cache_salt: str = "",
        segment: bool = False,
        source: Any = None,
    ) -> Reservation:
        """Set aside memory for the chunks of ``tokens`` not cached yet, for a caller that fills them itself
        (:meth:`store`, or a client writing through shared memory); then :meth:`commit` or :meth:`abandon`.

        Chunks already cached are pinned until then, so making room for the new ones cannot punch a hole in
        this prefix. ``source`` (optional) is where the KV will be copied from, to align chunk memory with it.
        """
        started = time.perf_counter()
        num_tokens, _, todo = self._chunks_after(tokens, self._skip(tokens, skip_tokens, mask), cache_salt, segment)
        present = [self.storage.contains_any(k) for _, k in todo]
        cached = [k for (_, k), p in zip(todo, present, strict=True) if p]
        held = self.storage.pin_in_memory(cached)
        new = [(c, k) for (c, k), p in zip(todo, present, strict=True) if not p]
        objs = self._allocate([c for c, _ in new], source)
        dropped = sum(c.num_tokens for c, _ in new[len(objs) :])
        new = new[: len(objs)]
        chunks, keys = [c for c, _ in new], [k for _, k in new]
        return Reservation(chunks, keys, objs, cached, held, num_tokens, dropped, started, segment, cache_salt)

    def commit(self, reservation: Reservation) -> StoreResult:
        """Publish a filled reservation to every tier (memory now, slower tiers in the background)."""
        num_chunks = len(reservation.objs)
        try:
            self.storage.history.stored(reservation.keys, self.config.chunk_size)  # before write notes admission
            self.storage.write(reservation.keys, reservation.objs)
            # Storing is a use of the chunks already cached: refresh them after inserting the new ones, so a
            # cached head stays newer than the tail stored behind it (else it is evicted first, orphaning the tail).
            self.storage.touch(reservation.cached_keys)
        finally:
            self.abandon(reservation)
        stored = sum(c.num_tokens for c in reservation.chunks)
        skipped = reservation.num_tokens - stored - reservation.dropped_tokens
        result = StoreResult(stored, skipped, reservation.dropped_tokens, time.perf_counter() - reservation.started)
        self._record_store(result, num_chunks)
        self._note_request(
            "store", reservation.cache_salt, result.stored_tokens + skipped + result.dropped_tokens, skipped, {}, {},
            result.seconds, result.stored_tokens,
        )  # fmt: skip
        if reservation.segment:
            self.metrics.segment_stored_tokens.inc(result.stored_tokens)
        return result

    def abandon(self, reservation: Reservation) -> None:
        """Give a reservation's memory and pins back without storing anything. Idempotent."""
        objs, reservation.objs = reservation.objs, []
        for obj in objs:
            obj.unref()
        held, reservation.held = reservation.held, []
        self.storage.unpin(held)

    def _copy_all(self, copies: list[Callable[[], None]], side: KVSource | KVDestination) -> list[Future[None]]:
        """Run chunk copies; large numpy copies go to the copy threads (one thread cannot saturate memory
        bandwidth, and numpy releases the GIL while copying). Returns futures to :meth:`_wait` for."""
        if getattr(side, "parallel_copies", False) and self._copiers is not None:
            return [self._copiers.submit(copy) for copy in copies]
        for copy in copies:
            copy()
        return []

    @staticmethod
    def _wait(futures: list[Future[None]]) -> None:
        errors = [f.exception() for f in futures]
        for error in errors:
            if error is not None:
                raise error

    def _allocate(self, chunks: Sequence[Chunk], source: KVSource) -> list[MemoryObj]:
        address_of = getattr(source, "address_of", None)
        objs: list[MemoryObj] = []
        for chunk in chunks:
            hint = address_of(chunk.start) if address_of is not None else None
            obj = self.storage.allocate(self.layout, chunk.num_tokens, hint)
            if obj is None:
                break
            objs.append(obj)
        return objs

    def _record_store(self, result: StoreResult, num_chunks: int) -> None:
        m = self.metrics
        m.stores.inc()
        m.stored_tokens.inc(result.stored_tokens)
        m.store_skipped_tokens.inc(result.skipped_tokens)
        m.store_dropped_tokens.inc(result.dropped_tokens)
        m.store_seconds.observe(result.seconds)
        nbytes = self.layout.chunk_bytes(result.stored_tokens)
        if self.storage.memory is not None:
            m.write_bytes.inc(nbytes, tier="memory")
        log.info(
            "Stored %d tokens (%d chunks, %.1f MiB) in %.2f ms (%s); %d already cached or skipped%s",
            result.stored_tokens,
            num_chunks,
            nbytes / 2**20,
            result.seconds * 1e3,
            _rate(nbytes, result.seconds),
            result.skipped_tokens,
            f", {result.dropped_tokens} dropped: memory full" if result.dropped_tokens else "",
        )

    # -- retrieve -----------------------------------------------------------------------------------
    def retrieve(
        self,
        tokens: Any,
        out: Any = None,
        *,
        skip_tokens: int = 0,
        mask: Any = None,
        cache_salt: str = "",
        segment: bool = False,
        new_array: Callable[[tuple[int, ...]], np.ndarray] | None = None,
    ) -> RetrieveResult:
        """Copy the KV of the longest cached prefix of ``tokens`` into ``out`` (or a new numpy array).

        ``out`` is a ``(layers, kv, n, heads, head_dim)`` array/tensor or a
        :class:`~kvtier.engine.transfer.KVDestination`; only chunks that fit in its ``n`` tokens are loaded.
        ``skip_tokens`` (or ``mask``) is a leading part the caller already has, as in :meth:`store`.
        ``new_array(shape)``: where the new array comes from when there is no ``out`` (the server hands out reused,
        resident buffers: fresh memory faults in at 0.5-1 GB/s here); its contents need not be zero.
        """
        started = time.perf_counter()
        num_tokens, skip, wanted = self._chunks_after(
            tokens, self._skip(tokens, skip_tokens, mask), cache_salt, segment
        )
        dest = as_destination(out, self.layout) if out is not None else None
        limit = getattr(dest, "num_tokens", num_tokens)
        wanted = [(c, k) for c, k in wanted if c.end <= limit]
        located = self._locate([c for c, _ in wanted], [k for _, k in wanted], reading=True)
        sources = located.sources
        asked = wanted
        wanted = wanted[: len(sources)]
        if dest is None:  # a new array for the located prefix; trimmed below if a chunk fails to read
            end = wanted[-1][0].end if wanted else 0
            shape = self.layout.chunk_shape(end)
            array = new_array(shape) if new_array else np.zeros(shape, self.layout.element.numpy_name)
            dest = ArrayKV(array, self.layout)

        pending: list[Future[None]] = []

        def copy_out(i: int, obj: MemoryObj) -> None:
            pending.extend(self._copy_all([partial(dest.write_from, obj, wanted[i][0].start, wanted[i][0].end)], dest))

        try:
            read = self.storage.read([k for _, k in wanted], sources, consume=copy_out)
        finally:
            self._wait(pending)  # every copy must be done before the chunks' references are dropped
        try:
            dest.synchronize()
        finally:
            for obj in read.objs:
                obj.unref()
        loaded = [c for c, _ in wanted[: len(read.objs)]]
        tiers = _tokens_by_tier(loaded, read.tiers)
        loaded_tokens = sum(tiers.values())
        hit = skip + loaded_tokens if loaded_tokens else 0
        kv = out if out is not None else dest.array[:, :, : loaded[-1].end if loaded else 0]
        misses = self._retrieve_misses(tokens, asked, located, len(loaded), min(num_tokens, limit), segment)
        result = RetrieveResult(hit, loaded_tokens, num_tokens, kv, dict(tiers), time.perf_counter() - started, misses)
        self._record_retrieve(result, segment, cache_salt)
        return result

    def acquire(
        self, tokens: Any, *, skip_tokens: int = 0, mask: Any = None, cache_salt: str = "", segment: bool = False
    ) -> Acquired:
        """The chunks of the longest cached prefix, by reference (no copy): the caller reads them in place
        (the server's shared-memory path) and must ``unref()`` each object when done."""
        started = time.perf_counter()
        num_tokens, skip, wanted = self._chunks_after(
            tokens, self._skip(tokens, skip_tokens, mask), cache_salt, segment
        )
        located = self._locate([c for c, _ in wanted], [k for _, k in wanted], reading=True)
        read = self.storage.read([k for _, k in wanted[: len(located.sources)]], located.sources)
        loaded = [c for c, _ in wanted[: len(read.objs)]]
        tiers = _tokens_by_tier(loaded, read.tiers)
        loaded_tokens = sum(tiers.values())
        hit = skip + loaded_tokens if loaded_tokens else 0
        misses = self._retrieve_misses(tokens, wanted, located, len(loaded), num_tokens, segment)
        seconds = time.perf_counter() - started
        result = RetrieveResult(hit, loaded_tokens, num_tokens, None, dict(tiers), seconds, misses)
        self._record_retrieve(result, segment, cache_salt)
        return Acquired(result, loaded, read.objs)

    def _retrieve_misses(
        self,
        tokens: Any,
        wanted: Sequence[tuple[Chunk, CacheKey]],
        located: Located,
        loaded: int,
        num_tokens: int,
        segment: bool,
    ) -> dict[str, int]:
        reports = self._misses(
            tokens, [c for c, _ in wanted], [k for _, k in wanted], located, loaded, num_tokens, segment
        )
        return miss_tokens(reports)

    def _record_retrieve(self, result: RetrieveResult, segment: bool, cache_salt: str) -> None:
        m = self.metrics
        if segment:
            m.segment_retrieved_tokens.inc(result.loaded_tokens)
        m.retrieves.inc()
        m.retrieve_tokens.inc(result.total_tokens)
        for tier, n in result.tier_tokens.items():
            m.hit_tokens.inc(n, tier=tier)
        memory_tokens = result.tier_tokens.get("memory", 0)
        if memory_tokens:
            m.read_bytes.inc(self.layout.chunk_bytes(memory_tokens), tier="memory")
        m.retrieve_seconds.observe(result.seconds)
        nbytes = self.layout.chunk_bytes(result.loaded_tokens)
        where = describe_tiers(result.tier_tokens)
        self._note_request(
            "retrieve", cache_salt, result.total_tokens, result.hit_tokens, result.tier_tokens, result.miss_tokens,
            result.seconds,
        )  # fmt: skip
        log.info(
            "Retrieved %d of %d tokens (%s) in %.2f ms (%s)%s",
            result.loaded_tokens,
            result.total_tokens,
            where,
            result.seconds * 1e3,
            _rate(nbytes, result.seconds),
            describe_misses(result.miss_tokens),
        )

    # -- prefetch and lifetime ----------------------------------------------------------------------
    def prefetch(self, tokens: Any, *, cache_salt: str = "", segment: bool = False) -> Future[int]:
        """Load the cached prefix of ``tokens`` from slower tiers into memory in the background.

        The future gives the prefix length now in memory or in a tier the next retrieve will read.
        """
        chunks, keys = self.chunk_keys(tokens, cache_salt, segment)
        return self._prefetcher.submit(self._prefetch, chunks, keys)

    def _prefetch(self, chunks: list[Chunk], keys: list[CacheKey]) -> int:
        sources = self._locate(chunks, keys).sources
        slow = [i for i, t in enumerate(sources) if t is not self.storage.memory]
        if not slow or self.storage.memory is None:
            return chunks[len(sources) - 1].end if sources else 0
        read = self.storage.read(keys[: len(sources)], sources)
        for obj in read.objs:
            obj.unref()
        return chunks[len(read.objs) - 1].end if read.objs else 0

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until background writes to slower tiers are done; False on timeout."""
        return self.storage.flush(timeout)

    def delete(self, tokens: Any, *, cache_salt: str = "", segment: bool = False) -> int:
        """Remove the chunks of ``tokens`` from every tier; return how many were present."""
        _, keys = self.chunk_keys(tokens, cache_salt, segment)
        return sum(self.storage.delete(k) for k in keys)

    def clear(self) -> int:
        """Remove every chunk from every tier (leases stay, their pins now hold nothing)."""
        return self.storage.clear()

    def close(self) -> None:
        """Finish or discard background work, release leases and tiers. Disk contents persist. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._prefetcher.shutdown(wait=True)
        if self._copiers is not None:
            self._copiers.shutdown(wait=True)
        self.leases.release_all()
        self.metrics.active_leases.remove_source(self._lease_gauge)
        if self._owns_storage:
            self.storage.close()

    def __enter__(self) -> CacheEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers ------------------------------------------------------------------------------------
    def _chunks_after(
        self, tokens: Any, skip: int, cache_salt: str, segment: bool
    ) -> tuple[int, int, list[tuple[Chunk, CacheKey]]]:
        """Prompt length, ``skip``, and the (chunk, key) pairs from ``skip`` on; expires leases."""
        self.leases.expire()
        chunks, keys = self.chunk_keys(tokens, cache_salt, segment)
        return _token_count(tokens), skip, [(c, k) for c, k in zip(chunks, keys, strict=True) if c.start >= skip]

    def _skip(self, tokens: Any, skip_tokens: int, mask: Any) -> int:
        """The leading tokens to skip, from ``skip_tokens`` or LMCache's ``mask``, checked: a multiple of
        ``chunk_size`` (or the whole prompt), within it."""
        num_tokens = _token_count(tokens)
        skip = skip_tokens if mask is None else self._skip_of_mask(mask, num_tokens)
        if mask is not None and skip_tokens:
            raise ValueError("give skip_tokens or a mask, not both")
        if not 0 <= skip <= num_tokens:
            raise ValueError(f"skip_tokens {skip} out of range for a prompt of {num_tokens} tokens")
        if skip % self.config.chunk_size and skip != num_tokens:
            raise ValueError(f"skip of {skip} tokens is not a multiple of chunk_size {self.config.chunk_size}")
        return skip

    @staticmethod
    def _skip_of_mask(mask: Any, num_tokens: int) -> int:
        flags = np.asarray(mask.detach().cpu().numpy() if hasattr(mask, "detach") else mask, dtype=bool)
        if flags.shape != (num_tokens,):
            raise ValueError(f"mask must have one entry per token ({num_tokens}), got shape {flags.shape}")
        skip = int(np.argmax(flags)) if flags.any() else num_tokens
        if not flags[skip:].all():
            raise ValueError("mask must be False...False then True...True")
        return skip


def _first_chunk_hash(tokens: Any, chunk_size: int) -> bytes | None:
    """The hash of the first ``chunk_size`` tokens as a client chunking at that size would key them."""
    encoded = token_bytes(tokens)[: chunk_size * 4]
    hashes = chained_hashes(encoded, chunk_size, include_partial=False)
    return hashes[0] if hashes else None


def _token_count(tokens: Any) -> int:
    return int(tokens.shape[0]) if hasattr(tokens, "shape") else len(tokens)


def _check_covers(source: Any, num_tokens: int, what: str) -> None:
    have = getattr(source, "num_tokens", None)
    if have is not None and have < num_tokens:
        raise LayoutError(f"{what} holds {have} tokens, fewer than the {num_tokens} tokens given")


def _rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e9:.2f} GB/s" if seconds > 0 and nbytes else "-"


def _tokens_by_tier(chunks: Sequence[Chunk], tier_names: Sequence[str]) -> Counter[str]:
    tiers = Counter[str]()
    for chunk, name in zip(chunks, tier_names, strict=True):
        tiers[name] += chunk.num_tokens
    return tiers
