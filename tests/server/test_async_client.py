"""The asyncio client: concurrent requests on one connection, errors and timeouts as in the blocking client."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from conftest import CHUNK, LAYOUT, free_port
from kvtier.client import AsyncKVTierClient, ServerError, ServerUnavailable
from kvtier.protocol import Status


def client_for(port: int, **kw) -> AsyncKVTierClient:  # type: ignore[no-untyped-def]
    return AsyncKVTierClient(f"127.0.0.1:{port}", model="test-model", layout=LAYOUT, chunk_size=CHUNK, **kw)


def test_concurrent_requests_share_one_connection(inproc_server) -> None:
    async def scenario() -> None:
        async with client_for(inproc_server.port) as client:
            prompts = [list(range(i * 1000, i * 1000 + 64)) for i in range(20)]
            kvs = [np.full(LAYOUT.chunk_shape(64), i, np.float16) for i in range(20)]
            stored = await asyncio.gather(*(client.store(p, kv) for p, kv in zip(prompts, kvs, strict=True)))
            assert all(s.stored_tokens == 64 for s in stored)
            lookups = await asyncio.gather(*(client.lookup(p) for p in prompts))
            assert all(found.hit_tokens == 64 for found in lookups)
            got = await asyncio.gather(*(client.retrieve(p) for p in prompts))
            for result, kv in zip(got, kvs, strict=True):
                assert result.hit_tokens == 64 and np.array_equal(result.kv, kv)
            assert (await client.ping())["chunk_size"] == CHUNK

    asyncio.run(scenario())


def test_unreachable_server_raises_after_retries() -> None:
    async def scenario() -> None:
        async with client_for(free_port(), timeout=0.2, retries=1) as client:
            with pytest.raises(ServerUnavailable):
                await client.ping()

    started = time.monotonic()
    asyncio.run(scenario())
    assert time.monotonic() - started < 3.0


def test_a_request_the_server_cannot_parse_gets_its_reason_not_a_timeout(server_process, monkeypatch) -> None:
    """A server that cannot parse a message (here: another protocol version) answers with the reason; the
    async client hands it to the waiting call at once instead of timing out and retrying."""
    server = server_process()
    monkeypatch.setattr("kvtier.protocol.PROTOCOL_VERSION", 99)  # this process now speaks version 99

    async def scenario() -> None:
        async with client_for(server.port, timeout=5.0, retries=2) as client:
            with pytest.raises(ServerError) as info:
                await client.ping()
            assert info.value.status == Status.UNSUPPORTED_VERSION and "version 1 not supported" in str(info.value)

    started = time.monotonic()
    asyncio.run(scenario())
    assert time.monotonic() - started < 2.0
