"""Stores and loads off vLLM's step (``async_store``, ``enable_async_loading``), on threads of their own.

A store off the step copies the prompt's KV out of vLLM's blocks in the step (a memory-speed copy into a host
buffer of its own) and writes it to the cache on the store thread: vLLM may free or reuse the blocks at once, so
nothing is held back (no delayed frees: vLLM would spin through empty steps until they were reported, starving
the very thread that has to finish them of the GIL). With every buffer in use the store runs in the step.

A load off the step runs whole on the load thread: vLLM parks the request (WAITING_FOR_REMOTE_KVS) on its
allocated blocks until :meth:`AsyncTransfers.finished` reports it in ``finished_recving``; blocks it could not fill
are in the same pass's ``get_block_ids_with_load_errors`` (vLLM asks right after). While vLLM has nothing else to
run it steps without pause; an idle step gives the load thread a moment (:meth:`AsyncTransfers.idle`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from kvtier.integrations.vllm.layouts import HostBuffer

log = logging.getLogger("kvtier")
STORE_BUFFERS = 4  # stores written off the step at once; each holds one prompt's KV in host memory
IDLE_WAIT_SEC = 0.005  # how long an idle step waits for a load in flight


class AsyncTransfers:
    """The store and load threads, the store buffers, and which requests' loads are done. Called from vLLM's
    worker thread only; the jobs catch their own errors."""

    def __init__(self, new_buffer: Callable[[], HostBuffer]) -> None:
        self._store_thread = ThreadPoolExecutor(1, thread_name_prefix="kvtier-store")
        self._load_thread = ThreadPoolExecutor(1, thread_name_prefix="kvtier-load")
        self._free_buffers = [new_buffer() for _ in range(STORE_BUFFERS)]  # reused: fresh memory faults in slowly
        self._loads: dict[str, Future[set[int]]] = {}
        self._failed_blocks: set[int] = set()

    def store_buffer(self) -> HostBuffer | None:
        """A host buffer for a store to fill now and write off the step, or None while all are in use."""
        return self._free_buffers.pop() if self._free_buffers else None

    def write(self, buffer: HostBuffer, job: Callable[[], None]) -> None:
        """Run ``job`` (writing what ``buffer`` holds) on the store thread; the buffer is free again after it."""
        future = self._store_thread.submit(job)
        future.add_done_callback(lambda done: (_result(done, "store"), self._free_buffers.append(buffer)))

    def load(self, req_id: str, job: Callable[[], set[int]]) -> None:
        """``job`` loads the request's KV into its blocks and returns the blocks it could not fill."""
        self._loads[req_id] = self._load_thread.submit(job)

    def idle(self) -> None:
        """vLLM ran a step with nothing scheduled: let a load in flight have the interpreter for a moment."""
        if self._loads:
            wait(self._loads.values(), IDLE_WAIT_SEC, FIRST_COMPLETED)

    def finished(self) -> set[str]:
        """Requests whose loads are done since the last call."""
        received = {r for r, f in self._loads.items() if f.done()}
        for req_id in received:
            self._failed_blocks |= _result(self._loads.pop(req_id), f"load of request {req_id}") or set()
        return received

    def take_failed_blocks(self) -> set[int]:
        """Blocks of the loads :meth:`finished` reported that could not be filled."""
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def close(self) -> None:
        """Finish what was started: a store in flight completes, a load's request is gone with vLLM."""
        self._store_thread.shutdown(wait=True)
        self._load_thread.shutdown(wait=True)


def _result(future: Future, what: str):  # type: ignore[no-untyped-def,type-arg]
    try:
        return future.result()
    except Exception as exc:  # a job's own failure handling failed: a bug, but the KV is only a miss
        log.warning("kvtier: %s failed: %s", what, exc)
        return None
