"""The prompt-level ops of the data plane: lookups, stores and retrieves by token ids, in a client's namespace.

KV travels in the messages here (TCP); the same-host path without copies is ``shm_ops``.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import numpy as np

from kvtier import __version__
from kvtier.protocol import Message, Op, ProtocolError, get_field
from kvtier.server.replies import reply_to, store_meta
from kvtier.storage.receive import ReceiveBuffers

if TYPE_CHECKING:
    from kvtier.server.service import CacheService, Handler

# What this server does beyond protocol version 1 as first published; clients check before relying on it.
FEATURES = ("segments",)  # the "segment" field of prompt and shared-memory ops


class PromptOps:
    def __init__(self, service: CacheService) -> None:
        self.service = service
        # Retrieve replies over TCP go out of buffers reused once ZMQ has sent them: a new array per reply faulted
        # its pages in while being filled (0.5-1 GB/s here, most of a 512 MiB reply's time).
        self._reply_buffers = ReceiveBuffers()

    def _reply_array(self, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return np.frombuffer(self._reply_buffers.take(nbytes), dtype=dtype).reshape(shape)

    def handlers(self) -> dict[int, Handler]:
        return {
            Op.PING: self.ping,
            Op.LOOKUP: self.lookup,
            Op.STORE: self.store,
            Op.RETRIEVE: self.retrieve,
            Op.PREFETCH: self.prefetch,
            Op.DELETE: self.delete,
            Op.CLEAR: self.clear,
            Op.STATS: self.stats,
            Op.RELEASE: self.release,
        }

    def ping(self, request: Message) -> Message:
        s = self.service
        meta = {"server_id": s.server_id, "version": __version__, "chunk_size": s.config.chunk_size}
        return reply_to(request, {**meta, "features": list(FEATURES)})

    def lookup(self, request: Message) -> Message:
        s = self.service
        engine, tokens = s.engine_for(request.meta), s.tokens(request)
        pin = get_field(request.meta, "pin", bool, False)
        result = engine.lookup(tokens, cache_salt=s.salt(request.meta), pin=pin, segment=s.segment(request))
        lease = result.lease.id if result.lease else None
        return reply_to(request, {"hit_tokens": result.hit_tokens, "tiers": result.tier_tokens, "lease": lease})

    def store(self, request: Message) -> Message:
        s = self.service
        engine, tokens = s.engine_for(request.meta), s.tokens(request)
        if len(request.payload) != 2:
            raise ProtocolError("store takes a token frame and one KV frame")
        layout, frame = engine.layout, request.payload[1]
        if len(frame) != layout.chunk_bytes(len(tokens)):
            raise ProtocolError(f"KV frame has {len(frame)} bytes, {layout.chunk_bytes(len(tokens))} expected")
        kv = np.frombuffer(frame, dtype=layout.element.numpy_name).reshape(layout.chunk_shape(len(tokens)))
        result = engine.store(
            tokens, kv, skip_tokens=s.skip_tokens(request), cache_salt=s.salt(request.meta), segment=s.segment(request)
        )
        return reply_to(request, store_meta(result))

    def retrieve(self, request: Message) -> Message:
        s = self.service
        engine, tokens, skip = s.engine_for(request.meta), s.tokens(request), s.skip_tokens(request)
        fits = s.max_reply_bytes // engine.layout.bytes_per_token  # a longer hit comes back as a shorter prefix
        if fits < len(tokens):
            tokens = tokens[: fits - fits % s.config.chunk_size]
            skip = min(skip, len(tokens))
        result = engine.retrieve(tokens, skip_tokens=skip, cache_salt=s.salt(request.meta), segment=s.segment(request),
                                 new_array=partial(self._reply_array, engine.layout.element.numpy_name))  # fmt: skip
        meta = {"hit_tokens": result.hit_tokens, "loaded_tokens": result.loaded_tokens, "tiers": result.tier_tokens}
        return reply_to(request, meta, [memoryview(np.ascontiguousarray(result.kv).reshape(-1).view(np.uint8))])

    def prefetch(self, request: Message) -> Message:
        s = self.service
        engine = s.engine_for(request.meta)
        engine.prefetch(s.tokens(request), cache_salt=s.salt(request.meta), segment=s.segment(request))
        return reply_to(request, {"accepted": True})

    def delete(self, request: Message) -> Message:
        s = self.service
        engine = s.engine_for(request.meta)
        deleted = engine.delete(s.tokens(request), cache_salt=s.salt(request.meta), segment=s.segment(request))
        return reply_to(request, {"deleted_chunks": deleted})

    def clear(self, request: Message) -> Message:
        return reply_to(request, {"cleared_chunks": self.service.storage.clear()})

    def stats(self, request: Message) -> Message:
        return reply_to(request, self.service.status())

    def release(self, request: Message) -> Message:
        engine = self.service.engine_for(request.meta)
        return reply_to(request, {"released": engine.release(get_field(request.meta, "lease", int))})
