"""asyncio client of ``kvtier server``: many requests in flight on one connection.

Requests carry ids; one reader task hands each reply to the coroutine waiting for that id, so concurrent
lookups and stores from one event loop share a socket without blocking each other. Timeouts, retries with
backoff and a fresh socket after a timeout work as in the blocking client. KV travels in the messages (TCP).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

import numpy as np
import zmq
import zmq.asyncio

from kvtier.client.client import RemoteLookup, RemoteRetrieve, RemoteStore, ServerError, ServerUnavailable
from kvtier.errors import LayoutError
from kvtier.memory.layout import KVLayout
from kvtier.protocol import Message, Op, ProtocolError, Status, decode, encode, namespace_meta
from kvtier.tokens.hashing import token_bytes

log = logging.getLogger("kvtier.client")


class AsyncKVTierClient:
    """Talks to one server for one model, KV layout and parallel rank, from asyncio code."""

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
    ) -> None:
        self.url = url if "://" in url else f"tcp://{url}"
        self.layout = layout
        self.timeout = timeout
        self.retries = retries
        self._namespace = namespace_meta(model, layout, world_size, rank, chunk_size)
        if auth_token:
            self._namespace["auth"] = auth_token
        self._context = zmq.asyncio.Context.instance()
        self._socket: zmq.asyncio.Socket | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiting: dict[int, asyncio.Future[Message]] = {}
        self._ids = itertools.count(1)

    async def ping(self) -> dict[str, Any]:
        return (await self._call(Op.PING, {})).meta

    async def lookup(self, tokens: Any, *, cache_salt: str = "", pin: bool = False) -> RemoteLookup:
        meta = (await self._call(Op.LOOKUP, {"cache_salt": cache_salt, "pin": pin}, [token_bytes(tokens)])).meta
        return RemoteLookup(meta["hit_tokens"], meta["tiers"], meta["lease"])

    async def store(self, tokens: Any, kv: np.ndarray, *, skip_tokens: int = 0, cache_salt: str = "") -> RemoteStore:
        encoded = token_bytes(tokens)
        if self.layout.check_shape(kv.shape) != len(encoded) // 4:
            raise LayoutError("kv and tokens hold different numbers of tokens")
        data = memoryview(np.ascontiguousarray(kv).reshape(-1).view(np.uint8))
        args = {"cache_salt": cache_salt, "skip_tokens": skip_tokens}
        meta = (await self._call(Op.STORE, args, [encoded, data])).meta
        return RemoteStore(meta["stored_tokens"], meta["skipped_tokens"], meta["dropped_tokens"])

    async def retrieve(self, tokens: Any, *, skip_tokens: int = 0, cache_salt: str = "") -> RemoteRetrieve:
        args = {"cache_salt": cache_salt, "skip_tokens": skip_tokens}
        reply = await self._call(Op.RETRIEVE, args, [token_bytes(tokens)])
        frame = reply.payload[0] if reply.payload else memoryview(b"")
        end = len(frame) // self.layout.bytes_per_token
        kv = np.frombuffer(frame, dtype=self.layout.element.numpy_name).reshape(self.layout.chunk_shape(end))
        return RemoteRetrieve(reply.meta["hit_tokens"], reply.meta["loaded_tokens"], reply.meta["tiers"], kv)

    async def prefetch(self, tokens: Any, *, cache_salt: str = "") -> None:
        await self._call(Op.PREFETCH, {"cache_salt": cache_salt}, [token_bytes(tokens)])

    # -- transport ----------------------------------------------------------------------------------
    async def _call(self, op: Op, meta: dict[str, Any], payload: list[Any] | None = None) -> Message:
        request_meta = {**self._namespace, **meta}
        for attempt in range(self.retries + 1):
            reply = await self._exchange(
                Message(op, next(self._ids), request_meta, payload or [], timeout_ms=int(self.timeout * 1000))
            )
            if reply is not None and reply.status != Status.BUSY:
                if reply.status != Status.OK:
                    raise ServerError(reply.status, str(reply.meta.get("error", "")))
                return reply
            await asyncio.sleep(min(0.05 * 2**attempt, 1.0))
        raise ServerUnavailable(f"no answer from {self.url} after {self.retries + 1} attempts")

    async def _exchange(self, message: Message) -> Message | None:
        sock = self._connected()
        waiter: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._waiting[message.request_id] = waiter
        try:
            await sock.send_multipart(encode(message), copy=False)
            return await asyncio.wait_for(waiter, self.timeout)
        except TimeoutError:
            self._reset()  # a fresh socket: nothing queued for a dead server is delivered late
            return None
        finally:
            self._waiting.pop(message.request_id, None)

    def _connected(self) -> zmq.asyncio.Socket:
        if self._socket is None:
            sock = self._context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.url)
            self._socket = sock
            self._reader = asyncio.get_running_loop().create_task(self._read(sock))
        return self._socket

    async def _read(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            try:
                frames = await sock.recv_multipart(copy=False)
            except zmq.ZMQError:
                return  # socket closed
            try:
                reply = decode(frames)
            except ProtocolError as exc:  # from another protocol version, a bug or a hostile server
                waiter = self._waiting.get(exc.request_id) if exc.request_id else None
                if waiter is not None and not waiter.done():
                    waiter.set_exception(ServerError(exc.status, f"undecodable reply: {exc}"))
                else:  # garbage that answers no call: dropped, and the reader goes on
                    log.warning("dropped an undecodable reply from %s: %s", self.url, exc)
                continue
            waiter = self._waiter_for(reply)
            if waiter is not None and not waiter.done():
                waiter.set_result(reply)

    def _waiter_for(self, reply: Message) -> asyncio.Future[Message] | None:
        """The call a reply answers. Id 0 is the server saying it could not parse a message whose header it
        could not read either: it can only be attributed when one call is waiting (else they time out)."""
        if reply.request_id == 0:
            if len(self._waiting) == 1:
                return next(iter(self._waiting.values()))
            log.warning("server could not parse a request (%s)", reply.meta.get("error", ""))
            return None
        return self._waiting.get(reply.request_id)

    def _reset(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    async def close(self) -> None:
        self._reset()

    async def __aenter__(self) -> AsyncKVTierClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
