"""The clients against a server that does not follow the protocol (played by :class:`servers.HostileServer`):
garbage, replies addressed elsewhere, wrong field types, impossible chunk offsets. Each is an error the caller can
catch (``ServerError`` or ``ServerUnavailable``, never a ValueError an integration would take for its own bug), or
is ignored; nothing hangs, nothing returns wrong KV."""

from __future__ import annotations

import asyncio
import time

import pytest

from kvtier import KVLayout
from kvtier.client import AsyncKVTierClient, KVTierClient, ServerError
from kvtier.protocol import Status
from servers import HostileServer, scripted_reply

LAYOUT = KVLayout(2, 2, 16)


def async_client(port: int) -> AsyncKVTierClient:
    return AsyncKVTierClient(f"127.0.0.1:{port}", model="m", layout=LAYOUT, chunk_size=16, timeout=5.0, retries=0)


def blocking_client(port: int) -> KVTierClient:
    return KVTierClient(f"127.0.0.1:{port}", model="m", layout=LAYOUT, chunk_size=16, timeout=5.0, retries=0)


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
