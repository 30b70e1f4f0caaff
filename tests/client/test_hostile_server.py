"""The clients against a server that does not follow the protocol (played by :class:`servers.HostileServer`):
garbage, replies addressed elsewhere, wrong field types, impossible chunk offsets. Each is an error the caller can
catch (``ServerError`` or ``ServerUnavailable``, never a ValueError an integration would take for its own bug), or
is ignored; nothing hangs, nothing returns wrong KV."""

from __future__ import annotations

import asyncio
import os
import time
import zlib
from collections.abc import Iterator

import numpy as np
import pytest

from kvtier import KVLayout
from kvtier.client import AsyncKVTierClient, BadReply, KVTierClient, ServerError
from kvtier.errors import KVTierError
from kvtier.protocol import Status, pool_path
from servers import HostileServer, scripted_reply

LAYOUT = KVLayout(2, 2, 16)


def async_client(port: int) -> AsyncKVTierClient:
    return AsyncKVTierClient(f"127.0.0.1:{port}", model="m", layout=LAYOUT, chunk_size=16, timeout=5.0, retries=0)


def blocking_client(port: int, shared_memory: bool | None = False) -> KVTierClient:
    return KVTierClient(
        f"127.0.0.1:{port}",
        model="m",
        layout=LAYOUT,
        chunk_size=16,
        timeout=5.0,
        retries=0,
        shared_memory=shared_memory,
    )


def test_an_id_zero_error_reaches_the_only_waiting_async_call() -> None:
    hostile = HostileServer(
        [lambda r: [scripted_reply(r, Status.BAD_REQUEST, {"error": "cannot parse"}, request_id=0)]]
    )

    async def scenario() -> None:
        async with async_client(hostile.port) as client:
            with pytest.raises(ServerError, match="cannot parse"):
                await client.ping()

    started = time.monotonic()
    asyncio.run(scenario())
    hostile.close()
    assert time.monotonic() - started < 2.0


def test_garbage_replies_do_not_kill_the_async_reader() -> None:
    """Undecodable frames are dropped (logged); the reply that follows still reaches its call."""
    garbage = [[b"garbage"], [b"x" * 32, b"{}"], [b""]]
    hostile = HostileServer([lambda r: [*garbage, scripted_reply(r, meta={"chunk_size": 16})]] * 2)

    async def scenario() -> None:
        async with async_client(hostile.port) as client:
            assert (await client.ping())["chunk_size"] == 16
            assert (await client.ping())["chunk_size"] == 16

    asyncio.run(scenario())
    hostile.close()


def test_garbage_replies_are_skipped_by_the_blocking_client() -> None:
    garbage = [[b"garbage"], [b"x" * 32, b"{}"], [b""]]
    hostile = HostileServer([lambda r: [*garbage, scripted_reply(r, meta={"chunk_size": 16})]])
    with blocking_client(hostile.port) as client:
        assert client.ping()["chunk_size"] == 16
    hostile.close()


def test_an_undecodable_reply_to_this_request_is_a_server_error() -> None:
    """A reply with our request id that cannot be decoded (here: a bad meta checksum) fails the call at once,
    as a ServerError: not a ProtocolError, which is a ValueError the integrations re-raise as the caller's bug."""

    def corrupt(request):  # type: ignore[no-untyped-def]
        head, meta = scripted_reply(request, meta={"chunk_size": 16})
        return [[head, meta + b" "]]

    hostile = HostileServer([corrupt])
    started = time.monotonic()
    with blocking_client(hostile.port) as client, pytest.raises(ServerError) as info:
        client.ping()
    assert info.value.status == Status.BAD_REQUEST and not isinstance(info.value, ValueError)
    assert time.monotonic() - started < 2.0
    hostile.close()


def answer(**meta):  # type: ignore[no-untyped-def]
    return lambda r: [scripted_reply(r, meta=meta)]


TOKENS = list(range(64))


@pytest.mark.parametrize(
    "meta",
    [
        {"hit_tokens": "64", "tiers": {}, "lease": None},
        {"hit_tokens": 65, "tiers": {"memory": 65}, "lease": None},
        {"hit_tokens": 32, "tiers": {"memory": "x"}, "lease": None},
        {"tiers": {}},
        {"hit_tokens": True, "tiers": {}},
    ],
    ids=["string count", "more than asked", "tier count not a number", "missing field", "bool for int"],
)
def test_mistyped_lookup_replies_are_bad_replies(meta) -> None:  # type: ignore[no-untyped-def]
    hostile = HostileServer([answer(**meta)])
    with blocking_client(hostile.port) as client, pytest.raises(BadReply):
        client.lookup(TOKENS)
    hostile.close()


def kv_frame(tokens: int, extra: int = 0) -> bytes:
    return bytes(LAYOUT.chunk_bytes(tokens) + extra)


@pytest.mark.parametrize(
    ("frame", "meta"),
    [
        (kv_frame(32, extra=3), {"hit_tokens": 32, "loaded_tokens": 32, "tiers": {"memory": 32}}),
        (kv_frame(80), {"hit_tokens": 80, "loaded_tokens": 80, "tiers": {"memory": 80}}),
        (kv_frame(32), {"hit_tokens": 48, "loaded_tokens": 48, "tiers": {"memory": 48}}),
        (kv_frame(32), {"hit_tokens": 32, "loaded_tokens": 32, "tiers": {"memory": 16}}),
    ],
    ids=["partial token", "more tokens than asked", "counts disagree with the KV", "tiers disagree"],
)
def test_retrieve_replies_that_do_not_fit_the_request_are_bad_replies(frame, meta) -> None:  # type: ignore[no-untyped-def]
    def reply_with_kv(request):  # type: ignore[no-untyped-def]
        head, encoded_meta = scripted_reply(request, meta=meta)
        return [[*_with_payload(head, [frame]), encoded_meta, frame]]

    hostile = HostileServer([reply_with_kv])
    out = np.full(LAYOUT.chunk_shape(64), 7, np.float16)
    with blocking_client(hostile.port) as client, pytest.raises(BadReply):
        client.retrieve(TOKENS, out=out)
    assert (out == 7).all()  # nothing was copied into the caller's buffer
    hostile.close()


def _with_payload(head: bytes, payload: list[bytes]) -> list[bytes]:
    """``head`` re-sealed to announce ``payload`` frames (scripted_reply builds replies without payload)."""
    raw = bytearray(head)
    raw[20:24] = len(payload).to_bytes(4, "little")
    raw[-4:] = zlib.crc32(bytes(raw[:-4])).to_bytes(4, "little")
    return [bytes(raw)]


@pytest.fixture
def fake_pool() -> Iterator[str]:
    """A file named and owned like a server's pool (this process plays the server)."""
    path = pool_path(os.getpid(), "f" * 32)
    with open(path, "wb") as f:
        f.truncate(1 << 20)
    yield path
    os.unlink(path)


def test_a_file_that_is_not_a_pool_is_never_mapped(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """SHM_INFO naming another file (here one of the user's own): with shared memory optional the client stays
    on TCP, with it required the call fails; the file is never opened for writing."""
    victim = tmp_path / "bashrc"
    victim.write_text("keep me")
    tcp_store = answer(stored_tokens=64, skipped_tokens=0, dropped_tokens=0)
    hostile = HostileServer([answer(path=str(victim), size=1 << 20), tcp_store, answer(path=str(victim), size=1)])
    with blocking_client(hostile.port, shared_memory=None) as client:
        assert client.store(TOKENS, np.ones(LAYOUT.chunk_shape(64), np.float16)).stored_tokens == 64
        assert client.shared_memory is False
    with blocking_client(hostile.port, shared_memory=True) as client, pytest.raises(KVTierError, match="not usable"):
        client.store(TOKENS, np.ones(LAYOUT.chunk_shape(64), np.float16))
    assert victim.read_text() == "keep me"
    hostile.close()


def test_a_symlink_named_like_a_pool_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    victim = tmp_path / "authorized_keys"
    victim.write_text("keep me")
    link = pool_path(os.getpid(), "e" * 32)
    os.symlink(victim, link)
    try:
        hostile = HostileServer([answer(path=link, size=1 << 20)])
        with blocking_client(hostile.port, shared_memory=True) as client, pytest.raises(KVTierError):
            client.store(TOKENS, np.ones(LAYOUT.chunk_shape(64), np.float16))
        hostile.close()
    finally:
        os.unlink(link)
    assert victim.read_text() == "keep me"


@pytest.mark.parametrize(
    "chunks",
    [[[0, 16, (1 << 20) - 100]], [[0, 16, -4096]], [[16, 32, 0]], [[0, 16, 0], [0, 16, 4096]], [[0, 80, 0]]],
    ids=["past the pool's end", "negative offset", "gap before the first chunk", "overlap", "past the prompt"],
)
def test_pinned_chunks_that_do_not_fit_are_bad_replies(fake_pool, chunks) -> None:  # type: ignore[no-untyped-def]
    end = chunks[-1][1]
    pin = answer(lease=1, path=fake_pool, chunks=chunks, hit_tokens=end, loaded_tokens=end, tiers={"memory": end})
    hostile = HostileServer([answer(path=fake_pool, size=1 << 20), pin, answer(released=True)])
    out = np.full(LAYOUT.chunk_shape(64), 7, np.float16)
    with blocking_client(hostile.port, shared_memory=True) as client, pytest.raises(BadReply):
        client.retrieve(TOKENS, out=out)
    assert (out == 7).all()
    hostile.close()


@pytest.mark.parametrize("chunks", [[[48, 80, 0]], [[0, 16, -1]], [[16, 32, 0], [0, 16, 4096]]])
def test_reserved_chunks_that_do_not_fit_are_bad_replies(fake_pool, chunks) -> None:  # type: ignore[no-untyped-def]
    reserve = answer(lease=1, path=fake_pool, chunks=chunks, dropped_tokens=0)
    hostile = HostileServer([answer(path=fake_pool, size=1 << 20), reserve])
    with blocking_client(hostile.port, shared_memory=True) as client, pytest.raises(BadReply):
        client.store(TOKENS, np.ones(LAYOUT.chunk_shape(64), np.float16))
    with open(fake_pool, "rb") as f:
        assert f.read() == bytes(1 << 20)  # nothing written anywhere
    hostile.close()
