"""The asyncio client: concurrent requests on one connection, errors and timeouts as in the blocking client."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from conftest import CHUNK, LAYOUT, free_port
from kvtier.client import AsyncKVTierClient, ServerUnavailable


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
