"""What a client sends and what it accepts back, once for both clients (blocking and asyncio): each op is a
:class:`Call` (the request's op, meta and payload, plus the function that checks and parses its reply), and the
retry rule is :func:`retry_delay` / :func:`needs_retry`. The clients only move messages.

Every reply field is checked before use, as the server checks requests: a reply from a buggy server, another
version or an impostor raises :class:`BadReply` (a :class:`KVTierError`, so the integrations count it as a miss),
never a KeyError, a wrong-sized array, or KV copied from or to the wrong place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from kvtier.errors import KVTierError, LayoutError
from kvtier.memory.layout import KVLayout
from kvtier.protocol import Message, Op, ProtocolError, Status, get_field, is_pool_path, namespace_meta
from kvtier.tokens.hashing import token_bytes

T = TypeVar("T")


class ServerUnavailable(KVTierError):
    """No reply from the server after every retry."""


class ServerError(KVTierError):
    """The server answered with an error status (or with a reply this side cannot decode)."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(f"{status.name}: {message}")
        self.status = status


class BadReply(KVTierError):
    """A reply that decodes but breaks the protocol's contract (missing or mistyped fields, sizes or chunk
    offsets that do not fit the request)."""


@dataclass(frozen=True, slots=True)
class LookupReply:
    hit_tokens: int
    tiers: dict[str, int]
    lease: int | None


@dataclass(frozen=True, slots=True)
class StoreReply:
    stored_tokens: int
    skipped_tokens: int
    dropped_tokens: int


@dataclass(frozen=True, slots=True)
class RetrieveReply:
    hit_tokens: int
    loaded_tokens: int
    tiers: dict[str, int]
    kv: np.ndarray


@dataclass(frozen=True, slots=True)
class ChunkSpan:
    """Where the server put (or wants) one chunk of the prompt in its shared-memory pool."""

    start: int
    end: int
    offset: int


@dataclass(frozen=True, slots=True)
class Reservation:
    """STORE_RESERVE's reply: copy ``kv[:, :, start:end]`` to each span's offset, then commit the lease."""

    lease: int
    path: str
    chunks: list[ChunkSpan]
    dropped_tokens: int


@dataclass(frozen=True, slots=True)
class Pinned:
    """RETRIEVE_PIN's reply: the cached prefix's chunks, held under ``lease`` until it is released."""

    lease: int
    path: str
    chunks: list[ChunkSpan]
    hit_tokens: int
    loaded_tokens: int
    tiers: dict[str, int]


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One request and how to read its reply."""

    op: Op
    meta: dict[str, Any]
    parse: Callable[[Message], T]
    payload: list[Any] = field(default_factory=list)

    def message(self, request_id: int, timeout: float, auth: dict[str, str]) -> Message:
        return Message(self.op, request_id, {**self.meta, **auth}, self.payload, timeout_ms=int(timeout * 1000))


def retry_delay(attempt: int) -> float:
    """Seconds to back off before retry ``attempt + 1`` (exponential, at most 1 s)."""
    return min(0.05 * 2**attempt, 1.0)


def needs_retry(reply: Message | None) -> bool:
    """No reply (timeout: the socket is replaced) or BUSY: try again. Anything else is final."""
    return reply is None or reply.status == Status.BUSY


def final_reply(reply: Message | None, url: str, attempts: int) -> Message:
    """The reply of the last attempt, or the error it stands for."""
    if reply is None:
        raise ServerUnavailable(f"no answer from {url} after {attempts} attempts")
    if reply.status != Status.OK:
        raise ServerError(reply.status, str(reply.meta.get("error", "")))
    return reply


class Calls:
    """The prompt-level calls of one client: its namespace (model, layout, rank, chunk size) in every request,
    and replies checked against the request they answer."""

    def __init__(self, model: str, layout: KVLayout, world_size: int, rank: int, chunk_size: int | None) -> None:
        self.layout = layout
        self.namespace = namespace_meta(model, layout, world_size, rank, chunk_size)

    def _call(self, op: Op, meta: dict[str, Any], parse: Callable[[Message], T], payload: list[Any]) -> Call[T]:
        return Call(op, {**self.namespace, **meta}, parse, payload)

    def ping(self) -> Call[dict[str, Any]]:
        return self._call(Op.PING, {}, _meta, [])

    def stats(self) -> Call[dict[str, Any]]:
        return self._call(Op.STATS, {}, _meta, [])

    def lookup(self, tokens: Any, cache_salt: str, pin: bool, segment: bool = False) -> Call[LookupReply]:
        encoded = token_bytes(tokens)
        n = len(encoded) // 4

        def parse(reply: Message) -> LookupReply:
            lease = _field(reply.meta, "lease", int, None) if pin else None
            return LookupReply(_count(reply.meta, "hit_tokens", n), _tiers(reply.meta, n), lease)

        return self._call(Op.LOOKUP, {**_scope(cache_salt, segment), "pin": pin}, parse, [encoded])

    def store(
        self, tokens: Any, kv: np.ndarray, skip_tokens: int, cache_salt: str, segment: bool = False
    ) -> Call[StoreReply]:
        """KV in the message (sent without a copy when ``kv`` is contiguous)."""
        encoded = self._check_kv(tokens, kv)
        data = memoryview(np.ascontiguousarray(kv).reshape(-1).view(np.uint8))
        meta = {**_scope(cache_salt, segment), "skip_tokens": skip_tokens}
        return self._call(Op.STORE, meta, lambda r: _store_reply(r, len(encoded) // 4), [encoded, data])

    def retrieve(
        self, tokens: Any, skip_tokens: int, cache_salt: str, out: np.ndarray | None, segment: bool = False
    ) -> Call[RetrieveReply]:
        """KV in the reply: tokens ``[0, hit_tokens)`` (zeros before ``skip_tokens``), copied into ``out`` from
        ``skip_tokens`` on when given (else a read-only view of the message)."""
        encoded = token_bytes(_fitting(tokens, out))
        limit = len(encoded) // 4

        def parse(reply: Message) -> RetrieveReply:
            if len(reply.payload) > 1:
                raise BadReply(f"retrieve reply has {len(reply.payload)} payload frames, at most 1 expected")
            frame = reply.payload[0] if reply.payload else memoryview(b"")
            if len(frame) % self.layout.bytes_per_token:
                raise BadReply("retrieve reply holds a partial token")
            end = len(frame) // self.layout.bytes_per_token
            hit, loaded, tiers = _prefix_counts(reply.meta, skip_tokens, end, limit)
            kv = np.frombuffer(frame, dtype=self.layout.element.numpy_name).reshape(self.layout.chunk_shape(end))
            if out is not None:  # the reply holds zeros before skip_tokens: keep what the caller has there
                np.copyto(out[:, :, skip_tokens:end], kv[:, :, skip_tokens:end])
                kv = out
            return RetrieveReply(hit, loaded, tiers, kv)

        meta = {**_scope(cache_salt, segment), "skip_tokens": skip_tokens}
        return self._call(Op.RETRIEVE, meta, parse, [encoded])

    def prefetch(self, tokens: Any, cache_salt: str, segment: bool = False) -> Call[None]:
        return self._call(Op.PREFETCH, _scope(cache_salt, segment), lambda r: None, [token_bytes(tokens)])

    def delete(self, tokens: Any, cache_salt: str, segment: bool = False) -> Call[int]:
        encoded = token_bytes(tokens)
        parse = lambda r: _count(r.meta, "deleted_chunks")  # noqa: E731
        return self._call(Op.DELETE, _scope(cache_salt, segment), parse, [encoded])

    def release(self, lease: int) -> Call[bool]:
        return self._call(Op.RELEASE, {"lease": lease}, lambda r: _field(r.meta, "released", bool), [])

    def clear(self) -> Call[int]:
        return self._call(Op.CLEAR, {}, lambda r: _count(r.meta, "cleared_chunks"), [])

    # -- shared memory ------------------------------------------------------------------------------
    def shm_info(self) -> Call[str]:
        return self._call(Op.SHM_INFO, {}, lambda r: _pool_path(r.meta), [])

    def store_reserve(
        self,
        tokens: Any,
        kv: np.ndarray,
        skip_tokens: int,
        cache_salt: str,
        session: str,
        number: int,
        done_below: int,
        segment: bool = False,
    ) -> Call[Reservation]:
        """``session``: this client's liveness file; ``number``: this reservation's; ``done_below``: every
        reservation of this client numbered below it is finished (see ``client.WriterSession``)."""
        encoded = self._check_kv(tokens, kv)
        n = len(encoded) // 4

        def parse(reply: Message) -> Reservation:
            chunks = _spans(reply.meta)
            position = skip_tokens
            for span in chunks:  # disjoint, in order, inside the part of the prompt that is stored
                if span.start < position or span.end > n:
                    raise BadReply(f"reserved chunk [{span.start}, {span.end}) outside [{position}, {n})")
                position = span.end
            lease = _field(reply.meta, "lease", int)
            return Reservation(lease, _pool_path(reply.meta), chunks, _count(reply.meta, "dropped_tokens", n))

        meta = {
            **_scope(cache_salt, segment),
            "skip_tokens": skip_tokens,
            "session": session,
            "reservation": number,
            "done_below": done_below,
        }
        return self._call(Op.STORE_RESERVE, meta, parse, [encoded])

    def store_commit(self, lease: int, num_tokens: int) -> Call[StoreReply]:
        return self._call(Op.STORE_COMMIT, {"lease": lease}, lambda r: _store_reply(r, num_tokens), [])

    def retrieve_pin(
        self, tokens: Any, skip_tokens: int, cache_salt: str, out: np.ndarray | None, segment: bool = False
    ) -> Call[Pinned]:
        encoded = token_bytes(_fitting(tokens, out))
        n = len(encoded) // 4

        def parse(reply: Message) -> Pinned:
            chunks = _spans(reply.meta)
            position = skip_tokens
            for span in chunks:  # the prefix, chunk after chunk, from skip_tokens on
                if span.start != position or span.end > n:
                    raise BadReply(f"pinned chunk [{span.start}, {span.end}) breaks the prefix at {position}")
                position = span.end
            end = chunks[-1].end if chunks else 0
            hit, loaded, tiers = _prefix_counts(reply.meta, skip_tokens, end, n)
            return Pinned(_field(reply.meta, "lease", int), _pool_path(reply.meta), chunks, hit, loaded, tiers)

        meta = {**_scope(cache_salt, segment), "skip_tokens": skip_tokens}
        return self._call(Op.RETRIEVE_PIN, meta, parse, [encoded])

    def shm_release(self, lease: int) -> Call[bool]:
        return self._call(Op.SHM_RELEASE, {"lease": lease}, lambda r: _field(r.meta, "released", bool), [])

    def _check_kv(self, tokens: Any, kv: np.ndarray) -> bytes:
        encoded = token_bytes(tokens)
        n = self.layout.check_shape(kv.shape)
        if n != len(encoded) // 4:
            raise LayoutError(f"kv holds {n} tokens, {len(encoded) // 4} tokens given")
        return encoded


def _scope(cache_salt: str, segment: bool) -> dict[str, Any]:
    """The tenant and key space of a prompt-level request; ``segment`` only when set (a server that predates
    segments is never sent it: the client checks the server's features first)."""
    return {"cache_salt": cache_salt, "segment": True} if segment else {"cache_salt": cache_salt}


def _fitting(tokens: Any, out: np.ndarray | None) -> Any:
    """The tokens whose KV fits in ``out``: only chunks that end within it are asked for (as in the engine)."""
    return tokens if out is None else tokens[: int(out.shape[2])]


# -- key-level calls (a kvtier engine using the server as its remote tier) ----------------------------------
def exists_keys(keys: list[str]) -> Call[list[bool]]:
    def parse(reply: Message) -> list[bool]:
        exists = _field(reply.meta, "exists", list)
        if len(exists) != len(keys) or not all(isinstance(x, bool) for x in exists):
            raise BadReply(f"exists holds {len(exists)} entries for {len(keys)} keys, or not booleans")
        return exists

    return Call(Op.EXISTS_KEYS, {"keys": keys}, parse)


def get_keys(keys: list[str]) -> Call[list[memoryview | None]]:
    """Each key's chunk in the stored chunk format (checked by the tier that decodes it), None for a miss."""

    def parse(reply: Message) -> list[memoryview | None]:
        if len(reply.payload) != len(keys):
            raise BadReply(f"{len(reply.payload)} value frames for {len(keys)} keys")
        return [frame if len(frame) else None for frame in reply.payload]

    return Call(Op.GET_KEYS, {"keys": keys}, parse)


def put_keys(keys: list[str], values: list[Any], namespaces: dict[str, dict[str, Any]]) -> Call[int]:
    """``namespaces``: each key's namespace (``Namespace.fields()``) by its digest in hex."""
    meta = {"keys": keys, "namespaces": namespaces}
    return Call(Op.PUT_KEYS, meta, lambda r: _count(r.meta, "stored", len(keys)), values)


def delete_keys(keys: list[str]) -> Call[int]:
    return Call(Op.DELETE_KEYS, {"keys": keys}, lambda r: _count(r.meta, "deleted", len(keys)))


def ping() -> Call[dict[str, Any]]:
    return Call(Op.PING, {}, _meta)


def clear() -> Call[int]:
    return Call(Op.CLEAR, {}, lambda r: _count(r.meta, "cleared_chunks"))


# -- reply fields -------------------------------------------------------------------------------------------
def _meta(reply: Message) -> dict[str, Any]:
    return reply.meta


def _field(meta: dict[str, Any], name: str, kind: type, default: Any = ...) -> Any:
    try:
        return get_field(meta, name, kind, default)
    except ProtocolError as exc:
        raise BadReply(f"reply {exc}") from None


def _count(meta: dict[str, Any], name: str, limit: int | None = None) -> int:
    value = _field(meta, name, int)
    if value < 0 or (limit is not None and value > limit):
        raise BadReply(f"reply field {name!r} = {value} out of range [0, {limit}]")
    return value


def _store_reply(reply: Message, num_tokens: int) -> StoreReply:
    counts = [_count(reply.meta, name, num_tokens) for name in ("stored_tokens", "skipped_tokens", "dropped_tokens")]
    if sum(counts) > num_tokens:
        raise BadReply(f"store reply accounts for {sum(counts)} of {num_tokens} tokens")
    return StoreReply(*counts)


def _tiers(meta: dict[str, Any], limit: int) -> dict[str, int]:
    tiers = _field(meta, "tiers", dict)
    if not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in tiers.items()):
        raise BadReply("reply field 'tiers' must map tier names to token counts")
    if any(v < 0 for v in tiers.values()) or sum(tiers.values()) > limit:
        raise BadReply("reply field 'tiers' counts more tokens than were asked for")
    return tiers


def _prefix_counts(meta: dict[str, Any], skip: int, end: int, limit: int) -> tuple[int, int, dict[str, int]]:
    """hit_tokens, loaded_tokens and tiers of a reply whose KV covers ``[skip, end)``, checked against it."""
    hit, loaded = _count(meta, "hit_tokens", limit), _count(meta, "loaded_tokens", limit)
    tiers = _tiers(meta, limit)
    expected = (end, end - skip) if end > skip else (0, 0)
    if end > limit or (hit, loaded) != expected or sum(tiers.values()) != expected[1]:
        raise BadReply(f"reply says {hit} hit / {loaded} loaded tokens for KV of tokens [{skip}, {end})")
    return hit, loaded, tiers


def _spans(meta: dict[str, Any]) -> list[ChunkSpan]:
    raw = _field(meta, "chunks", list)
    spans = []
    for item in raw:
        if not (
            isinstance(item, list)
            and len(item) == 3
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in item)
            and item[0] < item[1]
        ):
            raise BadReply(f"chunk {item!r} is not [start, end, offset] with 0 <= start < end, offset >= 0")
        spans.append(ChunkSpan(*item))
    return spans


def _pool_path(meta: dict[str, Any]) -> str:
    path = _field(meta, "path", str)
    if not is_pool_path(path):  # never map (and write into) a file the server names unless it is a pool
        raise BadReply(f"{path!r} is not a kvtier shared-memory pool")
    return path
