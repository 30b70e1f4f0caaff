"""Payload codecs: lossless ones bit-exact on every dtype, lossy ones within their stated bound, and every bad,
mismatched or hostile encoded payload a CorruptChunkError (a counted miss), never wrong KV or a crash."""

from __future__ import annotations

import hashlib
import struct
import zlib

import numpy as np
import pytest

from kvtier.codecs.chunk_format import (
    CHUNK_HEADER_SIZE,
    CODEC_RAW,
    ChunkHeader,
    decode_chunk,
    decode_header,
    encode_chunk,
)
from kvtier.codecs.registry import CODECS, NAIVE, codec_named
from kvtier.errors import CodecMismatchError, ConfigError, CorruptChunkError
from kvtier.memory.layout import DTYPES_BY_NAME, KVLayout
from kvtier.memory.pool import MemoryPool
from kvtier.tokens.keys import KEY_ID_SIZE

torch = pytest.importorskip("torch")
pytest.importorskip("blosc2")

KEY = hashlib.blake2b(b"codec-key", digest_size=KEY_ID_SIZE).digest()
CODEC_VERSION_OFFSET, PAYLOAD_SIZE_OFFSET, PAYLOAD_CRC_OFFSET = 11, 28, 36
LOSSY = sorted(name for name in CODECS if codec_named(name).lossy)
# Relative L2 error bounds on KV-like values (measured on SmolLM2's own KV: int8 0.011, int4 0.127, cachegen
# 0.076, cachegen-hq 0.019; the
# quality these cost through the model is the quality gate's subject, not this bound's).
ERROR_BOUND = {"int8": 0.02, "int4": 0.2, "cachegen": 0.12, "cachegen-hq": 0.04}


@pytest.fixture
def pool() -> MemoryPool:
    p = MemoryPool(64 << 20)
    yield p
    p.close()


def random_bytes(pool: MemoryPool, layout: KVLayout, tokens: int):
    """An object holding every bit pattern (NaNs and infinities included, for float dtypes)."""
    obj = pool.allocate(layout, tokens)
    assert obj is not None
    obj.data[:] = np.random.default_rng(1).integers(0, 256, obj.nbytes, dtype=np.uint8)
    return obj


def stored(obj, codec) -> bytes:
    header, payload = encode_chunk(KEY, obj, codec)
    return header + bytes(payload)


def reseal(value: bytes, payload: bytes) -> bytes:
    """``value``'s header over another payload, with its size and CRC updated (a writer that means harm)."""
    header = bytearray(value[:CHUNK_HEADER_SIZE])
    struct.pack_into("<Q", header, PAYLOAD_SIZE_OFFSET, len(payload))
    struct.pack_into("<I", header, PAYLOAD_CRC_OFFSET, zlib.crc32(payload))
    header[-4:] = zlib.crc32(bytes(header[:-4])).to_bytes(4, "little")
    return bytes(header) + payload


@pytest.mark.parametrize("dtype", sorted(DTYPES_BY_NAME))
@pytest.mark.parametrize("tokens", [1, 7, 256])
def test_lossless_is_bit_exact_on_every_dtype(pool, make_kv_obj, dtype: str, tokens: int) -> None:
    layout = KVLayout(num_layers=3, num_kv_heads=2, head_dim=64, dtype=dtype)
    codec = codec_named("lossless")
    is_float = dtype in ("float16", "bfloat16", "float32")
    for obj in (random_bytes(pool, layout, tokens), *([make_kv_obj(layout, tokens)] if is_float else [])):
        value = stored(obj, codec)
        assert decode_header(value[:CHUNK_HEADER_SIZE]).codec == codec.codec_id
        got = decode_chunk(value, KEY, pool.allocate)  # any reader takes lossless chunks
        assert got is not None and np.array_equal(got.data, obj.data)
        got.unref()
        obj.unref()


def test_lossless_compresses_kv_like_bf16(make_kv_obj) -> None:
    layout = KVLayout(num_layers=4, num_kv_heads=2, head_dim=64, dtype="bfloat16")
    obj = make_kv_obj(layout, 256)
    assert len(stored(obj, codec_named("lossless"))) < 0.85 * obj.nbytes
    obj.unref()


@pytest.mark.parametrize("name", LOSSY)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_lossy_codecs_stay_within_their_bound(pool, make_kv_obj, name: str, dtype: str) -> None:
    layout = KVLayout(num_layers=4, num_kv_heads=3, head_dim=64, dtype=dtype)
    codec = codec_named(name)
    obj = make_kv_obj(layout, 256)
    value = stored(obj, codec)
    assert len(value) < 0.6 * obj.nbytes
    got = decode_chunk(value, KEY, pool.allocate, codec)
    assert got is not None
    reference = obj.tensor().float()
    error = (got.tensor().float() - reference).norm() / reference.norm()
    assert error < ERROR_BOUND[name]
    got.unref()
    obj.unref()


@pytest.mark.parametrize("name", LOSSY)
def test_lossy_chunks_are_misses_for_readers_of_exact_kv(pool, make_kv_obj, name: str) -> None:
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, dtype="float16")
    obj = make_kv_obj(layout, 16)
    value = stored(obj, codec_named(name))
    free = pool.used_bytes
    for reader in (NAIVE, codec_named("lossless"), *(codec_named(n) for n in LOSSY if n != name)):
        with pytest.raises(CodecMismatchError):
            decode_chunk(value, KEY, pool.allocate, reader)
    assert pool.used_bytes == free  # nothing allocated for a chunk it does not take
    obj.unref()


@pytest.mark.parametrize("name", sorted(CODECS))
def test_a_newer_codec_version_or_an_unknown_codec_is_a_mismatch(pool, make_kv_obj, name: str) -> None:
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, dtype="float16")
    obj = make_kv_obj(layout, 16)
    codec = codec_named(name)
    value = bytearray(stored(obj, codec))
    for offset, field in ((CODEC_VERSION_OFFSET, codec.version + 1), (8, 200)):
        edited = bytearray(value)
        edited[offset] = field
        edited[CHUNK_HEADER_SIZE - 4 : CHUNK_HEADER_SIZE] = zlib.crc32(bytes(edited[: CHUNK_HEADER_SIZE - 4])).to_bytes(
            4, "little"
        )
        with pytest.raises(CodecMismatchError):
            decode_chunk(bytes(edited), KEY, pool.allocate, codec)
    obj.unref()


@pytest.mark.parametrize("name", [n for n in sorted(CODECS) if n != "naive"])
def test_damaged_and_hostile_encoded_payloads_are_corrupt(pool, make_kv_obj, name: str) -> None:
    """A flipped bit fails the CRC; a payload rewritten with a valid CRC but cut short or grown fails decoding:
    CorruptChunkError, and the pool gets its memory back. Garbage of the right size is caught by the Blosc2
    frame's structure; a quantizer's codes have none (like a raw payload's bytes), so there it must only never
    crash."""
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, dtype="bfloat16")
    codec = codec_named(name)
    obj = make_kv_obj(layout, 32)
    value = stored(obj, codec)
    payload = value[CHUNK_HEADER_SIZE:]
    flipped = bytearray(value)
    flipped[CHUNK_HEADER_SIZE + len(payload) // 2] ^= 0x10
    resized = [payload[: len(payload) // 2], payload + b"\0" * 64, payload[:-1], b""]
    used = pool.used_bytes
    for bad in (bytes(flipped), *(reseal(value, p) for p in resized)):
        with pytest.raises(CorruptChunkError):
            decode_chunk(bad, KEY, pool.allocate, codec)
    for garbage in (bytes(len(payload)), hashlib.shake_256(payload).digest(len(payload))):
        try:
            got = decode_chunk(reseal(value, garbage), KEY, pool.allocate, codec)
        except CorruptChunkError:
            continue
        assert codec.lossy, "a lossless frame of garbage must not decode"
        got.unref()  # type: ignore[union-attr]
    assert pool.used_bytes == used
    obj.unref()


def test_a_claimed_payload_beyond_the_codecs_largest_is_corrupt(pool, make_kv_obj) -> None:
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, dtype="float16")
    obj = make_kv_obj(layout, 16)
    value = stored(obj, codec_named("int8"))
    with pytest.raises(CorruptChunkError, match="too large"):
        decode_chunk(reseal(value, value[CHUNK_HEADER_SIZE:] * 3), KEY, pool.allocate, codec_named("int8"))
    obj.unref()


@pytest.mark.parametrize("name", LOSSY)
@pytest.mark.parametrize("dtype", ["float16", "float8_e4m3fn", "int8"])
def test_what_a_lossy_codec_cannot_represent_is_stored_raw(pool, name: str, dtype: str) -> None:
    """Non-finite values, or a dtype a quantizer does not take: the chunk goes raw (exact), never approximated
    into garbage."""
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, dtype=dtype)
    obj = random_bytes(pool, layout, 16)  # NaNs and infinities in fp16
    value = stored(obj, codec_named(name))
    assert decode_header(value[:CHUNK_HEADER_SIZE]).codec == CODEC_RAW
    got = decode_chunk(value, KEY, pool.allocate)
    assert got is not None and np.array_equal(got.data, obj.data)
    got.unref()
    obj.unref()


def test_each_codec_carries_the_id_its_registry_entry_names() -> None:
    """Headers are read by the registry's ids without importing every codec: the two must agree."""
    for name, entry in CODECS.items():
        codec = codec_named(name)
        assert (codec.name, codec.codec_id) == (name, entry.codec_id)


def test_unknown_codec_names_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown codec 'cachegen2'"):
        codec_named("cachegen2")


def test_header_carries_codec_and_version() -> None:
    header = ChunkHeader(KEY, KVLayout(1, 1, 8), 4, 10, 0, codec=2, codec_version=7)
    raw = header.encode()
    assert raw[8] == 2 and raw[CODEC_VERSION_OFFSET] == 7
