"""Shared, generic fixtures: a small KV layout, a namespace, cache keys, filled memory objects, and kvtier servers
running in a thread of the test process (for the integration tests)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from kvtier.memory.layout import KVLayout
from kvtier.memory.memory_obj import MemoryObj
from kvtier.memory.pool import MemoryPool
from kvtier.metrics import CacheMetrics
from kvtier.tokens.keys import CacheKey, Namespace
from servers import ThreadServer

#: Tokens in a full test chunk: 32 tokens x 128 bytes per token = 4096 bytes, one allocator page.
CHUNK_TOKENS = 32

MakeKeys = Callable[..., list[CacheKey]]
MakeObj = Callable[..., MemoryObj]


def chunk_content(key_id: bytes, nbytes: int) -> np.ndarray:
    """The deterministic bytes stored under ``key_id`` (pseudo-random, different for every key)."""
    seed = int.from_bytes(hashlib.blake2b(key_id, digest_size=16).digest(), "little")
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


@pytest.fixture
def chunk_tokens() -> int:
    return CHUNK_TOKENS


@pytest.fixture
def layout() -> KVLayout:
    """2 layers x K/V x 2 heads x head_dim 8, fp16: 128 bytes per token."""
    return KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16")


@pytest.fixture
def namespace(layout: KVLayout) -> Namespace:
    return Namespace("test-model", layout.descriptor())


@pytest.fixture
def make_keys(namespace: Namespace) -> MakeKeys:
    """``make_keys(n, start=0, ns=None)``: ``n`` distinct keys; the same index gives the same chunk hash."""

    def make(n: int, start: int = 0, ns: Namespace | None = None) -> list[CacheKey]:
        space = ns or namespace
        return [
            space.key(hashlib.blake2b(f"chunk-{i}".encode(), digest_size=32).digest()) for i in range(start, start + n)
        ]

    return make


@pytest.fixture
def metrics() -> CacheMetrics:
    return CacheMetrics()


@pytest.fixture
def pool() -> Iterator[MemoryPool]:
    """A 4 MiB pool (1024 full test chunks)."""
    p = MemoryPool(4 << 20)
    yield p
    p.close()


@pytest.fixture
def content() -> Callable[[bytes, int], np.ndarray]:
    """:func:`chunk_content`, for tests that need the expected bytes of a key."""
    return chunk_content


@pytest.fixture
def make_obj(pool: MemoryPool, layout: KVLayout) -> MakeObj:
    """``make_obj(key, num_tokens=CHUNK_TOKENS, into=pool)``: a new object (one reference) filled for ``key``."""

    def make(key: CacheKey, num_tokens: int = CHUNK_TOKENS, into: MemoryPool | None = None) -> MemoryObj:
        obj = (into or pool).allocate(layout, num_tokens)
        assert obj is not None, "test pool is full"
        obj.data[:] = chunk_content(key.id, obj.nbytes)
        return obj

    return make


@pytest.fixture
def thread_server(tmp_path: Path) -> Iterator[Callable[..., ThreadServer]]:
    """``thread_server(port=0, chunk_size=16)``: start a server (each with its own disk tier); all stop at the end."""
    started: list[ThreadServer] = []

    def start(*, port: int = 0, chunk_size: int = 16) -> ThreadServer:
        server = ThreadServer(tmp_path / f"server-disk-{len(started)}", port=port, chunk_size=chunk_size)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def make_kv_obj(pool: MemoryPool) -> MakeObj:
    """``make_kv_obj(layout, num_tokens, seed=0)``: an object holding values shaped like real KV (Gaussian, with a
    few channels of large magnitude, as keys have), for codecs whose result depends on the values (needs torch)."""
    import torch

    from kvtier.memory.layout import DTYPES_BY_NAME

    def make(layout: KVLayout, num_tokens: int, seed: int = 0) -> MemoryObj:
        generator = torch.Generator().manual_seed(seed)
        shape = (layout.num_layers, layout.kv_size, num_tokens, layout.num_kv_heads, layout.head_dim)
        values = torch.randn(shape, generator=generator)
        values[..., :2] *= 8
        obj = pool.allocate(layout, num_tokens)
        assert obj is not None, "test pool is full"
        obj.tensor().copy_(values.to(getattr(torch, DTYPES_BY_NAME[layout.dtype].torch_name)))
        return obj

    return make
