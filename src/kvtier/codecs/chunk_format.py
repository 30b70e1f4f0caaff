"""The stored chunk format (version 1): a fixed 128-byte header followed by the KV payload, raw or encoded.

Every tier that stores bytes outside process memory (disk, Redis, S3, the server's wire) uses this format, so
a chunk read back is checked the same way everywhere: magic, format version, header checksum, the full key
(namespace digest + chunk hash: a file renamed or swapped under another key is rejected), the layout, the
payload's codec and codec version (``kvtier.codecs.registry``), the payload size (truncation) and a CRC-32 of the
payload as stored (so damage is caught before anything is decoded). See ``docs/chunk_format.md``.
"""

from __future__ import annotations

import contextlib
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from kvtier.codecs.base import CannotEncode, Codec
from kvtier.codecs.registry import NAIVE, codec_with_id
from kvtier.errors import CodecMismatchError, CorruptChunkError, TruncatedChunkError
from kvtier.memory.layout import DTYPES_BY_CODE, DTYPES_BY_NAME, KVLayout
from kvtier.memory.memory_obj import MemoryObj
from kvtier.tokens.keys import KEY_ID_SIZE

try:  # ISA-L computes the same CRC-32 about 7x faster than zlib (27 vs 3.7 GB/s here): `pip install kvtier[fast]`
    from isal.isal_zlib import crc32 as _crc32
except ImportError:
    from zlib import crc32 as _crc32

MAGIC = b"KVTC"
FORMAT_VERSION = 1
CHUNK_HEADER_SIZE = 128
CODEC_RAW = 0

# magic, version, header size, codec, dtype code, kv size, codec version, layers, kv heads, head dim, tokens,
# payload size, payload crc32, key id (namespace digest + chunk hash); then padding; header crc32 is last.
_BODY = struct.Struct("<4sHHBBBBIIIIQI48s")
_PAD = CHUNK_HEADER_SIZE - _BODY.size - 4


@dataclass(frozen=True, slots=True)
class ChunkHeader:
    """The decoded header of a stored chunk."""

    key_id: bytes
    layout: KVLayout
    num_tokens: int
    payload_size: int
    payload_crc32: int
    codec: int = CODEC_RAW
    codec_version: int = 0

    def encode(self) -> bytes:
        body = _BODY.pack(
            MAGIC,
            FORMAT_VERSION,
            CHUNK_HEADER_SIZE,
            self.codec,
            DTYPES_BY_NAME[self.layout.dtype].code,
            self.layout.kv_size,
            self.codec_version,
            self.layout.num_layers,
            self.layout.num_kv_heads,
            self.layout.head_dim,
            self.num_tokens,
            self.payload_size,
            self.payload_crc32,
            self.key_id,
        ) + bytes(_PAD)
        return body + zlib.crc32(body).to_bytes(4, "little")


def payload_crc32(payload: memoryview | bytes) -> int:
    return _crc32(payload)


def make_header(
    key_id: bytes, layout: KVLayout, num_tokens: int, payload: memoryview | bytes, codec: Codec = NAIVE
) -> bytes:
    """Encode the header for ``payload`` (the chunk's bytes as ``codec`` encoded them) stored under ``key_id``."""
    if len(key_id) != KEY_ID_SIZE:
        raise ValueError("key id has the wrong size")
    crc = payload_crc32(payload)
    return ChunkHeader(key_id, layout, num_tokens, len(payload), crc, codec.codec_id, codec.version).encode()


def decode_header(raw: bytes | memoryview, expected_key_id: bytes | None = None) -> ChunkHeader:
    """Parse and verify a header; raise CorruptChunkError (or TruncatedChunkError) if anything is off."""
    if len(raw) < CHUNK_HEADER_SIZE:
        raise TruncatedChunkError(f"header truncated: {len(raw)} of {CHUNK_HEADER_SIZE} bytes")
    raw = bytes(raw[:CHUNK_HEADER_SIZE])
    if raw[:4] != MAGIC:
        raise CorruptChunkError("bad magic: not a kvtier chunk")
    if zlib.crc32(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
        raise CorruptChunkError("header checksum mismatch")
    (
        _,
        version,
        header_size,
        codec,
        dtype_code,
        kv_size,
        codec_version,
        layers,
        heads,
        head_dim,
        tokens,
        payload_size,
        crc,
        key_id,
    ) = _BODY.unpack_from(raw)
    if version != FORMAT_VERSION or header_size != CHUNK_HEADER_SIZE:
        raise CorruptChunkError(f"unsupported chunk format version {version} (this build reads {FORMAT_VERSION})")
    payload_codec = codec_with_id(codec)
    if payload_codec is None or payload_codec.version != codec_version:
        raise CodecMismatchError(f"chunk encoded with codec {codec} version {codec_version}: not readable here")
    if expected_key_id is not None and key_id != expected_key_id:
        raise CorruptChunkError("chunk is stored under another key")
    dtype = DTYPES_BY_CODE.get(dtype_code)
    if dtype is None:
        raise CorruptChunkError(f"unknown dtype code {dtype_code}")
    try:
        layout = KVLayout(layers, heads, head_dim, dtype.name, kv_size)
    except ValueError as exc:
        raise CorruptChunkError(f"bad layout in header: {exc}") from None
    if codec == CODEC_RAW and layout.chunk_bytes(tokens) != payload_size:
        raise CorruptChunkError("payload size does not match layout and token count")
    if payload_size > payload_codec.max_encoded_size(layout, tokens):
        raise CorruptChunkError(f"payload size too large for a {payload_codec.name} chunk of this layout")
    return ChunkHeader(key_id, layout, tokens, payload_size, crc, codec, codec_version)


def verify_payload(header: ChunkHeader, payload: memoryview | bytes) -> None:
    """Raise if ``payload`` is shorter than the header says or fails its CRC-32."""
    if len(payload) < header.payload_size:
        raise TruncatedChunkError(f"payload truncated: {len(payload)} of {header.payload_size} bytes")
    if _crc32(payload[: header.payload_size]) != header.payload_crc32:
        raise CorruptChunkError("payload checksum mismatch")


def encode_chunk(key_id: bytes, obj: MemoryObj, codec: Codec = NAIVE) -> tuple[bytes, memoryview | bytes]:
    """A chunk in the stored format as two parts, header and payload: the object's memory itself (not copied) for
    ``naive``, else ``codec``'s encoding of it (raw when the codec cannot encode this chunk)."""
    payload: memoryview | bytes = memoryview(obj.data)
    used = NAIVE
    if codec is not NAIVE and codec.supports(obj.layout, obj.num_tokens):
        with contextlib.suppress(CannotEncode):
            payload, used = codec.encode(payload, obj.layout, obj.num_tokens), codec  # type: ignore[arg-type]
    return make_header(key_id, obj.layout, obj.num_tokens, payload, used), payload


def readable_codec(header: ChunkHeader, accept: Codec) -> Codec:
    """The codec to decode ``header``'s payload with. A tier reads raw and lossless chunks always, lossy ones only
    of its own codec and version: a reader configured for exact KV never gets approximate KV (CodecMismatchError)."""
    codec = codec_with_id(header.codec)
    assert codec is not None  # decode_header checked it
    if codec.lossy and (codec.codec_id, codec.version) != (accept.codec_id, accept.version):
        raise CodecMismatchError(f"chunk is {codec.name}-encoded (lossy); this reader takes {accept.name}")
    return codec


def decode_payload(header: ChunkHeader, payload: memoryview, obj: MemoryObj, codec: Codec) -> None:
    """Decode a verified ``payload`` into ``obj``'s memory with ``codec`` (:func:`readable_codec`'s answer for the
    header); CorruptChunkError if it does not decode."""
    try:
        codec.decode(payload[: header.payload_size], header.layout, header.num_tokens, memoryview(obj.data))
    except CorruptChunkError:
        raise
    except Exception as exc:  # a library's error on bytes that pass the CRC (a hostile writer): still a miss
        raise CorruptChunkError(f"{codec.name} payload does not decode: {exc}") from None


def decode_chunk(
    value: bytes | bytearray | memoryview,
    key_id: bytes,
    allocate: Callable[[KVLayout, int], MemoryObj | None],
    accept: Codec = NAIVE,
) -> MemoryObj | None:
    """The chunk ``value`` holds (stored format, under ``key_id``), verified, then decoded into memory from
    ``allocate``; None when memory is short. CorruptChunkError (TruncatedChunkError, CodecMismatchError) if
    anything is off: nothing stays allocated for a chunk that fails."""
    view = memoryview(value)
    header = decode_header(view[:CHUNK_HEADER_SIZE], key_id)
    payload = view[CHUNK_HEADER_SIZE:]
    verify_payload(header, payload)
    codec = readable_codec(header, accept)  # before allocating
    obj = allocate(header.layout, header.num_tokens)
    if obj is not None:
        try:
            decode_payload(header, payload, obj, codec)
        except CorruptChunkError:
            obj.unref()
            raise
    return obj
