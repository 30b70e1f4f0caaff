"""The wire protocol's decoder: whatever a peer sends, ``decode`` returns a checked message or raises
ProtocolError, never anything else (a server loop or a client must be able to rely on that one exception)."""

from __future__ import annotations

import zlib

import pytest

from kvtier.protocol import FRAME_HEADER_SIZE, Message, Op, ProtocolError, decode, encode, layout_from_meta


def with_meta(meta: bytes, op: Op = Op.PING) -> list[bytes]:
    """A message whose header is valid for ``meta`` (checksums included), so only the meta is hostile."""
    head = bytearray(bytes(encode(Message(op, 7))[0]))
    head[24:28] = zlib.crc32(meta).to_bytes(4, "little")
    head[-4:] = zlib.crc32(bytes(head[:-4])).to_bytes(4, "little")
    assert len(head) == FRAME_HEADER_SIZE
    return [bytes(head), meta]


HOSTILE_JSON = {
    # nested far beyond Python's recursion limit, within the 64 KiB a meta frame may have
    "deep list": b"[" * 32_000 + b"]" * 32_000,
    "deep object": b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
    "deep inside a field": b'{"layout":' + b"[" * 30_000 + b"]" * 30_000 + b"}",
    "huge integer": b'{"lease":' + b"9" * 5000 + b"}",
    "integer over 64 bits": b'{"lease":' + str(2**64).encode() + b"}",
    "negative huge integer": b'{"skip_tokens":-' + b"1" * 30 + b"}",
    "NaN": b'{"limit":NaN}',
    "Infinity": b'{"limit":-Infinity}',
    "duplicate keys": b'{"model":"a","model":"b"}',
    "lone surrogate": b'{"model":"\\ud800"}',
    "invalid utf-8": b'{"model":"\xff\xfe"}',
    "not an object": b"[1,2,3]",
    "trailing garbage": b'{"a":1} x',
}


@pytest.mark.parametrize("meta", list(HOSTILE_JSON.values()), ids=list(HOSTILE_JSON))
def test_hostile_meta_is_a_protocol_error(meta: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(with_meta(meta))


def test_ordinary_meta_still_decodes() -> None:
    message = decode(with_meta(b'{"lease":18446744073709551615,"x":[1,2.5,"s",null,true],"y":{"z":-3}}'))
    assert message.meta == {"lease": 2**64 - 1, "x": [1, 2.5, "s", None, True], "y": {"z": -3}}


@pytest.mark.parametrize(
    "spec",
    [
        {"num_layers": 10**30, "num_kv_heads": 1, "head_dim": 1},
        {"num_layers": 1 << 20, "num_kv_heads": 1 << 20, "head_dim": 1 << 20},
        {"num_layers": 1, "num_kv_heads": 1, "head_dim": 1, "dtype": ["float16"]},
        {"num_layers": 1, "num_kv_heads": 1, "head_dim": 1, "kv_size": 3},
    ],
)
def test_absurd_layouts_are_refused(spec: dict) -> None:
    with pytest.raises(ProtocolError):
        layout_from_meta(spec)
