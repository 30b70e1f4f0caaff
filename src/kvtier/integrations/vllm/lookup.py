"""Prefix lookups from vLLM's scheduler process into the worker that holds an in-process cache.

In in-process mode the cache engine (its memory tier) lives in the worker process, but vLLM asks the
scheduler, another process, how many tokens are cached. The worker answers over a local ZMQ socket; a
slow or absent worker is a miss (0), never an error, as for every backend.
"""

from __future__ import annotations

import logging
import struct
import tempfile
import threading
from pathlib import Path

import numpy as np
import zmq

from kvtier.integrations.backend import KVBackend
from kvtier.metrics import IntegrationMetrics

log = logging.getLogger("kvtier")
_HIT = struct.Struct("<q")
POLL_MS = 200  # how often the server thread checks for stop()
PROMPT, SEGMENT = b"p", b"s"  # what the tokens of a lookup are


def lookup_address(engine_id: str) -> str:
    """The socket of one vLLM engine's worker (vLLM gives the scheduler and the workers the same engine id)."""
    return f"ipc://{Path(tempfile.gettempdir()) / f'kvtier-lookup-{engine_id}.sock'}"


class LookupServer:
    """Answers ``lookup(tokens, cache_salt, segment)`` for a backend, on a thread of the worker."""

    def __init__(self, backend: KVBackend, address: str) -> None:
        self.backend = backend
        self.address = address
        self._context = zmq.Context.instance()
        self._socket = self._context.socket(zmq.REP)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(address)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="kvtier-lookup", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self._socket.poll(POLL_MS):
                continue
            salt, tokens, kind = self._socket.recv_multipart()
            try:
                ids = np.frombuffer(tokens, dtype=np.int64)
                hit = self.backend.lookup(ids, cache_salt=salt.decode(), segment=kind == SEGMENT)
            except Exception:  # a REP socket must answer every request, or it can never receive again
                log.exception("kvtier lookup failed in the worker")
                hit = 0
            self._socket.send(_HIT.pack(hit))
        self._socket.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5 * POLL_MS / 1000)


class LookupClient:
    """The scheduler's side: one request at a time, bounded by ``timeout`` seconds."""

    def __init__(self, address: str, timeout: float, metrics: IntegrationMetrics) -> None:
        self.address = address
        self.timeout_ms = max(1, int(timeout * 1000))
        self.metrics = metrics
        self._context = zmq.Context.instance()
        self._socket = self._connect()

    def _connect(self) -> zmq.Socket:
        socket = self._context.socket(zmq.REQ)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.RCVTIMEO, self.timeout_ms)
        socket.setsockopt(zmq.SNDTIMEO, self.timeout_ms)
        socket.connect(self.address)
        return socket

    def lookup(self, tokens: list[int], *, cache_salt: str = "", segment: bool = False) -> int:
        try:
            ids = np.asarray(tokens, dtype=np.int64).tobytes()
            self._socket.send_multipart([cache_salt.encode(), ids, SEGMENT if segment else PROMPT])
            return int(_HIT.unpack(self._socket.recv())[0])
        except zmq.ZMQError as exc:
            # A REQ socket that missed its reply cannot send again: start over with a fresh one.
            self._socket.close()
            self._socket = self._connect()
            self.metrics.backend_errors.inc(op="lookup")
            log.warning("kvtier lookup in the worker failed (%s): treating it as a miss", exc)
            return 0

    def close(self) -> None:
        self._socket.close()
