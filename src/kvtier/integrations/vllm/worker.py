"""The worker-process half of the connector: moves KV between vLLM's paged cache and the kvtier backend, as
the scheduler's metadata for the step says. Loads run before the forward, stores after it: in the step, or (an
op marked ``background``) on threads of their own, reported to vLLM when done (:mod:`.transfers`)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial

import torch

from kvtier.engine.results import describe_tiers
from kvtier.integrations.backend import KVBackend, Loaded
from kvtier.integrations.segment_io import load_segments, store_segments
from kvtier.integrations.vllm.blending import WorkerBlender
from kvtier.integrations.vllm.layouts import PagedKV, PagedLayout, PagedTransfer, blocks_of, slot_mapping
from kvtier.integrations.vllm.metadata import KVTierConnectorMetadata, LoadOp, StoreOp
from kvtier.integrations.vllm.transfers import AsyncTransfers
from kvtier.memory.layout import KVLayout
from kvtier.memory.pool import populate_in_background
from kvtier.tokens.segments import Segment

log = logging.getLogger("kvtier")


@dataclass(slots=True)
class TransferStats:
    """What the worker moved since vLLM last asked (see :mod:`kvtier.integrations.vllm.stats`)."""

    loads: int = 0
    loaded_tokens: int = 0
    load_failed_tokens: int = 0
    load_seconds: float = 0.0
    stores: int = 0
    stored_tokens: int = 0
    store_seconds: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in self.__slots__}  # type: ignore[attr-defined]


class WorkerSide:
    def __init__(
        self, backend: KVBackend, layout: KVLayout, block_size: int, blender: WorkerBlender | None = None
    ) -> None:
        """``blender``: computes the blended tokens of blended prompts (blending on), and turns segments' keys."""
        self.backend = backend
        self.layout = layout
        self.block_size = block_size  # the scheduler's: the unit of the block ids in the metadata
        self.blender = blender
        self.transfer: PagedTransfer | None = None
        self._load_transfer: PagedTransfer | None = None  # the load thread's own (it reuses its host buffer)
        self._background: AsyncTransfers | None = None
        self.stats = TransferStats()
        self._stats_lock = threading.Lock()  # off-step transfers count too
        self._failed_blocks: set[int] = set()
        self._copied: set[str] = set()  # finished requests whose decode stores copied their blocks out

    def register(self, kv_caches: dict[str, torch.Tensor], paged_layout: PagedLayout) -> None:
        paged = PagedKV.from_layers(list(kv_caches.values()), paged_layout)
        expected = self.layout.chunk_shape(1)
        dtype = str(paged.dtype).removeprefix("torch.")
        if paged.staging_shape(1) != expected or dtype != self.layout.dtype:
            raise ValueError(
                f"vLLM's KV cache {paged.staging_shape(1)} {dtype} does not match the model's layout {expected} "
                f"{self.layout.dtype}"
            )
        self.transfer = PagedTransfer(paged)
        self._load_transfer = PagedTransfer(paged)
        self._background = AsyncTransfers(self.transfer.new_host_buffer)
        if paged.device.type == "cpu":
            populate_in_background(_storages(kv_caches.values()), "kvtier-populate-vllm-kv")
        log.info(
            "kvtier: %d attention layers, %s layout (%s), block size %d, %s",
            len(kv_caches),
            paged_layout.value,
            tuple(next(iter(kv_caches.values())).shape),
            paged.block_size,
            paged.device,
        )

    def load(self, meta: KVTierConnectorMetadata) -> None:
        for op in meta.loads:
            if op.background:
                self._off_step().load(op.req_id, partial(self._load, op, self._paged(self._load_transfer)))
            elif op.blend:
                self._blend_load(op)
            else:
                self._failed_blocks |= self._load(op, self._paged(self.transfer))

    def store(self, meta: KVTierConnectorMetadata) -> None:
        transfer = self._paged(self.transfer)
        for op in meta.stores:
            started = time.perf_counter()
            buffer = self._off_step().store_buffer() if op.background else None
            host = transfer.host_tensor(len(op.tokens), buffer)
            try:
                self._gather(op, transfer, host)  # out of vLLM's blocks in the step: they may be reused after it
            finally:  # a finished request's blocks go back to vLLM whatever happened to its store
                if op.holds_blocks:
                    self._copied.add(op.req_id)
            if buffer is None:  # written in the step (also when every off-step buffer is taken)
                self._store(op, host, started)
            else:
                in_step = time.perf_counter() - started
                self._off_step().write(buffer, partial(self._store, op, host, started, in_step))
        if meta.idle:
            self._off_step().idle()

    def finished_loads(self) -> set[str]:
        """vLLM's ``get_finished``: requests whose off-step loads are done (they may run now)."""
        return self._background.finished() if self._background is not None else set()

    def finished_stores(self) -> set[str]:
        """vLLM's ``get_finished``: finished requests whose decode stores copied their KV out of their blocks."""
        copied, self._copied = self._copied, set()
        return copied

    def take_failed_blocks(self) -> set[int]:
        off_step = self._background.take_failed_blocks() if self._background is not None else set()
        failed, self._failed_blocks = self._failed_blocks | off_step, set()
        return failed

    def _off_step(self) -> AsyncTransfers:
        if self._background is None:
            raise RuntimeError("kvtier: vLLM did not register its KV caches with the connector")
        return self._background

    def take_stats(self) -> TransferStats:
        with self._stats_lock:
            stats, self.stats = self.stats, TransferStats()
        return stats

    @staticmethod
    def _paged(transfer: PagedTransfer | None) -> PagedTransfer:
        if transfer is None:
            raise RuntimeError("kvtier: vLLM did not register its KV caches with the connector")
        return transfer

    def _load(self, op: LoadOp, transfer: PagedTransfer) -> set[int]:
        """Load ``op`` into vLLM's blocks; the blocks it could not fill (vLLM recomputes them)."""
        started = time.perf_counter()
        host = transfer.host_tensor(len(op.tokens))
        loaded = self.backend.retrieve(op.tokens, host, skip_tokens=op.skip, cache_salt=op.cache_salt)
        good_end = max(op.start, min(loaded.loaded_end, op.end))
        if good_end > op.start:
            transfer.scatter_from_host(slot_mapping(op.block_ids, self.block_size, op.start, good_end), host, op.start)
        failed: set[int] = set()
        if good_end < op.end:
            # Fewer tokens than promised (evicted, corrupt, server gone): vLLM recomputes from these blocks.
            failed = blocks_of(op.block_ids, self.block_size, good_end, op.end)
            self.backend.metrics.load_errors.inc()
        self._record_load(op, loaded, good_end - op.start, time.perf_counter() - started)
        return failed

    def _blend_load(self, op: LoadOp) -> None:
        """Produce positions ``[start, end)`` (all but the last prompt token) by blending: vLLM's own prefix
        ``[0, start)`` and the cached prefix are exact, the cached segments are loaded at their positions, the rest
        is computed by the blender; then into vLLM's blocks."""
        assert self.blender is not None
        transfer = self._paged(self.transfer)
        started = time.perf_counter()
        n = op.num_prompt_tokens
        host = transfer.host_tensor(n)
        if op.start:  # what vLLM's own prefix cache has: exact, and not in kvtier necessarily
            transfer.gather_to_host(slot_mapping(op.block_ids, self.block_size, 0, op.start), host, 0)
        loaded = self.backend.retrieve(op.tokens, host, skip_tokens=op.skip, cache_salt=op.cache_salt)
        exact = min(max(op.start, loaded.loaded_end), op.end - 1)
        tiers = dict(loaded.tier_tokens)
        pieces = [Segment(s.start, s.end) for s in op.segments]
        reused, _ = load_segments(
            self.backend, self.blender.rotary, op.tokens, host, pieces, exact, tiers, op.cache_salt
        )
        if reused is None:
            reused = torch.zeros(n, dtype=torch.bool)
        kv = host[:, :, : op.end]  # vLLM computes the last token itself
        blended = self.blender.blend(op.tokens[: op.end], kv, exact, reused[: op.end])
        transfer.scatter_from_host(slot_mapping(op.block_ids, self.block_size, op.start, op.end), host, op.start)
        seconds = time.perf_counter() - started
        with self._stats_lock:
            self.stats.loads += 1
            self.stats.loaded_tokens += op.end - op.start
            self.stats.load_seconds += seconds
        self.backend.metrics.blended_prompts.inc()
        self.backend.metrics.recomputed_tokens.inc(blended.recomputed_tokens)
        log.info(
            "kvtier: request %s: Retrieved %d tokens (%s; %d segments, %d recomputed), blended %d tokens in %.1f ms; "
            "vLLM had %d, computes 1",
            op.req_id,
            sum(tiers.values()),
            describe_tiers(tiers, empty="none found"),
            sum(1 for s in op.segments if s.cached > 0 and s.end > exact),
            blended.recomputed_tokens,
            op.end - op.start,
            seconds * 1000,
            op.start,
        )

    def _gather(self, op: StoreOp, transfer: PagedTransfer, host: torch.Tensor) -> None:
        """Copy what ``op`` stores out of vLLM's blocks into ``host``: its prefix chunks, and its segments."""
        if op.prefix_end > op.skip:
            transfer.gather_to_host(slot_mapping(op.block_ids, self.block_size, op.skip, op.prefix_end), host, op.skip)
        for piece in op.segments if self.blender is not None else ():
            transfer.gather_to_host(
                slot_mapping(op.block_ids, self.block_size, piece.start, piece.end), host, piece.start
            )

    def _store(self, op: StoreOp, host: torch.Tensor, started: float, in_step: float | None = None) -> None:
        """Write the KV :meth:`_gather` put in ``host`` to the cache; ``in_step``: the seconds the step spent on
        it (the copy out of the blocks), when the write runs off the step."""
        stored = 0
        if op.prefix_end > op.skip:
            prefix = op.tokens[: op.prefix_end]
            kv = host[:, :, : op.prefix_end]
            stored += self.backend.store(prefix, kv, skip_tokens=op.skip, cache_salt=op.cache_salt)
        if op.segments and self.blender is not None:
            stored += self._store_segments(op, host)
        seconds = time.perf_counter() - started
        with self._stats_lock:
            self.stats.stores += 1
            self.stats.stored_tokens += stored
            self.stats.store_seconds += seconds
        log.info(
            "kvtier: request %s: Stored %d tokens (%d already cached) of a %d-token %s in %.1f ms%s",
            op.req_id,
            stored,
            op.skip,
            len(op.tokens),
            "prompt and output" if op.holds_blocks else "prompt",
            seconds * 1000,
            "" if in_step is None else f" (off the step; {in_step * 1000:.1f} ms in it)",
        )

    def _store_segments(self, op: StoreOp, host: torch.Tensor) -> int:
        assert self.blender is not None

        def kv_of(piece: Segment) -> torch.Tensor:
            return host[:, :, piece.start : piece.end]  # gathered by _gather

        pieces = [Segment(s.start, s.end) for s in op.segments]
        hits = [s.cached for s in op.segments]
        return store_segments(self.backend, self.blender.rotary, op.tokens, pieces, hits, kv_of, op.cache_salt)

    def _record_load(self, op: LoadOp, loaded: Loaded, num_loaded: int, seconds: float) -> None:
        with self._stats_lock:
            self.stats.loads += 1
            self.stats.loaded_tokens += num_loaded
            self.stats.load_failed_tokens += op.end - op.start - num_loaded
            self.stats.load_seconds += seconds
        tiers = describe_tiers(loaded.tier_tokens, empty="none found")
        failed = op.end - op.start - num_loaded
        log.info(
            "kvtier: request %s: Retrieved %d of %d prompt tokens (%s) in %.1f ms (%.1f ms from kvtier, then into "
            "vLLM's blocks); vLLM had %d, computes %d%s%s",
            op.req_id,
            num_loaded,
            op.num_prompt_tokens,
            tiers,
            seconds * 1000,
            loaded.seconds * 1000,
            op.start,
            op.num_prompt_tokens - op.start - num_loaded,
            f" (load of {failed} promised tokens failed: vLLM recomputes them)" if failed else "",
            " (off the step)" if op.background else "",
        )

    def close(self) -> None:
        if self._background is not None:
            self._background.close()  # a store in flight completes before the backend goes
        self.backend.close()


def _storages(tensors: Iterable[torch.Tensor]) -> list[tuple[int, int]]:
    """The distinct memory regions under ``tensors`` (vLLM's layers may be views of one buffer)."""
    regions = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sorted(regions.items())
