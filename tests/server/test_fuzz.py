"""Protocol fuzzing: thousands of malformed messages never crash or hang the server, and a well-behaved client
is answered correctly throughout."""

from __future__ import annotations

import json
import random
import zlib

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import CHUNK, LAYOUT
from kvtier.protocol import FRAME_HEADER_SIZE, MAX_KEYS, Message, Op, Status, decode, encode, layout_to_meta

NAMESPACE = {"model": "test-model", "layout": layout_to_meta(LAYOUT), "chunk_size": CHUNK}


def valid_messages(rng: random.Random) -> list[list[bytes]]:
    """Well-formed messages of every op, to be mutated."""
    tokens = np.arange(rng.randrange(0, 80), dtype="<u4").tobytes()
    kv = bytes(LAYOUT.chunk_bytes(len(tokens) // 4))
    messages = [
        Message(Op.PING, 1),
        Message(Op.LOOKUP, 2, dict(NAMESPACE), [tokens]),
        Message(Op.STORE, 3, dict(NAMESPACE), [tokens, kv]),
        Message(Op.RETRIEVE, 4, {**NAMESPACE, "skip_tokens": 16}, [tokens]),
        Message(Op.PREFETCH, 5, dict(NAMESPACE), [tokens]),
        Message(Op.DELETE, 6, dict(NAMESPACE), [tokens]),
        Message(Op.STATS, 7),
        Message(Op.RELEASE, 8, {**NAMESPACE, "lease": 3}),
    ]
    return [[bytes(f) for f in encode(m)] for m in messages]


def mutate(frames: list[bytes], rng: random.Random) -> list[bytes]:
    frames = list(frames)
    kind = rng.randrange(9)
    i = rng.randrange(len(frames))
    if kind == 0:  # flip bits
        raw = bytearray(frames[i])
        for _ in range(rng.randrange(1, 4)):
            if raw:
                raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        frames[i] = bytes(raw)
    elif kind == 1:  # truncate a frame
        frames[i] = frames[i][: rng.randrange(len(frames[i]) + 1)]
    elif kind == 2:  # drop a frame
        del frames[i]
    elif kind == 3:  # duplicate a frame
        frames.insert(i, frames[i])
    elif kind == 4:  # random bytes
        frames[i] = rng.randbytes(rng.randrange(64))
    elif kind == 5:  # valid header, hostile meta (re-checksummed so it gets past the CRC)
        frames = reframe(frames, json.dumps(rng.choice(HOSTILE_META)).encode())
    elif kind == 6:  # garbage meta with a correct checksum
        frames = reframe(frames, rng.randbytes(rng.randrange(100)))
    elif kind == 7:  # wrong op / status / frame count in a re-checksummed header
        head = bytearray(frames[0])
        if len(head) == FRAME_HEADER_SIZE:
            head[rng.choice([6, 7, 20])] = rng.randrange(256)
            head[-4:] = zlib.crc32(bytes(head[:-4])).to_bytes(4, "little")
        frames[0] = bytes(head)
    else:  # many extra frames
        frames.extend(b"x" for _ in range(rng.randrange(1, 50)))
    return frames or [b""]


HOSTILE_META = [
    [],
    "x",
    1,
    None,
    {"model": ""},
    {"model": "m" * 10000},
    {**NAMESPACE, "layout": {"num_layers": 10**9, "num_kv_heads": 1, "head_dim": 1}},
    {**NAMESPACE, "layout": {"num_layers": 1, "num_kv_heads": 1, "head_dim": 1, "dtype": "complex128"}},
    {**NAMESPACE, "world_size": 0},
    {**NAMESPACE, "rank": -1},
    {**NAMESPACE, "cache_salt": "s" * 1000},
    {**NAMESPACE, "skip_tokens": -5},
    {**NAMESPACE, "lease": 10**30},
    {**NAMESPACE, "pin": "yes"},
    {**NAMESPACE, "chunk_size": True},
    {"layout": []},
]


def reframe(frames: list[bytes], meta: bytes) -> list[bytes]:
    head = bytearray(frames[0])
    if len(head) != FRAME_HEADER_SIZE or len(frames) < 2:
        return frames
    head[24:28] = zlib.crc32(meta).to_bytes(4, "little")
    head[-4:] = zlib.crc32(bytes(head[:-4])).to_bytes(4, "little")
    return [bytes(head), meta, *frames[2:]]


def check_good_client(server, seed: int) -> None:  # type: ignore[no-untyped-def]
    tokens = list(range(seed * 1000, seed * 1000 + 48))
    kv = np.random.default_rng(seed).standard_normal(LAYOUT.chunk_shape(48)).astype(np.float16)
    with server.client() as client:
        assert client.store(tokens, kv).stored_tokens in (0, 48)
        got = client.retrieve(tokens)
        assert got.hit_tokens == 48 and np.array_equal(got.kv.view(np.uint16), kv.view(np.uint16))


def drain(sock: zmq.Socket) -> int:
    count = 0
    while sock.poll(0):
        sock.recv_multipart()
        count += 1
    return count


def test_thousands_of_mutated_messages(inproc_server) -> None:
    """5000 mutations of valid messages (bit flips, truncation, dropped/duplicated frames, hostile meta):
    every one is answered or dropped, and a correct client is served correctly every 500 messages."""
    rng = random.Random(1234)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{inproc_server.port}")
    replies = 0
    for n in range(5000):
        sock.send_multipart(mutate(rng.choice(valid_messages(rng)), rng))
        replies += drain(sock)
        if n % 500 == 499:
            check_good_client(inproc_server, n)
    deadline_polls = 50
    while deadline_polls and replies < 4000:
        sock.poll(100)
        replies += drain(sock)
        deadline_polls -= 1
    sock.close()
    assert inproc_server.thread.is_alive()
    assert replies >= 4000  # nearly every message gets an answer (some, e.g. empty identities, cannot)
    check_good_client(inproc_server, 99)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frames=st.lists(st.binary(max_size=200), min_size=0, max_size=6))
def test_arbitrary_frames_never_kill_the_server(inproc_server, frames) -> None:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{inproc_server.port}")
    sock.send_multipart(frames or [b""])
    sock.poll(1000)
    drain(sock)
    sock.close()
    with inproc_server.client() as client:
        assert client.ping()["chunk_size"] == CHUNK


@pytest.mark.parametrize(
    "meta",
    [b"[" * 32_000 + b"]" * 32_000, b'{"lease":' + b"9" * 5000 + b"}", b'{"model":"\\udc00"}'],
    ids=["deep nesting", "huge integer", "lone surrogate"],
)
def test_one_hostile_message_is_answered_and_the_server_lives(inproc_server, meta: bytes) -> None:
    """Valid checksums, hostile JSON: once enough to make the loop thread exit. Now a BAD_REQUEST reply."""
    frames = reframe([bytes(f) for f in encode(Message(Op.LOOKUP, 41, dict(NAMESPACE), [b""]))], meta)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{inproc_server.port}")
    sock.send_multipart(frames)
    assert sock.poll(5000), "no reply"
    reply = decode(sock.recv_multipart())
    sock.close()
    assert reply.status == Status.BAD_REQUEST and reply.request_id == 41
    assert inproc_server.thread.is_alive()
    check_good_client(inproc_server, 5)


# -- structure-aware: every field of every op, hostile values, frames that lie -------------------------------
TOKENS = np.arange(48, dtype="<u4").tobytes()
KEY = "00" * 16 + "/" + "11" * 32


def op_templates() -> list[tuple[Op, dict, list[bytes]]]:
    """A valid request of every op (meta and payload), each field of which is then replaced."""
    kv = bytes(LAYOUT.chunk_bytes(48))
    session = {"session": "kvtier-client-1-" + "a" * 32, "reservation": 4, "done_below": 2}
    return [
        (Op.PING, {}, []),
        (Op.LOOKUP, {**NAMESPACE, "pin": True, "cache_salt": "t"}, [TOKENS]),
        (Op.STORE, {**NAMESPACE, "skip_tokens": 0}, [TOKENS, kv]),
        (Op.RETRIEVE, {**NAMESPACE, "skip_tokens": 16}, [TOKENS]),
        (Op.PREFETCH, dict(NAMESPACE), [TOKENS]),
        (Op.DELETE, dict(NAMESPACE), [TOKENS]),
        (Op.CLEAR, {}, []),
        (Op.STATS, {}, []),
        (Op.RELEASE, {**NAMESPACE, "lease": 3}, []),
        (Op.EXISTS_KEYS, {"keys": [KEY]}, []),
        (Op.GET_KEYS, {"keys": [KEY]}, []),
        (Op.PUT_KEYS, {"keys": [KEY], "namespaces": {}}, [b"x" * 200]),
        (Op.DELETE_KEYS, {"keys": [KEY]}, []),
        (Op.SHM_INFO, {}, []),
        (Op.STORE_RESERVE, {**NAMESPACE, **session}, [TOKENS]),
        (Op.STORE_COMMIT, {"lease": 5}, []),
        (Op.RETRIEVE_PIN, dict(NAMESPACE), [TOKENS]),
        (Op.SHM_RELEASE, {"lease": 5}, []),
    ]


def deep(levels: int) -> object:
    value: object = 1
    for _ in range(levels):
        value = [value]
    return value


HOSTILE_VALUES: list[object] = [
    None,
    True,
    -1,
    2**64 - 1,
    -(2**63),
    1.5,
    1e308,
    "",
    "x",
    "é" * 2000,
    "../../../../etc/passwd",
    "\x00",
    [],
    [None, 1, "a"],
    {},
    {"a": {"b": {"c": []}}},
    deep(400),  # parses (below the recursion limit), then meets every field's checks
]


def hostile_variants() -> list[tuple[str, list[bytes]]]:
    """Every field of every op (and of the layout) replaced by every hostile value, plus the field removed."""
    variants = []
    for op, meta, payload in op_templates():
        paths = [(k,) for k in meta] + [("layout", k) for k in meta.get("layout", {})] + [("auth",)]
        for path in paths:
            for value in [*HOSTILE_VALUES, REMOVE]:
                changed = json.loads(json.dumps(meta))
                target = changed if len(path) == 1 else changed.setdefault(path[0], {})
                if not isinstance(target, dict):
                    continue
                if value is REMOVE:
                    target.pop(path[-1], None)
                else:
                    target[path[-1]] = value
                frames = [bytes(f) for f in encode(Message(op, 9, changed, payload))]
                variants.append((f"{op.name}.{'.'.join(path)}={str(value)[:20]}", frames))
    return variants


REMOVE = object()


def lying_frames() -> list[tuple[str, list[bytes]]]:
    """Messages whose sizes and counts lie: header frame counts, token and KV frame lengths, chunk headers
    whose payload size is not what follows, duplicate meta keys, the most keys and tokens allowed and more."""
    from kvtier.codecs.chunk_format import ChunkHeader
    from kvtier.tokens.keys import Namespace

    def frames(op: Op, meta: dict, payload: list[bytes]) -> list[bytes]:
        return [bytes(f) for f in encode(Message(op, 11, meta, payload))]

    def recount(msg: list[bytes], count: int) -> list[bytes]:
        head = bytearray(msg[0])
        head[20:24] = count.to_bytes(4, "little")
        head[-4:] = zlib.crc32(bytes(head[:-4])).to_bytes(4, "little")
        return [bytes(head), *msg[1:]]

    ns = Namespace("test-model", LAYOUT.descriptor())
    key = ns.key(bytes(32))
    lying_header = ChunkHeader(key.id, LAYOUT, 16, LAYOUT.chunk_bytes(16), 0).encode()
    put = {"keys": [key.to_str()], "namespaces": {ns.digest.hex(): ns.fields()}}
    many_keys = {"keys": [KEY] * MAX_KEYS}
    return [
        ("frame count u32 max", recount(frames(Op.PING, {}, []), 2**32 - 1)),
        ("frame count short", recount(frames(Op.STORE, dict(NAMESPACE), [TOKENS, b""]), 1)),
        ("token frame not whole u32s", frames(Op.LOOKUP, dict(NAMESPACE), [TOKENS + b"x"])),
        ("more tokens than allowed", frames(Op.LOOKUP, dict(NAMESPACE), [bytes(4 * ((1 << 20) + 1))])),
        ("KV one byte short", frames(Op.STORE, dict(NAMESPACE), [TOKENS, bytes(LAYOUT.chunk_bytes(48) - 1)])),
        ("KV one byte long", frames(Op.STORE, dict(NAMESPACE), [TOKENS, bytes(LAYOUT.chunk_bytes(48) + 1)])),
        ("chunk header, no payload", frames(Op.PUT_KEYS, put, [lying_header])),
        ("chunk header, half payload", frames(Op.PUT_KEYS, put, [lying_header + bytes(LAYOUT.chunk_bytes(8))])),
        ("chunk payload fails its CRC", frames(Op.PUT_KEYS, put, [lying_header + b"\x01" * LAYOUT.chunk_bytes(16)])),
        ("more value frames than keys", frames(Op.PUT_KEYS, put, [b"", b""])),
        ("the most keys allowed", frames(Op.GET_KEYS, many_keys, [])),
        ("one key more", frames(Op.EXISTS_KEYS, {"keys": [KEY] * (MAX_KEYS + 1)}, [])),
        ("duplicate meta keys", reframe(frames(Op.PING, {}, []), b'{"model":"a","model":"b"}')),
        ("meta of 64 KiB + 1", reframe(frames(Op.PING, {}, []), b'{"x":"' + b"a" * 65531 + b'"}')),
    ]


def exchange_all(port: int, messages: list[tuple[str, list[bytes]]]) -> dict[str, int]:
    """Send each message and wait for its answer: replies by status name; a message with no reply fails."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{port}")
    statuses: dict[str, int] = {}
    try:
        for name, frames in messages:
            sock.send_multipart(frames)
            assert sock.poll(5000), f"no reply to {name}"
            reply = decode(sock.recv_multipart())
            assert reply.status != Status.INTERNAL, (name, reply.meta)
            statuses[reply.status.name] = statuses.get(reply.status.name, 0) + 1
    finally:
        sock.close()
    return statuses


def test_every_field_of_every_op_with_hostile_values(inproc_server) -> None:
    """Each field of each op's meta, the layout's fields and the auth field, replaced by each hostile value or
    removed: every message is answered (OK or a client error, never INTERNAL), the server serves on."""
    variants = hostile_variants()
    statuses = exchange_all(inproc_server.port, variants)
    print(f"\nstructure-aware protocol fuzzing: {len(variants)} messages, replies {statuses}")
    assert len(variants) > 1500 and sum(statuses.values()) == len(variants)
    check_good_client(inproc_server, 7)


def test_frames_that_lie_about_their_length(inproc_server) -> None:
    cases = lying_frames()
    statuses = exchange_all(inproc_server.port, cases)
    assert statuses.get("OK", 0) == 1  # the lookup of the most keys allowed
    print(f"\nlying frames: {len(cases)} messages, replies {statuses}")
    check_good_client(inproc_server, 8)
