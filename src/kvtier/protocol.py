"""The kvtier wire protocol, version 1: ZMQ multipart messages between clients and ``kvtier server``.

Every message (request or reply) is ``[header, meta, *payload]``:

- ``header``: 32 bytes, little-endian: magic ``KVTP``, protocol version (u16), op (u8), status (u8, 0 in
  requests), request id (u64), timeout in ms (u32, 0 = none), number of payload frames (u32), CRC-32 of the
  meta frame (u32), CRC-32 of the preceding 28 header bytes (u32);
- ``meta``: a JSON object (UTF-8, at most ``MAX_META_BYTES``) with the op's arguments or results;
- ``payload``: binary frames: token ids as little-endian u32, KV as raw bytes in the layout's
  ``(layers, kv, tokens, kv_heads, head_dim)`` order.

No pickle, nothing executable: a peer can only send numbers, strings and bytes, each checked before use.
``docs/protocol.md`` describes every op.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from kvtier.memory.layout import KVLayout

MAGIC = b"KVTP"
PROTOCOL_VERSION = 1
HEADER = struct.Struct("<4sHBBQIII")  # + header CRC-32 (u32)
FRAME_HEADER_SIZE = HEADER.size + 4
MAX_META_BYTES = 64 * 1024
MAX_KEYS = 1024  # chunk keys in one key-level request (each ~100 bytes of meta)


class Op(IntEnum):
    PING = 1
    LOOKUP = 2
    STORE = 3
    RETRIEVE = 4
    PREFETCH = 5
    DELETE = 6
    CLEAR = 7
    STATS = 8
    RELEASE = 9
    EXISTS_KEYS = 10
    GET_KEYS = 11
    PUT_KEYS = 12
    DELETE_KEYS = 13
    SHM_INFO = 14
    STORE_RESERVE = 15
    STORE_COMMIT = 16
    RETRIEVE_PIN = 17
    SHM_RELEASE = 18


class Status(IntEnum):
    OK = 0
    BAD_REQUEST = 1
    UNSUPPORTED_VERSION = 2
    UNAUTHORIZED = 3
    TOO_LARGE = 4
    DEADLINE_EXCEEDED = 5
    UNKNOWN_OP = 6
    BUSY = 7
    INTERNAL = 8


class ProtocolError(ValueError):
    """A message that does not follow the protocol; ``status`` is what the peer is told."""

    def __init__(self, message: str, status: Status = Status.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Message:
    """A decoded request or reply."""

    op: int
    request_id: int
    meta: dict[str, Any] = field(default_factory=dict)
    payload: list[memoryview] = field(default_factory=list)
    status: Status = Status.OK
    timeout_ms: int = 0


def encode(msg: Message) -> list[bytes | memoryview]:
    """Frames for ``msg``; payload frames are passed through without copies."""
    meta = json.dumps(msg.meta, separators=(",", ":")).encode()
    if len(meta) > MAX_META_BYTES:
        raise ProtocolError(f"meta frame of {len(meta)} bytes exceeds {MAX_META_BYTES}", Status.TOO_LARGE)
    head = HEADER.pack(
        MAGIC,
        PROTOCOL_VERSION,
        int(msg.op),
        int(msg.status),
        msg.request_id,
        msg.timeout_ms,
        len(msg.payload),
        zlib.crc32(meta),
    )
    return [head + zlib.crc32(head).to_bytes(4, "little"), meta, *msg.payload]


def decode(frames: list[Any]) -> Message:
    """Parse and check frames (bytes, memoryviews or zmq Frames); raise ProtocolError on anything off."""
    if len(frames) < 2:
        raise ProtocolError(f"a message has at least 2 frames (header, meta), got {len(frames)}")
    head, meta_raw = _bytes(frames[0]), _bytes(frames[1])
    if len(head) != FRAME_HEADER_SIZE or head[:4] != MAGIC:
        raise ProtocolError("not a kvtier message (bad header size or magic)")
    if zlib.crc32(head[:-4]) != int.from_bytes(head[-4:], "little"):
        raise ProtocolError("header checksum mismatch")
    _, version, op, status, request_id, timeout_ms, count, meta_crc = HEADER.unpack_from(head)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {version} not supported (server speaks {PROTOCOL_VERSION})", Status.UNSUPPORTED_VERSION
        )
    if count != len(frames) - 2:
        raise ProtocolError(f"header announces {count} payload frames, message has {len(frames) - 2}")
    if len(meta_raw) > MAX_META_BYTES:
        raise ProtocolError(f"meta frame exceeds {MAX_META_BYTES} bytes", Status.TOO_LARGE)
    if zlib.crc32(meta_raw) != meta_crc:
        raise ProtocolError("meta checksum mismatch")
    try:
        meta = json.loads(meta_raw) if meta_raw else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"meta is not JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise ProtocolError("meta must be a JSON object")
    try:
        status = Status(status)
    except ValueError:
        raise ProtocolError(f"unknown status {status}") from None
    return Message(op, request_id, meta, [memoryview(_buffer(f)) for f in frames[2:]], status, timeout_ms)


def _buffer(frame: Any) -> Any:
    return frame.buffer if hasattr(frame, "buffer") else frame


def _bytes(frame: Any) -> bytes:
    return bytes(_buffer(frame))


def get_field(meta: dict[str, Any], name: str, kind: type, default: Any = ...) -> Any:
    """``meta[name]`` checked to be of ``kind`` (bools are not ints); ProtocolError otherwise."""
    if name not in meta:
        if default is ...:
            raise ProtocolError(f"missing field {name!r}")
        return default
    value = meta[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(f"field {name!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def layout_to_meta(layout: KVLayout) -> dict[str, Any]:
    return {
        "num_layers": layout.num_layers,
        "num_kv_heads": layout.num_kv_heads,
        "head_dim": layout.head_dim,
        "dtype": layout.dtype,
        "kv_size": layout.kv_size,
    }


def layout_from_meta(spec: dict[str, Any]) -> KVLayout:
    try:
        return KVLayout(
            num_layers=get_field(spec, "num_layers", int),
            num_kv_heads=get_field(spec, "num_kv_heads", int),
            head_dim=get_field(spec, "head_dim", int),
            dtype=get_field(spec, "dtype", str, "float16"),
            kv_size=get_field(spec, "kv_size", int, 2),
        )
    except ValueError as exc:
        raise ProtocolError(f"bad layout: {exc}") from None


def namespace_meta(model: str, layout: KVLayout, world_size: int, rank: int, chunk_size: int | None) -> dict[str, Any]:
    """The meta fields naming a client's namespace (sent with every prompt-level request)."""
    meta: dict[str, Any] = {"model": model, "layout": layout_to_meta(layout), "world_size": world_size, "rank": rank}
    if chunk_size is not None:
        meta["chunk_size"] = chunk_size
    return meta
