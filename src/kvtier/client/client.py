"""Blocking client of ``kvtier server``: one model/layout/rank per client, thread-safe, self-healing.

Requests go over a ZMQ DEALER socket with a request id; a reply that does not arrive within ``timeout`` is
retried with exponential backoff (every op is safe to repeat: stores deduplicate), and each retry uses a fresh
socket, so a request queued for a dead server is never delivered late and a restarted server is reached
again. When every attempt fails the call raises :class:`ServerUnavailable`; callers that prefer a miss catch it.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

from kvtier.errors import KVTierError, LayoutError
from kvtier.memory.layout import KVLayout
from kvtier.protocol import Message, Op, ProtocolError, Status, decode, encode, namespace_meta
from kvtier.tokens.hashing import token_bytes


class ServerUnavailable(KVTierError):
    """No reply from the server after every retry."""


class ServerError(KVTierError):
    """The server answered with an error status."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(f"{status.name}: {message}")
        self.status = status


@dataclass(frozen=True, slots=True)
class SharedArena:
    """The server's shared-memory pool, mapped into this process."""

    path: str
    array: np.ndarray
    mapping: mmap.mmap

    @classmethod
    def open(cls, path: str) -> SharedArena:
        fd = os.open(path, os.O_RDWR)
        try:
            # MAP_POPULATE: build the page tables now, once, instead of one fault per page on first copies
            # (those ran at ~2 GB/s against ~10 GB/s once mapped).
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            mapping = mmap.mmap(fd, os.fstat(fd).st_size, flags=flags)
        finally:
            os.close(fd)
        return cls(path, np.frombuffer(mapping, dtype=np.uint8), mapping)

    def close(self) -> None:
        with contextlib.suppress(BufferError):  # an array handed out may still view it
            self.mapping.close()


@dataclass(frozen=True, slots=True)
class RemoteLookup:
    hit_tokens: int
    tiers: dict[str, int]
    lease: int | None


@dataclass(frozen=True, slots=True)
class RemoteStore:
    stored_tokens: int
    skipped_tokens: int
    dropped_tokens: int


@dataclass(frozen=True, slots=True)
class RemoteRetrieve:
    hit_tokens: int
    loaded_tokens: int
    tiers: dict[str, int]
    kv: np.ndarray


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

    def call(self, op: Op, meta: dict[str, Any], payload: list[Any] | None = None) -> Message:
        """The server's reply (status OK); ServerError for an error status, ServerUnavailable for silence."""
        request_meta = {**meta, **self._auth}
        reply = None
        with self._lock:
            for attempt in range(self.retries + 1):
                message = Message(op, next(self._ids), request_meta, payload or [], timeout_ms=int(self.timeout * 1000))
                reply = self._exchange(message)
                if reply is not None and reply.status != Status.BUSY:
                    break
                time.sleep(min(0.05 * 2**attempt, 1.0))
        if reply is None:
            raise ServerUnavailable(f"no answer from {self.url} after {self.retries + 1} attempts")
        if reply.status != Status.OK:
            raise ServerError(reply.status, str(reply.meta.get("error", "")))
        return reply

    # -- key-level ops (a kvtier engine using the server as its remote tier) --------------------------
    def exists_keys(self, keys: list[str]) -> list[bool]:
        return [bool(x) for x in self.call(Op.EXISTS_KEYS, {"keys": keys}).meta["exists"]]

    def get_keys(self, keys: list[str]) -> list[memoryview | None]:
        """Each key's chunk in the stored chunk format, None for a miss."""
        return [frame if len(frame) else None for frame in self.call(Op.GET_KEYS, {"keys": keys}).payload]

    def put_keys(self, keys: list[str], values: list[Any]) -> int:
        return int(self.call(Op.PUT_KEYS, {"keys": keys}, values).meta["stored"])

    def delete_keys(self, keys: list[str]) -> int:
        return int(self.call(Op.DELETE_KEYS, {"keys": keys}).meta["deleted"])

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
        self._namespace = namespace_meta(model, layout, world_size, rank, chunk_size)
        self.shared_memory = shared_memory
        self._arena: SharedArena | None = None
        self._copiers: ThreadPoolExecutor | None = None

    # -- ops ----------------------------------------------------------------------------------------
    def ping(self) -> dict[str, Any]:
        return self._call(Op.PING, {}).meta

    def lookup(self, tokens: Any, *, cache_salt: str = "", pin: bool = False) -> RemoteLookup:
        meta = self._call(Op.LOOKUP, {"cache_salt": cache_salt, "pin": pin}, [token_bytes(tokens)]).meta
        return RemoteLookup(meta["hit_tokens"], meta["tiers"], meta["lease"])

    def store(self, tokens: Any, kv: np.ndarray, *, skip_tokens: int = 0, cache_salt: str = "") -> RemoteStore:
        """Store ``kv`` ``(layers, kv, tokens, heads, head_dim)`` for ``tokens``: through shared memory when
        available, else in one message (sent without a copy when ``kv`` is contiguous)."""
        encoded = token_bytes(tokens)
        n = self.layout.check_shape(kv.shape)
        if n != len(encoded) // 4:
            raise LayoutError(f"kv holds {n} tokens, {len(encoded) // 4} tokens given")
        args = {"cache_salt": cache_salt, "skip_tokens": skip_tokens}
        if self._use_shared_memory():
            meta = self._store_shared(encoded, kv, args)
        else:
            data = memoryview(np.ascontiguousarray(kv).reshape(-1).view(np.uint8))
            meta = self._call(Op.STORE, args, [encoded, data]).meta
        return RemoteStore(meta["stored_tokens"], meta["skipped_tokens"], meta["dropped_tokens"])

    def retrieve(
        self, tokens: Any, *, out: np.ndarray | None = None, skip_tokens: int = 0, cache_salt: str = ""
    ) -> RemoteRetrieve:
        """The KV of the longest cached prefix, copied into ``out`` when given (else a new array, or a
        read-only view of the received message over TCP)."""
        args = {"cache_salt": cache_salt, "skip_tokens": skip_tokens}
        if self._use_shared_memory():
            return self._retrieve_shared(token_bytes(tokens), args, out)
        reply = self._call(Op.RETRIEVE, args, [token_bytes(tokens)])
        meta, frame = reply.meta, reply.payload[0] if reply.payload else memoryview(b"")
        end = len(frame) // self.layout.bytes_per_token
        kv = np.frombuffer(frame, dtype=self.layout.element.numpy_name).reshape(self.layout.chunk_shape(end))
        if out is not None:  # the reply holds zeros before skip_tokens: keep what the caller has there
            np.copyto(out[:, :, skip_tokens:end], kv[:, :, skip_tokens:end])
            kv = out
        return RemoteRetrieve(meta["hit_tokens"], meta["loaded_tokens"], meta["tiers"], kv)

    # -- shared memory ------------------------------------------------------------------------------
    def _use_shared_memory(self) -> bool:
        if self.shared_memory is False:
            return False
        if self._arena is None:
            try:
                info = self._call(Op.SHM_INFO, {}).meta
                self._arena = SharedArena.open(info["path"])
            except (ServerError, OSError) as exc:
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

    def _chunk_view(self, arena: SharedArena, start: int, end: int, offset: int) -> np.ndarray:
        nbytes = self.layout.chunk_bytes(end - start)
        flat = arena.array[offset : offset + nbytes]
        if len(flat) != nbytes:
            raise ServerError(Status.INTERNAL, "chunk offset outside the shared-memory pool")
        return flat.view(self.layout.element.numpy_name).reshape(self.layout.chunk_shape(end - start))

    def _store_shared(self, encoded: bytes, kv: np.ndarray, args: dict[str, Any]) -> dict[str, Any]:
        reserved = self._call(Op.STORE_RESERVE, args, [encoded]).meta
        arena = self._arena_for(reserved["path"])
        self._copy_chunks([(self._chunk_view(arena, s, e, o), kv[:, :, s:e]) for s, e, o in reserved["chunks"]])
        return self._call(Op.STORE_COMMIT, {"lease": reserved["lease"]}).meta

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

    def _retrieve_shared(self, encoded: bytes, args: dict[str, Any], out: np.ndarray | None) -> RemoteRetrieve:
        pinned = self._call(Op.RETRIEVE_PIN, args, [encoded]).meta
        try:
            chunks = pinned["chunks"]
            end = chunks[-1][1] if chunks else 0
            if out is None:
                out = np.zeros(self.layout.chunk_shape(end), self.layout.element.numpy_name)
            arena = self._arena_for(pinned["path"])
            self._copy_chunks([(out[:, :, s:e], self._chunk_view(arena, s, e, o)) for s, e, o in chunks])
        finally:
            self._call(Op.SHM_RELEASE, {"lease": pinned["lease"]})
        return RemoteRetrieve(pinned["hit_tokens"], pinned["loaded_tokens"], pinned["tiers"], out)

    def prefetch(self, tokens: Any, *, cache_salt: str = "") -> None:
        self._call(Op.PREFETCH, {"cache_salt": cache_salt}, [token_bytes(tokens)])

    def delete(self, tokens: Any, *, cache_salt: str = "") -> int:
        return int(self._call(Op.DELETE, {"cache_salt": cache_salt}, [token_bytes(tokens)]).meta["deleted_chunks"])

    def release(self, lease: int) -> bool:
        return bool(self._call(Op.RELEASE, {"lease": lease}).meta["released"])

    def clear(self) -> int:
        return int(self._call(Op.CLEAR, {}).meta["cleared_chunks"])

    def stats(self) -> dict[str, Any]:
        return self._call(Op.STATS, {}).meta

    def _call(self, op: Op, meta: dict[str, Any], payload: list[Any] | None = None) -> Message:
        return self.connection.call(op, {**self._namespace, **meta}, payload)

    def close(self) -> None:
        self.connection.close()
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
