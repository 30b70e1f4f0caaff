"""Blocking client of ``kvtier server``: one model/layout/rank per client, thread-safe, self-healing.

Requests go over a ZMQ DEALER socket with a request id; a reply that does not arrive within ``timeout`` is
retried with exponential backoff (every op is safe to repeat: stores deduplicate), and each retry uses a fresh
socket, so a request queued for a dead server is never delivered late and a restarted server is reached
again. When every attempt fails the call raises :class:`ServerUnavailable`; callers that prefer a miss catch it.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import mmap
import os
import stat
import threading
import time
import uuid
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import zmq

from kvtier.client import calls
from kvtier.client.calls import (
    BadReply,
    Call,
    Calls,
    ChunkSpan,
    LookupReply,
    RetrieveReply,
    ServerError,
    StoreReply,
    final_reply,
    needs_retry,
    retry_delay,
)
from kvtier.errors import KVTierError
from kvtier.memory.layout import KVLayout
from kvtier.protocol import Message, ProtocolError, Status, decode, encode, shared_memory_dir

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class SharedArena:
    """The server's shared-memory pool, mapped into this process."""

    path: str
    array: np.ndarray
    mapping: mmap.mmap

    @classmethod
    def open(cls, path: str) -> SharedArena:
        """Map ``path``, which the server named: only a regular file of this user's, not through a symlink
        (:func:`~kvtier.protocol.is_pool_path` has checked its name), since KV is then written into it."""
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
                raise OSError(f"{path} is not a regular file of this user")
            # MAP_POPULATE: build the page tables now, once, instead of one fault per page on first copies
            # (those ran at ~2 GB/s against ~10 GB/s once mapped).
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            mapping = mmap.mmap(fd, info.st_size, flags=flags)
        finally:
            os.close(fd)
        return cls(path, np.frombuffer(mapping, dtype=np.uint8), mapping)

    def view(self, layout: KVLayout, span: ChunkSpan) -> np.ndarray:
        """The chunk at ``span.offset``, shaped for its tokens; BadReply if it does not lie inside the pool."""
        nbytes = layout.chunk_bytes(span.end - span.start)
        if span.offset + nbytes > len(self.array):
            raise BadReply(f"chunk at offset {span.offset} ({nbytes} bytes) lies outside the shared-memory pool")
        flat = self.array[span.offset : span.offset + nbytes]
        return flat.view(layout.element.numpy_name).reshape(layout.chunk_shape(span.end - span.start))

    def close(self) -> None:
        with contextlib.suppress(BufferError):  # an array handed out may still view it
            self.mapping.close()


class WriterSession:
    """What a server needs to know about this client's writes into its shared memory.

    Liveness: a file in the shared-memory directory that this process holds a ``flock`` on while it runs (the
    kernel drops the lock when the process ends, however it ends); a server never reuses a reservation whose
    writer still holds its lock. Progress: each reservation has a number (:meth:`begin`), and every
    ``STORE_RESERVE`` says below which number all of this client's reservations are finished
    (:meth:`done_below`), so the server can release the ones whose reply was lost, which nobody will write.
    """

    def __init__(self) -> None:
        name = f"kvtier-client-{os.getpid()}-{uuid.uuid4().hex}"
        final = os.path.join(shared_memory_dir(), name)
        pending = final + ".new"  # locked before it gets its name: a named file is always a locked one
        fd = os.open(pending, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        fcntl.flock(fd, fcntl.LOCK_SH)
        os.rename(pending, final)
        self.name = name
        self._next = itertools.count()
        self._open: set[int] = set()  # reservations asked for and not finished: they may be written
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _end_session, final, fd)

    def begin(self) -> int:
        """Number a new reservation; it counts as open before the server hears of it."""
        with self._lock:
            number = next(self._next)
            self._open.add(number)
            return number

    def end(self, number: int) -> None:
        """Reservation ``number`` is committed, handed back or lost: this client writes into it no more."""
        with self._lock:
            self._open.discard(number)

    def done_below(self) -> int:
        with self._lock:
            return min(self._open, default=0)

    def close(self) -> None:
        self._finalizer()


def _end_session(path: str, fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    os.close(fd)


class Connection:
    """Request/reply with one server: ids, timeouts, retries with backoff, a fresh socket after a timeout.
    Thread-safe (one request at a time)."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 10.0,
        retries: int = 2,
        auth_token: str | None = None,
        context: zmq.Context | None = None,
    ) -> None:
        self.url = url if "://" in url else f"tcp://{url}"
        self.timeout = timeout
        self.retries = retries
        self._auth = {"auth": auth_token} if auth_token else {}
        self._context = context or zmq.Context.instance()
        self._socket: zmq.Socket | None = None
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def call(self, call: Call[T]) -> T:
        """Send ``call`` (retrying as :func:`~kvtier.client.calls.needs_retry` says) and parse its reply:
        ServerError for an error status, ServerUnavailable for silence, BadReply for a reply that breaks the
        protocol."""
        reply = None
        with self._lock:
            for attempt in range(self.retries + 1):
                reply = self._exchange(call.message(next(self._ids), self.timeout, self._auth))
                if not needs_retry(reply):
                    break
                time.sleep(retry_delay(attempt))
        return call.parse(final_reply(reply, self.url, self.retries + 1))

    # -- key-level ops (a kvtier engine using the server as its remote tier) --------------------------
    def ping(self) -> dict[str, Any]:
        return self.call(calls.ping())

    def clear(self) -> int:
        return self.call(calls.clear())

    def exists_keys(self, keys: list[str]) -> list[bool]:
        return self.call(calls.exists_keys(keys))

    def get_keys(self, keys: list[str]) -> list[memoryview | None]:
        """Each key's chunk in the stored chunk format, None for a miss."""
        return self.call(calls.get_keys(keys))

    def put_keys(self, keys: list[str], values: list[Any], namespaces: dict[str, dict[str, Any]]) -> int:
        """Store chunk-format values; ``namespaces``: each key's namespace by digest (hex), which the server
        needs to bill and clear chunks by tenant."""
        return self.call(calls.put_keys(keys, values, namespaces))

    def delete_keys(self, keys: list[str]) -> int:
        return self.call(calls.delete_keys(keys))

    # -- transport ----------------------------------------------------------------------------------
    def _exchange(self, message: Message) -> Message | None:
        """Send and wait for the reply with this request id; None on timeout (the socket is then replaced)."""
        sock = self._connected()
        sock.send_multipart(encode(message), copy=False)
        deadline = time.monotonic() + self.timeout
        while (remaining := deadline - time.monotonic()) > 0:
            if not sock.poll(int(remaining * 1000) + 1):
                break
            frames = sock.recv_multipart(copy=False)
            try:
                reply = decode(frames)
            except ProtocolError as exc:  # another protocol version, a bug or a hostile server
                if exc.request_id == message.request_id:
                    raise ServerError(exc.status, f"undecodable reply: {exc}") from None
                continue  # garbage that answers nothing: keep waiting for the reply
            if reply.request_id in (message.request_id, 0):
                return reply  # id 0: the server could not parse our message; it says why
        self._reset()
        return None

    def _connected(self) -> zmq.Socket:
        if self._socket is None:
            sock = self._context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.url)
            self._socket = sock
        return self._socket

    def _reset(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def close(self) -> None:
        with self._lock:
            self._reset()


class KVTierClient:
    """Talks to one server for one model, KV layout and parallel rank.

    ``shared_memory``: copy KV through the server's shared-memory pool when it is reachable (same host;
    only control messages cross the socket); None (default) uses it when available, False never, True
    requires it.
    """

    def __init__(
        self,
        url: str,
        *,
        model: str,
        layout: KVLayout,
        world_size: int = 1,
        rank: int = 0,
        chunk_size: int | None = None,
        timeout: float = 10.0,
        retries: int = 2,
        auth_token: str | None = None,
        shared_memory: bool | None = None,
        context: zmq.Context | None = None,
    ) -> None:
        self.layout = layout
        self.connection = Connection(url, timeout=timeout, retries=retries, auth_token=auth_token, context=context)
        self.calls = Calls(model, layout, world_size, rank, chunk_size)
        self.shared_memory = shared_memory
        self._arena: SharedArena | None = None
        self._session: WriterSession | None = None
        self._server_features: frozenset[str] | None = None
        self._copiers: ThreadPoolExecutor | None = None

    # -- ops ----------------------------------------------------------------------------------------
    def ping(self) -> dict[str, Any]:
        return self.connection.call(self.calls.ping())

    def lookup(self, tokens: Any, *, cache_salt: str = "", pin: bool = False, segment: bool = False) -> LookupReply:
        """The longest cached prefix of ``tokens``. Every prompt-level call takes ``segment``: ``tokens`` are then
        one segment, cached by its own content and found at any position of a prompt (a server that predates
        segments is refused with ServerError rather than sent a field it would ignore)."""
        self._check_segments(segment)
        return self.connection.call(self.calls.lookup(tokens, cache_salt, pin, segment))

    def store(
        self, tokens: Any, kv: np.ndarray, *, skip_tokens: int = 0, cache_salt: str = "", segment: bool = False
    ) -> StoreReply:
        """Store ``kv`` ``(layers, kv, tokens, heads, head_dim)`` for ``tokens``: through shared memory when
        available, else in one message (sent without a copy when ``kv`` is contiguous)."""
        self._check_segments(segment)
        if self._use_shared_memory():
            return self._store_shared(tokens, kv, skip_tokens, cache_salt, segment)
        return self.connection.call(self.calls.store(tokens, kv, skip_tokens, cache_salt, segment))

    def retrieve(
        self,
        tokens: Any,
        *,
        out: np.ndarray | None = None,
        skip_tokens: int = 0,
        cache_salt: str = "",
        segment: bool = False,
    ) -> RetrieveReply:
        """The KV of the longest cached prefix, copied into ``out`` when given (else a new array, or a
        read-only view of the received message over TCP). With a hit of 0, what ``out`` holds is undefined (a
        shared-memory copy the server could not confirm as complete is a miss)."""
        self._check_segments(segment)
        if self._use_shared_memory():
            return self._retrieve_shared(tokens, skip_tokens, cache_salt, out, segment)
        return self.connection.call(self.calls.retrieve(tokens, skip_tokens, cache_salt, out, segment))

    def prefetch(self, tokens: Any, *, cache_salt: str = "", segment: bool = False) -> None:
        self._check_segments(segment)
        self.connection.call(self.calls.prefetch(tokens, cache_salt, segment))

    def delete(self, tokens: Any, *, cache_salt: str = "", segment: bool = False) -> int:
        self._check_segments(segment)
        return self.connection.call(self.calls.delete(tokens, cache_salt, segment))

    def _check_segments(self, segment: bool) -> None:
        if segment and "segments" not in self._features():
            raise ServerError(Status.UNKNOWN_OP, f"the server at {self.connection.url} does not cache segments")

    def _features(self) -> frozenset[str]:
        """What the server supports beyond protocol version 1 as first published (asked once, by PING)."""
        if self._server_features is None:
            features = self.ping().get("features", [])
            listed = features if isinstance(features, list) else []
            self._server_features = frozenset(f for f in listed if isinstance(f, str))
        return self._server_features

    def release(self, lease: int) -> bool:
        return self.connection.call(self.calls.release(lease))

    def clear(self) -> int:
        return self.connection.call(self.calls.clear())

    def stats(self) -> dict[str, Any]:
        return self.connection.call(self.calls.stats())

    # -- shared memory ------------------------------------------------------------------------------
    def _use_shared_memory(self) -> bool:
        if self.shared_memory is False:
            return False
        if self._arena is None:
            try:
                self._arena = SharedArena.open(self.connection.call(self.calls.shm_info()))
            except (ServerError, BadReply, OSError) as exc:
                if self.shared_memory:
                    raise KVTierError(f"shared memory requested but not usable: {exc}") from exc
                self.shared_memory = False  # another host, or a server without it: stay on TCP
                return False
        return True

    def _arena_for(self, path: str) -> SharedArena:
        """The mapping of ``path``; a restarted server has a new file, which is mapped instead."""
        if self._arena is None or self._arena.path != path:
            if self._arena is not None:
                self._arena.close()
            self._arena = SharedArena.open(path)
        return self._arena

    def _store_shared(
        self, tokens: Any, kv: np.ndarray, skip_tokens: int, cache_salt: str, segment: bool
    ) -> StoreReply:
        session = self._session = self._session or WriterSession()
        number = session.begin()
        try:
            call = self.calls.store_reserve(
                tokens, kv, skip_tokens, cache_salt, session.name, number, session.done_below(), segment
            )
            reserved = self.connection.call(call)
            try:
                arena = self._arena_for(reserved.path)
                self._copy_chunks([(arena.view(self.layout, c), kv[:, :, c.start : c.end]) for c in reserved.chunks])
            except BaseException:  # no copy goes on: hand it back now, not when this process exits
                with contextlib.suppress(Exception):
                    self.connection.call(self.calls.shm_release(reserved.lease))
                raise
            return self.connection.call(self.calls.store_commit(reserved.lease, int(kv.shape[2])))
        finally:
            session.end(number)

    def _copy_chunks(self, pairs: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """``np.copyto(dst, src)`` for each pair; large chunks on two threads (numpy releases the GIL, and one
        core cannot saturate memory bandwidth)."""
        if len(pairs) > 1 and pairs[0][0].nbytes >= 1 << 20:
            if self._copiers is None:
                self._copiers = ThreadPoolExecutor(2, thread_name_prefix="kvtier-client-copy")
            list(self._copiers.map(lambda pair: np.copyto(*pair), pairs))
        else:
            for dst, src in pairs:
                np.copyto(dst, src)

    def _retrieve_shared(
        self, tokens: Any, skip_tokens: int, cache_salt: str, out: np.ndarray | None, segment: bool
    ) -> RetrieveReply:
        pinned = self.connection.call(self.calls.retrieve_pin(tokens, skip_tokens, cache_salt, out, segment))
        end = pinned.chunks[-1].end if pinned.chunks else 0
        kv = out if out is not None else np.zeros(self.layout.chunk_shape(end), self.layout.element.numpy_name)
        try:
            arena = self._arena_for(pinned.path)
            self._copy_chunks([(kv[:, :, c.start : c.end], arena.view(self.layout, c)) for c in pinned.chunks])
        finally:
            released = self.connection.call(self.calls.shm_release(pinned.lease))
        if not released:  # the lease expired first: the chunks may have been reused while we copied them
            return RetrieveReply(0, 0, {}, kv if out is not None else kv[:, :, :0])
        return RetrieveReply(pinned.hit_tokens, pinned.loaded_tokens, pinned.tiers, kv)

    def close(self) -> None:
        self.connection.close()
        if self._session is not None:
            self._session.close()
            self._session = None
        if self._copiers is not None:
            self._copiers.shutdown()
            self._copiers = None
        if self._arena is not None:
            self._arena.close()
            self._arena = None

    def __enter__(self) -> KVTierClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
