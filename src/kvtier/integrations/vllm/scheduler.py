"""The scheduler-process half of the connector: how many prompt tokens kvtier has, and what each step loads
and stores. It only decides; the worker half moves the KV (see :mod:`kvtier.integrations.vllm.worker`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvtier.config import KVTierConfig
from kvtier.integrations.segment_io import SegmentFinder
from kvtier.integrations.vllm import compat
from kvtier.integrations.vllm.metadata import KVTierConnectorMetadata, LoadOp, SegmentHit, StoreOp
from kvtier.metrics import IntegrationMetrics

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

log = logging.getLogger("kvtier")
# (prompt or segment tokens, cache salt, segment?) -> tokens cached (the prefix, or of the segment), 0 on failure
Lookup = Callable[[list[int], str, bool], int]
# How long the scheduler waits for a lookup before answering "not yet" (vLLM then schedules other requests and
# asks again at its next step): a fast cache answers within it, a slow one never stalls the whole batch.
INLINE_LOOKUP_SEC = 0.02
# A decoder waiting for its prefiller's KV asks the cache again at most this often.
HANDOFF_POLL_SEC = 0.01


@dataclass(frozen=True, slots=True)
class Hit:
    """What the cache holds of a prompt: its cached prefix, and with blending on, each segment's cached tokens."""

    prefix: int
    segments: tuple[SegmentHit, ...] = ()

    @property
    def blendable(self) -> bool:
        """Some segment past the prefix is cached: the prompt can be blended."""
        return any(s.cached > 0 and s.end > self.prefix for s in self.segments)

    def first_blended(self) -> int:
        """Where blended (approximate) KV would start: the first cached segment token past the prefix."""
        return min(max(s.start, self.prefix) for s in self.segments if s.cached > 0 and s.end > self.prefix)


@dataclass(frozen=True, slots=True)
class _Match:
    """What :meth:`SchedulerSide.num_new_matched_tokens` told vLLM, kept until vLLM allocates the blocks."""

    hit: Hit
    start: int  # tokens vLLM has itself (its prefix cache): kvtier's load starts there
    load_async: bool


@dataclass(slots=True)
class _Admitted:
    """A request vLLM admitted that still owes a load (its first step) or a store (when its prompt is done)."""

    tokens: list[int]
    salt: str
    hit: Hit  # what was cached when it was admitted
    external: int  # tokens vLLM takes from kvtier in the first step (0: nothing to load)
    store: bool
    blend: bool  # the external tokens are produced by blending
    start: int = 0  # see _Match
    load_async: bool = False


class SchedulerSide:
    def __init__(
        self,
        config: KVTierConfig,
        *,
        lookup: Lookup,
        can_load: bool,
        can_save: bool,
        metrics: IntegrationMetrics,
        segments: SegmentFinder | None = None,
    ) -> None:
        """``segments``: where prompts' segments are, when blending is on (None: prefix caching only)."""
        self.chunk_size = config.chunk_size
        self.save_unfull_chunk = config.save_unfull_chunk
        self.lookup = lookup
        self.segments = segments
        self.can_load = can_load
        self.can_save = can_save
        self.async_store = config.async_store
        self.async_loading = config.enable_async_loading
        self.handoff_timeout_sec = config.handoff_timeout_sec
        self.save_decode = config.save_decode_cache and can_save
        self.metrics = metrics
        # All are emptied by request_finished; _matches also by update_state_after_alloc.
        self._matches: dict[str, _Match] = {}
        self._admitted: dict[str, _Admitted] = {}
        self._pending: dict[str, Future[Hit]] = {}
        self._due_loads: list[str] = []  # admitted with an asynchronous load not yet handed to the worker
        self._expected: dict[str, int] = {}  # tokens a producer's request will have in the cache once stored
        self._handoffs: dict[str, float] = {}  # a decoder's request waiting for its prefiller's KV: the deadline
        self._retry_at: dict[str, float] = {}
        self._decode_from: dict[str, int] = {}  # save_decode_cache: where a request's decode store starts
        self._decode_stores: list[StoreOp] = []  # finished requests' stores, for the next step's worker
        self._lookups = ThreadPoolExecutor(2, thread_name_prefix="kvtier-lookup")

    def num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        """(tokens beyond ``num_computed_tokens``, vLLM's own prefix cache, that kvtier will load; whether off the
        step). None while the lookup is still running (vLLM asks again next step; a lookup never waits longer than
        ``server_timeout_sec``, then it is a miss), or while a decoder waits for its prefiller's KV."""
        tokens = compat.prompt_tokens(request)
        if tokens is None or not (self.can_load or self.can_save):
            return 0, False
        # The hit is also what a producer need not store again, so it is looked up in every role.
        hit = self._hit(request, tokens)
        if hit is None:
            return None, False
        if not self.can_load:
            self._matches[request.request_id] = _Match(hit, num_computed_tokens, False)
            return 0, False
        # vLLM computes at least the last prompt token: its logits are the first output token. A blendable prompt
        # is produced up to it (the cached prefix and segments loaded, the rest computed by the worker's blender).
        end = len(tokens) - 1 if hit.blendable else min(hit.prefix, len(tokens) - 1)
        external = max(0, end - num_computed_tokens)
        load_async = self.async_loading and external > 0 and not hit.blendable  # the blender runs in the step
        self._matches[request.request_id] = _Match(hit, num_computed_tokens, load_async)
        return external, load_async

    def _hit(self, request: Request, tokens: list[int]) -> Hit | None:
        req_id = request.request_id
        future = self._pending.get(req_id)
        if future is None:
            if time.monotonic() < self._retry_at.get(req_id, 0.0):
                return None
            future = self._pending[req_id] = self._lookups.submit(self._look_up, tokens, compat.cache_salt(request))
        try:
            hit = future.result(timeout=INLINE_LOOKUP_SEC)
        except FutureTimeout:
            return None
        except Exception as exc:  # the lookups catch their own failures: this is a bug, but only a miss
            log.warning("kvtier: lookup for request %s failed: %s", req_id, exc)
            hit = Hit(0)
        del self._pending[req_id]
        if self._awaits_handoff(request, tokens, hit):
            self._retry_at[req_id] = time.monotonic() + HANDOFF_POLL_SEC
            return None
        self._retry_at.pop(req_id, None)
        self._handoffs.pop(req_id, None)
        return hit

    def _awaits_handoff(self, request: Request, tokens: list[int], hit: Hit) -> bool:
        """A decoder's request whose prefiller said how much of it it stored (``kv_transfer_params``): not there
        yet, and the wait (``handoff_timeout_sec``) not over. A prefiller stores off its step, so its answer can
        reach the decoder before its KV reaches the cache."""
        promised = handoff_tokens(compat.transfer_params(request))
        if not self.can_load or promised is None or hit.prefix >= min(promised, self._storable(len(tokens))):
            return False
        req_id = request.request_id
        deadline = self._handoffs.setdefault(req_id, time.monotonic() + self.handoff_timeout_sec)
        if time.monotonic() < deadline:
            return True
        log.warning("kvtier: request %s: its prefiller's KV did not arrive in %.1f s (%d of %d tokens cached); "
                    "vLLM computes the rest", req_id, self.handoff_timeout_sec, hit.prefix, promised)  # fmt: skip
        self.metrics.handoff_timeouts.inc()
        return False

    def _look_up(self, tokens: list[int], salt: str) -> Hit:
        """The prompt's cached prefix, and (blending) each of its segments' cached tokens."""
        prefix = self.lookup(tokens, salt, False)
        if self.segments is None:
            return Hit(prefix)
        found = []
        for piece in self.segments.find(tokens):
            cached = self.lookup(tokens[piece.start : piece.end], salt, True) if piece.end > prefix else -1
            found.append(SegmentHit(piece.start, piece.end, cached))
        return Hit(prefix, tuple(found))

    def after_alloc(self, request: Request, num_external_tokens: int) -> None:
        match = self._matches.pop(request.request_id, None)
        if match is None and request.request_id in self._admitted:
            return  # vLLM allocates again once an off-step load is done, without a lookup: it is admitted already
        match = match or _Match(Hit(0), 0, False)
        hit = match.hit
        tokens = compat.prompt_tokens(request)
        if tokens is None:
            return
        self.metrics.requests.inc()
        self.metrics.prompt_tokens.inc(len(tokens))
        self.metrics.reused_tokens.inc(num_external_tokens)
        blend = bool(num_external_tokens) and hit.blendable
        missing = any(0 <= s.cached < s.end - s.start for s in hit.segments)
        store = self.can_save and (self._prefix_end(tokens, hit, blend) > self._aligned(hit.prefix) or missing)
        if self.can_save:
            self._expected[request.request_id] = max(self._prefix_end(tokens, hit, blend), self._aligned(hit.prefix))
        if self.save_decode and not blend:  # blended KV is approximate: nothing computed after it is a prefix
            self._decode_from[request.request_id] = self._aligned(self._expected[request.request_id])
        if num_external_tokens or store:
            salt = compat.cache_salt(request)
            load_async = match.load_async and num_external_tokens > 0
            admitted = _Admitted(tokens, salt, hit, num_external_tokens, store, blend, match.start, load_async)
            self._admitted[request.request_id] = admitted
            if load_async:
                self._due_loads.append(request.request_id)
        else:  # a preempted request admitted again with nothing left to do
            self._admitted.pop(request.request_id, None)

    def build_meta(self, scheduler_output: SchedulerOutput) -> KVTierConnectorMetadata:
        meta = KVTierConnectorMetadata(idle=not scheduler_output.num_scheduled_tokens, stores=self._decode_stores)
        self._decode_stores = []
        for req_id in self._due_loads:  # their requests wait in vLLM, unscheduled, until the load is done
            admitted = self._admitted.get(req_id)
            if admitted is not None and admitted.external:
                done = admitted.start + admitted.external
                meta.loads.append(self._load_op(req_id, admitted, done, scheduler_output))
                admitted.external = 0
        self._due_loads.clear()
        computed = compat.computed_before_step(scheduler_output)
        for req_id, num_scheduled in scheduler_output.num_scheduled_tokens.items():
            admitted = self._admitted.get(req_id)
            if admitted is None:
                continue
            done = computed[req_id]
            if admitted.external:
                meta.loads.append(self._load_op(req_id, admitted, done, scheduler_output))
                admitted.external = 0
            # With chunked prefill the prompt takes several steps: store once, when its last token is computed.
            if admitted.store and done + num_scheduled >= len(admitted.tokens):
                meta.stores.append(self._store_op(req_id, admitted, scheduler_output))
                admitted.store = False
            if not admitted.store:
                del self._admitted[req_id]
        return meta

    def finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Forget the request (finished, aborted, or never scheduled): nothing is kept for it after this. Returns
        vLLM's ``request_finished`` answer: whether its blocks (``block_ids``) must stay allocated (only while a
        decode store copies them out, in the next step; a prompt's store copies them in its own step), and the
        ``kv_transfer_params`` for a disaggregation proxy when a prefiller's request asked for remote decode: how
        many tokens of it the cache will hold, for the decoder to wait for."""
        req_id = request.request_id
        decode = self._decode_store(request, block_ids)
        if decode is not None:
            self._decode_stores.append(decode)
        for state in (self._matches, self._admitted, self._handoffs, self._retry_at, self._decode_from):
            state.pop(req_id, None)  # type: ignore[attr-defined]
        pending = self._pending.pop(req_id, None)
        if pending is not None:
            pending.cancel()
        expected = self._expected.pop(req_id, None)
        params = None
        if expected is not None and compat.transfer_params(request).get("do_remote_decode"):
            params = {HANDOFF_KEY: {"cached_tokens": expected}}
        return decode is not None, params

    def _decode_store(self, request: Request, block_ids: list[int]) -> StoreOp | None:
        """With ``save_decode_cache``: the store of a finished request's whole chunks past those its prompt stored
        (the output's KV, and the prompt's last partial chunk now completed by it), if any."""
        start = self._decode_from.get(request.request_id)
        tokens = compat.generated_kv_tokens(request) if start is not None else None
        end = self._storable(len(tokens)) if tokens is not None else 0
        if start is None or end <= start:
            return None
        return StoreOp(
            req_id=request.request_id,
            tokens=tokens,
            block_ids=list(block_ids),
            skip=start,
            cache_salt=compat.cache_salt(request),
            prefix_end=end,
            background=self.async_store,
            holds_blocks=True,
        )

    def close(self) -> None:
        self._lookups.shutdown(wait=False, cancel_futures=True)

    def _load_op(self, req_id: str, admitted: _Admitted, done: int, output: SchedulerOutput) -> LoadOp:
        start = done - admitted.external  # vLLM's own prefix cache covers [0, start)
        read_end = min(admitted.hit.prefix, -(-done // self.chunk_size) * self.chunk_size)
        return LoadOp(
            req_id=req_id,
            tokens=admitted.tokens if admitted.blend else admitted.tokens[:read_end],
            block_ids=compat.block_ids(output, req_id),
            start=start,
            end=done,
            skip=self._aligned(start),
            cache_salt=admitted.salt,
            num_prompt_tokens=len(admitted.tokens),
            blend=admitted.blend,
            segments=admitted.hit.segments if admitted.blend else (),
            background=admitted.load_async,
        )

    def _store_op(self, req_id: str, admitted: _Admitted, output: SchedulerOutput) -> StoreOp:
        return StoreOp(
            req_id=req_id,
            tokens=admitted.tokens,
            block_ids=compat.block_ids(output, req_id),
            skip=self._aligned(admitted.hit.prefix),
            cache_salt=admitted.salt,
            prefix_end=self._prefix_end(admitted.tokens, admitted.hit, admitted.blend),
            segments=admitted.hit.segments,
            background=self.async_store,
        )

    def _prefix_end(self, tokens: list[int], hit: Hit, blend: bool) -> int:
        """How much of the prompt is stored as prefix chunks: whole chunks (unless ``save_unfull_chunk``), and, when
        blended, none past the first blended token (approximate KV must never be a later prefix hit)."""
        if blend:
            return self._aligned(hit.first_blended())
        return self._storable(len(tokens))

    def _aligned(self, tokens: int) -> int:
        return tokens - tokens % self.chunk_size

    def _storable(self, num_tokens: int) -> int:
        """How much of a prompt kvtier keeps: whole chunks, unless ``save_unfull_chunk``."""
        return num_tokens if self.save_unfull_chunk else self._aligned(num_tokens)


HANDOFF_KEY = "kvtier"  # kvtier's entry in kv_transfer_params


def handoff_tokens(params: dict[str, Any]) -> int | None:
    """The tokens a prefiller's ``kv_transfer_params`` say it stored, if they say (a hostile value: None)."""
    entry = params.get(HANDOFF_KEY)
    tokens = entry.get("cached_tokens") if isinstance(entry, dict) else None
    return tokens if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 0 else None
