"""asyncio client of ``kvtier server``: many requests in flight on one connection.

Requests carry ids; one reader task hands each reply to the coroutine waiting for that id, so concurrent
lookups and stores from one event loop share a socket without blocking each other. Timeouts, retries with
backoff and a fresh socket after a timeout work as in the blocking client. KV travels in the messages (TCP).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any, TypeVar

import numpy as np
import zmq
import zmq.asyncio

from kvtier.client.calls import (
    Call,
    Calls,
    LookupReply,
    RetrieveReply,
    ServerError,
    StoreReply,
    final_reply,
    needs_retry,
    retry_delay,
)
from kvtier.memory.layout import KVLayout
from kvtier.protocol import Message, ProtocolError, decode, encode

T = TypeVar("T")
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
        self.calls = Calls(model, layout, world_size, rank, chunk_size)
        self._auth = {"auth": auth_token} if auth_token else {}
        self._context = zmq.asyncio.Context.instance()
        self._socket: zmq.asyncio.Socket | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiting: dict[int, asyncio.Future[Message]] = {}
        self._ids = itertools.count(1)

    async def ping(self) -> dict[str, Any]:
        return await self._call(self.calls.ping())

    async def lookup(self, tokens: Any, *, cache_salt: str = "", pin: bool = False) -> LookupReply:
        return await self._call(self.calls.lookup(tokens, cache_salt, pin))

    async def store(self, tokens: Any, kv: np.ndarray, *, skip_tokens: int = 0, cache_salt: str = "") -> StoreReply:
        return await self._call(self.calls.store(tokens, kv, skip_tokens, cache_salt))

    async def retrieve(self, tokens: Any, *, skip_tokens: int = 0, cache_salt: str = "") -> RetrieveReply:
        return await self._call(self.calls.retrieve(tokens, skip_tokens, cache_salt, None))

    async def prefetch(self, tokens: Any, *, cache_salt: str = "") -> None:
        await self._call(self.calls.prefetch(tokens, cache_salt))

    # -- transport ----------------------------------------------------------------------------------
    async def _call(self, call: Call[T]) -> T:
        reply = None
        for attempt in range(self.retries + 1):
            reply = await self._exchange(call.message(next(self._ids), self.timeout, self._auth))
            if not needs_retry(reply):
                break
            await asyncio.sleep(retry_delay(attempt))
        return call.parse(final_reply(reply, self.url, self.retries + 1))

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
