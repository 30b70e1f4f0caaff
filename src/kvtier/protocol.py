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
import os
import re
import struct
import tempfile
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
MAX_KEYS = 512  # chunk keys in one key-level request: each is ~100 bytes of JSON, and meta is at most 64 KiB
MAX_LAYOUT_DIM = 1 << 16  # layers, KV heads or head size of a layout a peer describes
MAX_BYTES_PER_TOKEN = 1 << 24  # 16 MiB of KV per token: 100x the largest models' (Llama-3-405B fp16: 504 KiB)


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
    """A message that does not follow the protocol; ``status`` is what the peer is told. ``op`` and
    ``request_id`` are the message's when its header was intact (0 when it was not), so the reply reaches the
    request that caused it."""

    def __init__(self, message: str, status: Status = Status.BAD_REQUEST, op: int = 0, request_id: int = 0) -> None:
        super().__init__(message)
        self.status = status
        self.op = op
        self.request_id = request_id


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
    try:
        if version != PROTOCOL_VERSION:
            raise ProtocolError(
                f"protocol version {version} not supported (this side speaks {PROTOCOL_VERSION})",
                Status.UNSUPPORTED_VERSION,
            )
        if count != len(frames) - 2:
            raise ProtocolError(f"header announces {count} payload frames, message has {len(frames) - 2}")
        if len(meta_raw) > MAX_META_BYTES:
            raise ProtocolError(f"meta frame exceeds {MAX_META_BYTES} bytes", Status.TOO_LARGE)
        if zlib.crc32(meta_raw) != meta_crc:
            raise ProtocolError("meta checksum mismatch")
        meta = parse_json_object(meta_raw, "meta") if meta_raw else {}
        try:
            status = Status(status)
        except ValueError:
            raise ProtocolError(f"unknown status {status}") from None
    except ProtocolError as exc:  # the header is intact: the error can be addressed to this request
        exc.op, exc.request_id = op, request_id
        raise
    return Message(op, request_id, meta, [memoryview(_buffer(f)) for f in frames[2:]], status, timeout_ms)


def parse_json_object(raw: bytes, what: str) -> dict[str, Any]:
    """A JSON object sent by a peer, or ProtocolError: never any other exception, whatever ``raw`` holds.

    Stricter than ``json.loads``, because the result is trusted by code that never expected anything else:
    nesting beyond the interpreter's recursion limit, integers outside 64 bits (``json`` parses 4,300 digits),
    NaN/Infinity, duplicate keys (two readers may pick different ones) and lone UTF-16 surrogates (they fail
    later, when a name is encoded) are all refused here.
    """
    try:
        value = json.loads(raw, parse_int=_int64, parse_constant=_no_constant, object_pairs_hook=_unique_keys)
        if b"\\u" in raw:  # only an escape can produce a lone surrogate; strict UTF-8 encoding rejects one
            json.dumps(value, ensure_ascii=False).encode()
    except RecursionError:
        raise ProtocolError(f"{what} is nested too deeply") from None
    except ProtocolError:
        raise
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError/EncodeError
        raise ProtocolError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} must be a JSON object")
    return value


def _int64(text: str) -> int:
    if len(text) > 20:  # -9223372036854775808 .. 18446744073709551615 need at most 20 characters
        raise ProtocolError("integer out of range (64 bits at most)")
    value = int(text)
    if not -(1 << 63) <= value < 1 << 64:
        raise ProtocolError("integer out of range (64 bits at most)")
    return value


def _no_constant(name: str) -> None:
    raise ProtocolError(f"{name} is not a number JSON allows")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) != len(pairs):
        raise ProtocolError("duplicate key in a JSON object")
    return value


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
    """The layout a peer describes, within sizes a real model has (so no size computed from it overflows)."""
    dims = {name: get_field(spec, name, int) for name in ("num_layers", "num_kv_heads", "head_dim")}
    if not all(0 < d <= MAX_LAYOUT_DIM for d in dims.values()):
        raise ProtocolError(f"bad layout: layers, KV heads and head size must be 1 to {MAX_LAYOUT_DIM}")
    try:
        layout = KVLayout(
            **dims, dtype=get_field(spec, "dtype", str, "float16"), kv_size=get_field(spec, "kv_size", int, 2)
        )
    except ValueError as exc:
        raise ProtocolError(f"bad layout: {exc}") from None
    if layout.bytes_per_token > MAX_BYTES_PER_TOKEN:
        raise ProtocolError(f"bad layout: {layout.bytes_per_token} bytes per token (at most {MAX_BYTES_PER_TOKEN})")
    return layout


def namespace_meta(model: str, layout: KVLayout, world_size: int, rank: int, chunk_size: int | None) -> dict[str, Any]:
    """The meta fields naming a client's namespace (sent with every prompt-level request)."""
    meta: dict[str, Any] = {"model": model, "layout": layout_to_meta(layout), "world_size": world_size, "rank": rank}
    if chunk_size is not None:
        meta["chunk_size"] = chunk_size
    return meta


# -- the shared-memory pool's file (same-host clients map it; see docs/protocol.md) -------------------------
POOL_NAME = re.compile(r"kvtier-(\d+)-([0-9a-f]{32})")  # kvtier-<server pid>-<server id>


def shared_memory_dir() -> str:
    """Where servers put their pool files: /dev/shm, or the temp dir where there is none."""
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def pool_path(pid: int, server_id: str) -> str:
    return os.path.join(shared_memory_dir(), f"kvtier-{pid}-{server_id}")


WRITER_NAME = re.compile(r"kvtier-client-(\d+)-([0-9a-f]{32})")  # kvtier-client-<client pid>-<random id>


def writer_path(name: str) -> str | None:
    """The path of the liveness file a client named in ``STORE_RESERVE`` (``session``), or None if the name is
    not one: the server opens nothing else on a client's word."""
    return os.path.join(shared_memory_dir(), name) if WRITER_NAME.fullmatch(name) else None


def is_pool_path(path: str) -> bool:
    """Whether ``path`` names a server's pool file: a client maps (and writes into) no other file a server
    names, so a hostile server cannot make it overwrite, say, the user's ~/.bashrc."""
    return os.path.dirname(path) == shared_memory_dir() and POOL_NAME.fullmatch(os.path.basename(path)) is not None
