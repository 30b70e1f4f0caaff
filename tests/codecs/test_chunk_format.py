"""The stored chunk format v1: header round trip, documented byte layout, and every corruption detected."""

from __future__ import annotations

import hashlib
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.codecs.chunk_format import (
    CHUNK_HEADER_SIZE,
    FORMAT_VERSION,
    MAGIC,
    ChunkHeader,
    decode_header,
    make_header,
    verify_payload,
)
from kvtier.errors import CorruptChunkError, StorageError, TruncatedChunkError
from kvtier.memory.layout import DTYPES_BY_NAME, KVLayout
from kvtier.tokens.keys import KEY_ID_SIZE

# Field offsets of the v1 header (little-endian; see the format description in chunk_format.py).
VERSION, HEADER_LEN, CODEC, DTYPE, KV_SIZE = 4, 6, 8, 9, 10
LAYERS, HEADS, HEAD_DIM, TOKENS, PAYLOAD_SIZE, PAYLOAD_CRC, KEY = 12, 16, 20, 24, 28, 36, 40
HEADER_CRC = CHUNK_HEADER_SIZE - 4

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16")
KEY_A = hashlib.blake2b(b"key-a", digest_size=KEY_ID_SIZE).digest()
KEY_B = hashlib.blake2b(b"key-b", digest_size=KEY_ID_SIZE).digest()


def chunk(num_tokens: int = 32, layout: KVLayout = LAYOUT, key_id: bytes = KEY_A) -> tuple[bytes, bytes]:
    payload = hashlib.shake_128(key_id).digest(layout.chunk_bytes(num_tokens))
    return make_header(key_id, layout, num_tokens, payload), payload


def edit(header: bytes, fmt: str, offset: int, value: int, reseal: bool = True) -> bytes:
    """Change one header field; ``reseal`` recomputes the header checksum so only the field check can catch it."""
    raw = bytearray(header)
    struct.pack_into(fmt, raw, offset, value)
    if reseal:
        raw[HEADER_CRC:] = zlib.crc32(bytes(raw[:HEADER_CRC])).to_bytes(4, "little")
    return bytes(raw)


layouts = st.builds(
    KVLayout,
    num_layers=st.integers(1, 80),
    num_kv_heads=st.integers(1, 16),
    head_dim=st.sampled_from([8, 64, 128, 576]),
    dtype=st.sampled_from(sorted(DTYPES_BY_NAME)),
    kv_size=st.sampled_from([1, 2]),
)


@settings(max_examples=60, deadline=None)
@given(layout=layouts, num_tokens=st.integers(0, 4096), key_id=st.binary(min_size=KEY_ID_SIZE, max_size=KEY_ID_SIZE))
def test_header_round_trip(layout: KVLayout, num_tokens: int, key_id: bytes) -> None:
    """Every layout, dtype and token count encodes to 128 bytes and decodes to the same header."""
    size = layout.chunk_bytes(num_tokens)
    header = ChunkHeader(key_id, layout, num_tokens, size, 0xDEADBEEF)
    raw = header.encode()
    assert len(raw) == CHUNK_HEADER_SIZE
    assert decode_header(raw, key_id) == header
    assert decode_header(raw + b"payload follows") == header  # only the first 128 bytes are the header


def test_header_layout_is_the_documented_one() -> None:
    """The bytes on disk follow the v1 layout field by field (other implementations read them)."""
    raw, payload = chunk(32)
    assert raw[:4] == MAGIC == b"KVTC"
    assert struct.unpack_from("<HHBBB", raw, VERSION) == (FORMAT_VERSION, CHUNK_HEADER_SIZE, 0, 1, 2)
    assert struct.unpack_from("<IIII", raw, LAYERS) == (2, 2, 8, 32)
    assert struct.unpack_from("<QI", raw, PAYLOAD_SIZE) == (len(payload), zlib.crc32(payload))
    assert raw[KEY : KEY + KEY_ID_SIZE] == KEY_A
    assert raw[KEY + KEY_ID_SIZE : HEADER_CRC] == bytes(HEADER_CRC - KEY - KEY_ID_SIZE)
    assert int.from_bytes(raw[HEADER_CRC:], "little") == zlib.crc32(raw[:HEADER_CRC])


def test_valid_chunk_verifies() -> None:
    raw, payload = chunk(7)
    header = decode_header(raw, KEY_A)
    assert (header.layout, header.num_tokens, header.payload_size) == (LAYOUT, 7, len(payload))
    verify_payload(header, payload)
    verify_payload(header, payload + b"\0\0")  # a larger read buffer is fine: only payload_size bytes count


def test_make_header_rejects_a_bad_key_id() -> None:
    with pytest.raises(ValueError, match="key id"):
        make_header(KEY_A[:-1], LAYOUT, 1, bytes(LAYOUT.chunk_bytes(1)))


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda h: b"XVTC" + h[4:], "bad magic"),
        (lambda h: edit(h, "<H", VERSION, 2), "version"),
        (lambda h: edit(h, "<H", HEADER_LEN, 256), "version"),
        (lambda h: edit(h, "<I", TOKENS, 33, reseal=False), "header checksum"),
        (lambda h: h[:HEADER_CRC] + bytes(4), "header checksum"),
        (lambda h: edit(h, "<B", CODEC, 1), "codec"),
        (lambda h: edit(h, "<B", DTYPE, 99), "unknown dtype"),
        (lambda h: edit(h, "<B", DTYPE, 0), "unknown dtype"),
        (lambda h: edit(h, "<B", KV_SIZE, 3), "bad layout"),
        (lambda h: edit(h, "<I", LAYERS, 0), "bad layout"),
        (lambda h: edit(h, "<Q", PAYLOAD_SIZE, 4097), "payload size"),
        (lambda h: edit(h, "<I", TOKENS, 31), "payload size"),
        (lambda h: edit(h, "<B", DTYPE, DTYPES_BY_NAME["float32"].code), "payload size"),
    ],
    ids=[
        "magic",
        "version",
        "header-size",
        "field-without-reseal",
        "header-crc",
        "codec",
        "dtype-99",
        "dtype-0",
        "kv-size",
        "zero-layers",
        "payload-size",
        "token-count",
        "dtype-width",
    ],
)
def test_damaged_header_is_rejected(tamper, message: str) -> None:
    """Each damaged or inconsistent header field raises CorruptChunkError naming the problem."""
    raw, _ = chunk(32)
    with pytest.raises(CorruptChunkError, match=message) as info:
        decode_header(tamper(raw), KEY_A)
    assert not isinstance(info.value, TruncatedChunkError)


def test_chunk_under_another_key_is_rejected() -> None:
    """A valid chunk presented for another key (a swapped or renamed file) is rejected."""
    raw, _ = chunk(32, key_id=KEY_A)
    with pytest.raises(CorruptChunkError, match="another key"):
        decode_header(raw, KEY_B)
    assert decode_header(raw).key_id == KEY_A  # without an expected key, anything valid decodes


@pytest.mark.parametrize("offset", [0, 1, 4095])
def test_payload_bit_flip_fails_the_checksum(offset: int) -> None:
    raw, payload = chunk(32)
    header = decode_header(raw, KEY_A)
    damaged = bytearray(payload)
    damaged[offset] ^= 0x01
    with pytest.raises(CorruptChunkError, match="payload checksum") as info:
        verify_payload(header, bytes(damaged))
    assert not isinstance(info.value, TruncatedChunkError)


@pytest.mark.parametrize("length", [0, 1, 64, CHUNK_HEADER_SIZE - 1])
def test_truncated_header(length: int) -> None:
    raw, _ = chunk(32)
    with pytest.raises(TruncatedChunkError, match="header truncated"):
        decode_header(raw[:length], KEY_A)


@pytest.mark.parametrize("length", [0, 1, 4095])
def test_truncated_payload(length: int) -> None:
    raw, payload = chunk(32)
    header = decode_header(raw, KEY_A)
    with pytest.raises(TruncatedChunkError, match="payload truncated"):
        verify_payload(header, payload[:length])


def test_error_hierarchy() -> None:
    """Truncation is a kind of corruption, and both are storage errors: one except clause catches all."""
    assert issubclass(TruncatedChunkError, CorruptChunkError)
    assert issubclass(CorruptChunkError, StorageError)
