"""The scheduler-process half of the connector: how many prompt tokens kvtier has, and what each step loads
and stores. It only decides; the worker half moves the KV (see :mod:`kvtier.integrations.vllm.worker`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvtier.config import KVTierConfig
from kvtier.integrations.vllm import compat
from kvtier.integrations.vllm.metadata import KVTierConnectorMetadata, LoadOp, StoreOp
from kvtier.metrics import IntegrationMetrics

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

log = logging.getLogger("kvtier")
Lookup = Callable[[list[int], str], int]  # (prompt tokens, cache salt) -> cached prefix length, 0 on failure
# How long the scheduler waits for a lookup before answering "not yet" (vLLM then schedules other requests and
# asks again at its next step): a fast cache answers within it, a slow one never stalls the whole batch.
INLINE_LOOKUP_SEC = 0.02


@dataclass(slots=True)
class _Admitted:
    """A request vLLM admitted that still owes a load (its first step) or a store (when its prompt is done)."""

    tokens: list[int]
    salt: str
    hit: int  # cached prefix length found when it was admitted
    external: int  # tokens vLLM takes from kvtier in the first step (0: nothing to load)
    store: bool


class SchedulerSide:
    def __init__(
        self,
        config: KVTierConfig,
        *,
        lookup: Lookup,
        can_load: bool,
        can_save: bool,
        metrics: IntegrationMetrics,
    ) -> None:
        self.chunk_size = config.chunk_size
        self.save_unfull_chunk = config.save_unfull_chunk
        self.lookup = lookup
        self.can_load = can_load
        self.can_save = can_save
        self.metrics = metrics
        # All are emptied by request_finished; _hits also by update_state_after_alloc.
        self._hits: dict[str, int] = {}
        self._admitted: dict[str, _Admitted] = {}
        self._pending: dict[str, Future[int]] = {}
        self._lookups = ThreadPoolExecutor(2, thread_name_prefix="kvtier-lookup")

    def num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> int | None:
        """Tokens beyond ``num_computed_tokens`` (vLLM's own prefix cache) that kvtier will load; None while the
        lookup is still running (vLLM asks again next step; a lookup never waits longer than
        ``server_timeout_sec``, then it is a miss)."""
        tokens = compat.prompt_tokens(request)
        if tokens is None or not (self.can_load or self.can_save):
            return 0
        # The hit is also what a producer need not store again, so it is looked up in every role.
        hit = self._hit(request.request_id, tokens, compat.cache_salt(request))
        if hit is None:
            return None
        self._hits[request.request_id] = hit
        if not self.can_load:
            return 0
        # vLLM computes at least the last prompt token: its logits are the first output token.
        return max(0, min(hit, len(tokens) - 1) - num_computed_tokens)

    def _hit(self, req_id: str, tokens: list[int], salt: str) -> int | None:
        future = self._pending.get(req_id)
        if future is None:
            future = self._pending[req_id] = self._lookups.submit(self.lookup, tokens, salt)
        try:
            hit = future.result(timeout=INLINE_LOOKUP_SEC)
        except FutureTimeout:
            return None
        except Exception as exc:  # the lookups catch their own failures: this is a bug, but only a miss
            log.warning("kvtier: lookup for request %s failed: %s", req_id, exc)
            hit = 0
        del self._pending[req_id]
        return hit

    def after_alloc(self, request: Request, num_external_tokens: int) -> None:
        hit = self._hits.pop(request.request_id, 0)
        tokens = compat.prompt_tokens(request)
        if tokens is None:
            return
        self.metrics.requests.inc()
        self.metrics.prompt_tokens.inc(len(tokens))
        self.metrics.reused_tokens.inc(num_external_tokens)
        store = self.can_save and self._storable(len(tokens)) > self._aligned(hit)
        if num_external_tokens or store:
            self._admitted[request.request_id] = _Admitted(
                tokens, compat.cache_salt(request), hit, num_external_tokens, store
            )
        else:  # a preempted request admitted again with nothing left to do
            self._admitted.pop(request.request_id, None)

    def build_meta(self, scheduler_output: SchedulerOutput) -> KVTierConnectorMetadata:
        meta = KVTierConnectorMetadata()
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

    def finished(self, request: Request) -> None:
        """Forget the request (finished, aborted, or never scheduled): nothing is kept for it after this."""
        self._hits.pop(request.request_id, None)
        self._admitted.pop(request.request_id, None)
        pending = self._pending.pop(request.request_id, None)
        if pending is not None:
            pending.cancel()

    def close(self) -> None:
        self._lookups.shutdown(wait=False, cancel_futures=True)

    def _load_op(self, req_id: str, admitted: _Admitted, done: int, output: SchedulerOutput) -> LoadOp:
        start = done - admitted.external  # vLLM's own prefix cache covers [0, start)
        read_end = min(admitted.hit, -(-done // self.chunk_size) * self.chunk_size)
        return LoadOp(
            req_id=req_id,
            tokens=admitted.tokens[:read_end],
            block_ids=compat.block_ids(output, req_id),
            start=start,
            end=done,
            skip=self._aligned(start),
            cache_salt=admitted.salt,
            num_prompt_tokens=len(admitted.tokens),
        )

    def _store_op(self, req_id: str, admitted: _Admitted, output: SchedulerOutput) -> StoreOp:
        return StoreOp(
            req_id=req_id,
            tokens=admitted.tokens[: self._storable(len(admitted.tokens))],
            block_ids=compat.block_ids(output, req_id),
            skip=self._aligned(admitted.hit),
            cache_salt=admitted.salt,
        )

    def _aligned(self, tokens: int) -> int:
        return tokens - tokens % self.chunk_size

    def _storable(self, num_tokens: int) -> int:
        """How much of a prompt kvtier keeps: whole chunks, unless ``save_unfull_chunk``."""
        return num_tokens if self.save_unfull_chunk else self._aligned(num_tokens)
