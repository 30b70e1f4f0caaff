"""The key-level ops of the data plane: chunks by key id, in the stored chunk format, for another kvtier engine
that uses this server as its remote tier (``remote_url: kvtier://host:port``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvtier.codecs.chunk_format import CHUNK_HEADER_SIZE, decode_chunk, encode_chunk
from kvtier.protocol import MAX_KEYS, Message, Op, ProtocolError, Status, get_field
from kvtier.server.replies import reply_to
from kvtier.tokens.keys import NAMESPACE_DIGEST_SIZE, CacheKey, Namespace, key_id_from_str

if TYPE_CHECKING:
    from kvtier.server.service import CacheService, Handler


class KeyOps:
    def __init__(self, service: CacheService) -> None:
        self.service = service
        self.storage = service.storage

    def handlers(self) -> dict[int, Handler]:
        return {
            Op.EXISTS_KEYS: self.exists_keys,
            Op.GET_KEYS: self.get_keys,
            Op.PUT_KEYS: self.put_keys,
            Op.DELETE_KEYS: self.delete_keys,
        }

    def exists_keys(self, request: Message) -> Message:
        return reply_to(request, {"exists": [t is not None for t in self.storage.find(_keys(request))]})

    def get_keys(self, request: Message) -> Message:
        """Each key's chunk in the stored chunk format (an empty frame for a miss)."""
        keys = _keys(request)
        frames: list[memoryview] = []
        budget = self.service.max_reply_bytes  # beyond it the remaining keys are answered as misses
        for key, tier in zip(keys, self.storage.find(keys), strict=True):
            obj = self.storage.read_one(key, tier) if tier is not None and budget > 0 else None
            if obj is None:
                frames.append(memoryview(b""))
                continue
            budget -= CHUNK_HEADER_SIZE + obj.nbytes
            try:  # a copy: the chunk's memory may be reused once we let go of it, before ZMQ has sent it
                header, payload = encode_chunk(key.id, obj)
                frames.append(memoryview(header + payload.tobytes()))
            finally:
                obj.unref()
        return reply_to(request, {"found": sum(1 for f in frames if len(f))}, frames)

    def put_keys(self, request: Message) -> Message:
        keys = _with_namespaces(_keys(request), get_field(request.meta, "namespaces", dict))
        if len(request.payload) != len(keys):
            raise ProtocolError(f"{len(keys)} keys but {len(request.payload)} value frames")
        stored = 0
        for key, frame in zip(keys, request.payload, strict=True):
            obj = decode_chunk(frame, key.id, self.storage.allocate)  # a bad chunk: BAD_REQUEST, nothing stored
            if obj is None:
                break  # memory full of pinned chunks: the rest is not stored, as in a local store
            try:
                stored += self.storage.write([key], [obj])
            finally:
                obj.unref()
        return reply_to(request, {"stored": stored})

    def delete_keys(self, request: Message) -> Message:
        return reply_to(request, {"deleted": sum(self.storage.delete(k) for k in _keys(request))})


def _keys(request: Message) -> list[CacheKey]:
    names = get_field(request.meta, "keys", list)
    if len(names) > MAX_KEYS:
        raise ProtocolError(f"more than {MAX_KEYS} keys in one request", Status.TOO_LARGE)
    if not all(isinstance(n, str) for n in names):
        raise ProtocolError("keys must be strings")
    try:
        return [CacheKey.from_id(key_id_from_str(n)) for n in names]
    except ValueError as exc:
        raise ProtocolError(f"bad key: {exc}") from None


def _with_namespaces(keys: list[CacheKey], described: dict[str, Any]) -> list[CacheKey]:
    """``keys`` with their namespaces, as the client describes them: quotas and clears by tenant need them. A
    description must hash to the key's own namespace digest, so no client can bill chunks to another tenant."""
    namespaces: dict[bytes, Namespace] = {}
    full = []
    for key in keys:
        digest = key.id[:NAMESPACE_DIGEST_SIZE]
        if digest not in namespaces:
            fields = described.get(digest.hex())
            try:
                namespace = Namespace.from_fields(fields) if isinstance(fields, dict) else None
            except ValueError as exc:
                raise ProtocolError(f"bad namespace for key {key.to_str()}: {exc}") from None
            if namespace is None or namespace.digest != digest:
                raise ProtocolError(f"no namespace matching key {key.to_str()}: PUT_KEYS describes every key's")
            namespaces[digest] = namespace
        full.append(namespaces[digest].key(key.chunk_hash))
    return full
