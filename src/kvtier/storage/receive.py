"""Receiving values from a store's socket with one copy, by the kernel, into buffers that are reused.

The remote stores' client libraries (redis-py, pymemcache) copy each value two or three times on the way in and
allocate fresh memory for it (measured for 32 MiB values: redis-py ~0.4 GB/s, pymemcache ~0.55 GB/s, against
1-3 GB/s for the same replies received into ready buffers over a plain socket). The tiers therefore send their read
commands on the library's pooled connection and read the replies here.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import numpy as np

READ_SIZE = 1 << 16
MAX_LINE = 1 << 16  # a reply line (a header before a value, a status): far shorter in every protocol used here
# No store used here sends a larger value (memcached's -I is at most 1 GiB, Redis' proto-max-bulk-len 512 MiB by
# default): a larger announced size is a broken or hostile server, refused before any memory is taken for it.
MAX_VALUE = 1 << 31
# Idle buffers kept: a 4096-token Llama-8B prompt (512 MiB of KV in 16 chunks) with its chunk headers and reply
# framing, so that reading the same shape again faults in nothing.
IDLE_BUFFER_BYTES = 576 << 20


class ReceiveBuffers:
    """Receive buffers, each reused once the value read into it is dropped: fresh memory is slow to fault in
    (here 0.5-6 GB/s, against ~10 GB/s for copies between resident buffers). Keeps at most ``max_idle_bytes``.
    Subclasses prepare a new buffer (:meth:`_new`) and let go of one (:meth:`_discard`), e.g. registering it with
    a transfer engine."""

    def __init__(self, max_idle_bytes: int = IDLE_BUFFER_BYTES) -> None:
        self.max_idle_bytes = max_idle_bytes
        self._idle: dict[int, list[np.ndarray]] = {}
        self._idle_bytes = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> memoryview:
        with self._lock:
            idle = self._idle.get(nbytes)
            if idle:
                self._idle_bytes -= nbytes
            buffer = idle.pop() if idle else None
        if buffer is None:
            buffer = self._new(nbytes)
        value = buffer[:]  # handed out; when the last reference to it goes, the buffer is idle again
        weakref.finalize(value, self._give, buffer)
        return memoryview(value)

    def _new(self, nbytes: int) -> np.ndarray:
        return np.empty(nbytes, np.uint8)  # numpy backs large arrays with transparent huge pages

    def _discard(self, buffer: np.ndarray) -> None:
        """``buffer`` is not kept (it is freed when the last reference to it goes)."""

    def _give(self, buffer: np.ndarray) -> None:
        with self._lock:
            kept = self._idle_bytes + buffer.nbytes <= self.max_idle_bytes
            if kept:
                self._idle.setdefault(buffer.nbytes, []).append(buffer)
                self._idle_bytes += buffer.nbytes
        if not kept:
            self._discard(buffer)


class SocketReader:
    """Reply lines and values from a socket with nothing else left to read on it (a connection just taken from
    a pool, the command just sent). Raises ConnectionError when the server closes it, TimeoutError on the
    socket's timeout, ValueError on a malformed reply."""

    def __init__(self, sock: Any, buffers: ReceiveBuffers) -> None:
        self._sock = sock
        self._buffers = buffers
        self._buf = bytearray()
        self._pos = 0

    def line(self) -> bytes:
        """The next line, without its CRLF."""
        while (end := self._buf.find(b"\r\n", self._pos)) < 0:
            if len(self._buf) - self._pos > MAX_LINE:
                raise ValueError("reply line too long")
            del self._buf[: self._pos]
            self._pos = 0
            self._buf += self._receive()
        line = bytes(self._buf[self._pos : end])
        self._pos = end + 2
        return line

    def value(self, size: int) -> memoryview:
        """The next ``size`` bytes and the CRLF after them, received into a buffer of their own."""
        if not 0 <= size <= MAX_VALUE:
            raise ValueError(f"a value of {size} bytes announced")
        value = self._buffers.take(size + 2)
        have = min(len(self._buf) - self._pos, len(value))
        value[:have] = self._buf[self._pos : self._pos + have]
        self._pos += have
        while have < len(value):
            received = self._sock.recv_into(value[have:])
            if not received:
                raise ConnectionError("the server closed the connection")
            have += received
        if value[size:] != b"\r\n":
            raise ValueError("a value not followed by CRLF")
        return value[:size]

    def _receive(self) -> bytes:
        received = self._sock.recv(READ_SIZE)
        if not received:
            raise ConnectionError("the server closed the connection")
        return received  # type: ignore[no-any-return]
