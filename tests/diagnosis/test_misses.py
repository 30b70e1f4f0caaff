"""Each miss reason, provoked for real through a cache engine and its tiers, and reported by lookup, retrieve,
explain, the metrics and the recent-requests list."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvtier.config import GiB, load_config
from kvtier.diagnosis import KeyHistory, MissReason
from kvtier.diagnosis.history import Event
from kvtier.engine import CacheEngine
from kvtier.memory.layout import KVLayout
from servers import free_port

CHUNK = 32
LAYOUT = KVLayout(2, 2, 8)  # 128 bytes a token in fp16: a 32-token chunk is one 4096-byte page


def budget(chunks: int) -> float:
    return chunks * LAYOUT.chunk_bytes(CHUNK) / GiB


def prompt(seed: int, num_tokens: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, 50_000, num_tokens)]


def kv(tokens: list[int]) -> np.ndarray:
    return np.random.default_rng(len(tokens)).standard_normal(LAYOUT.chunk_shape(len(tokens))).astype(np.float16)


class Engines:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.engines: list[CacheEngine] = []

    def __call__(self, model: str = "m", storage_of: CacheEngine | None = None, **overrides: Any) -> CacheEngine:
        values: dict[str, Any] = {"chunk_size": CHUNK, "log_level": "WARNING", "max_local_cpu_size": budget(64)}
        values.update(overrides)
        config = load_config(overrides=values, env={})
        storage = storage_of.storage if storage_of is not None else None
        engine = CacheEngine(config, LAYOUT, model_name=model, storage=storage)
        self.engines.append(engine)
        return engine

    def close(self) -> None:
        for engine in reversed(self.engines):  # engines sharing storage first, its owner last
            engine.close()


@pytest.fixture
def engines(tmp_path: Path) -> Iterator[Engines]:
    made = Engines(tmp_path)
    yield made
    made.close()


def reasons(engine: CacheEngine, tokens: list[int], **kwargs: Any) -> list[tuple[int, int, str | None, str | None]]:
    return [(c.start, c.end, c.tier, c.reason) for c in engine.explain(tokens, **kwargs).chunks]


def test_a_prompt_never_stored_and_its_partial_tail(engines: Engines) -> None:
    engine = engines()
    tokens = prompt(1, 2 * CHUNK + 5)
    assert reasons(engine, tokens) == [  # chunks missing for the same reason: one range
        (0, 64, None, MissReason.NEVER_STORED),
        (64, 69, None, MissReason.PARTIAL_CHUNK),
    ]
    found = engine.lookup(tokens)
    assert found.miss_tokens == {"never_stored": 64, "partial_chunk": 5}
    engine.store(tokens, kv(tokens))
    assert engine.lookup(tokens).miss_tokens == {"partial_chunk": 5}
    explained = engine.explain(tokens)
    assert (explained.hit_tokens, explained.total_tokens) == (64, 69)
    assert [(c.tier, c.reason) for c in explained.chunks] == [
        ("memory", None),
        ("memory", None),
        (None, MissReason.PARTIAL_CHUNK),
    ]


def test_a_prompt_served_whole_has_no_misses(engines: Engines) -> None:
    engine = engines()
    tokens = prompt(2, 3 * CHUNK)
    engine.store(tokens, kv(tokens))
    assert engine.lookup(tokens).miss_tokens == {}
    assert engine.retrieve(tokens).miss_tokens == {}
    assert engine.metrics.miss_tokens.total() == 0


def test_evicted_from_memory_then_from_disk(engines: Engines, tmp_path: Path) -> None:
    engine = engines(max_local_cpu_size=budget(2), local_disk=str(tmp_path / "disk"), max_local_disk_size=budget(4))
    first, second, third = prompt(3, 2 * CHUNK), prompt(4, 2 * CHUNK), prompt(5, 2 * CHUNK)
    engine.store(first, kv(first))
    engine.flush()
    engine.store(second, kv(second))  # memory holds 2 chunks: the first prompt goes (it is still on disk)
    engine.flush()
    assert [c.tier for c in engine.explain(first).chunks] == ["disk", "disk"]  # served chunks: one each
    engine.store(third, kv(third))  # the disk holds ~4 chunks with headers: the first prompt leaves it too
    engine.flush()
    chunks = engine.explain(first).chunks
    assert {(c.reason, c.tier) for c in chunks} == {(MissReason.EVICTED, "disk")}
    assert "evicted from disk" in chunks[0].detail and "s ago" in chunks[0].detail


def test_a_chunk_gone_from_every_tier_breaks_the_prefix(engines: Engines) -> None:
    engine = engines()
    tokens = prompt(6, 4 * CHUNK)
    engine.store(tokens, kv(tokens))
    _, keys = engine.chunk_keys(tokens)
    engine.storage.memory.delete(keys[1])
    assert reasons(engine, tokens) == [
        (0, 32, "memory", None),
        (32, 64, None, MissReason.EVICTED),  # stored, now in no tier
        (64, 128, "memory", MissReason.AFTER_PREFIX_BREAK),
    ]
    got = engine.retrieve(tokens)
    assert got.hit_tokens == 32
    assert got.miss_tokens == {"evicted": 32, "after_prefix_break": 64}
    assert engine.metrics.miss_tokens.value(op="retrieve", reason="after_prefix_break") == 64


def test_the_same_tokens_under_another_model_or_chunk_size(engines: Engines) -> None:
    server = engines("model-a")  # engines of one server share its tiers
    other_model = engines("model-b", storage_of=server)
    other_chunking = engines("model-a", storage_of=server, chunk_size=2 * CHUNK)
    tokens = prompt(7, 4 * CHUNK)
    server.store(tokens, kv(tokens))
    chunks = other_model.explain(tokens).chunks
    assert {c.reason for c in chunks} == {MissReason.OTHER_NAMESPACE}
    assert "model 'model-a' (this request: 'model-b')" in chunks[0].detail
    assert other_model.lookup(tokens).miss_tokens == {"other_namespace": 4 * CHUNK}
    first = other_chunking.explain(tokens).chunks[0]
    assert first.reason == MissReason.OTHER_NAMESPACE
    assert "chunk size 32 (this request: 64)" in first.detail


def test_another_tenants_prompt_is_revealed_to_admins_only(engines: Engines) -> None:
    engine = engines()
    tokens = prompt(8, 2 * CHUNK)
    engine.store(tokens, kv(tokens), cache_salt="tenant-a")
    assert engine.lookup(tokens, cache_salt="tenant-b").miss_tokens == {"never_stored": 64}
    assert {c.reason for c in engine.explain(tokens, cache_salt="tenant-b").chunks} == {MissReason.NEVER_STORED}
    admin_view = engine.explain(tokens, cache_salt="tenant-b", reveal_tenants=True).chunks
    assert {c.reason for c in admin_view} == {MissReason.OTHER_NAMESPACE}
    assert admin_view[0].detail == "cached under another tenant's cache_salt"
    assert "tenant-a" not in repr(admin_view)


def test_a_corrupt_chunk_on_disk(engines: Engines, tmp_path: Path) -> None:
    engine = engines(local_disk=str(tmp_path / "disk"), max_local_disk_size=budget(16))
    tokens = prompt(9, 2 * CHUNK)
    engine.store(tokens, kv(tokens))
    engine.flush()
    engine.storage.memory.clear()
    disk = engine.storage.lower[0]
    path = disk.path_for(engine.chunk_keys(tokens)[1][0].id)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))
    got = engine.retrieve(tokens)
    assert got.hit_tokens == 0
    assert got.miss_tokens == {"corrupt": 32, "after_prefix_break": 32}
    first = engine.explain(tokens).chunks[0]
    assert (first.reason, first.tier) == (MissReason.CORRUPT, "disk")
    assert "corrupt in disk" in first.detail


def test_a_chunk_in_a_codec_this_engine_does_not_read(engines: Engines, tmp_path: Path) -> None:
    disk = str(tmp_path / "disk")
    lossy = {"local_disk_serde": "int8", "codec_gate": False}  # the gate is tested with a model elsewhere
    writer = engines(local_disk=disk, max_local_disk_size=budget(16), **lossy)
    tokens = prompt(10, 2 * CHUNK)
    writer.store(tokens, kv(tokens))
    writer.flush()
    writer.close()
    engines.engines.remove(writer)
    reader = engines(local_disk=disk, max_local_disk_size=budget(16))  # exact KV only: raw or lossless
    assert reader.retrieve(tokens).miss_tokens == {"codec_mismatch": 32, "after_prefix_break": 32}
    assert reader.explain(tokens).chunks[0].reason == MissReason.CODEC_MISMATCH


def test_a_remote_tier_that_is_down(engines: Engines) -> None:
    pytest.importorskip("redis")
    down = f"redis://127.0.0.1:{free_port()}"  # a real client; nothing listens there
    engine = engines(max_local_cpu_size=budget(2), remote_url=down, remote_timeout_sec=0.5)
    first, second = prompt(11, 2 * CHUNK), prompt(12, 2 * CHUNK)
    engine.store(first, kv(first))
    assert engine.flush(10.0)  # the write to the remote fails
    engine.store(second, kv(second))  # evicts the first from memory
    assert engine.flush(10.0)
    chunks = engine.explain(first).chunks
    assert {(c.reason, c.tier) for c in chunks} == {(MissReason.TIER_UNAVAILABLE, "redis")}
    assert engine.retrieve(first).miss_tokens == {"tier_unavailable": 64}


def test_a_remote_tier_that_admits_after_hits(engines: Engines, redis_server: Any) -> None:
    engine = engines(max_local_cpu_size=budget(2), remote_url=redis_server.url, remote_admit_after_hits=2)
    first, second = prompt(13, 2 * CHUNK), prompt(14, 2 * CHUNK)
    engine.store(first, kv(first))
    assert engine.flush(10.0)
    engine.store(second, kv(second))
    assert engine.flush(10.0)
    chunks = engine.explain(first).chunks
    assert {c.reason for c in chunks} == {MissReason.NOT_ADMITTED}
    assert engine.lookup(first).miss_tokens == {"not_admitted": 64}


def test_the_cost_model_skips_a_slow_tier(engines: Engines, redis_server: Any) -> None:
    engine = engines(max_local_cpu_size=budget(2), remote_url=redis_server.url, recompute_tokens_per_sec=1e9)
    first, second = prompt(15, 2 * CHUNK), prompt(16, 2 * CHUNK)
    engine.store(first, kv(first))
    assert engine.flush(10.0)
    engine.store(second, kv(second))
    assert engine.flush(10.0)
    assert engine.retrieve(second).hit_tokens == 64  # from memory
    remote = engine.storage.lower[0]
    assert engine.retrieve(first).hit_tokens == 64  # from redis: the read measures its bandwidth
    engine.storage.memory.clear()
    remote.read_bandwidth = 1.0  # bytes/s: any fetch is now slower than recomputing at 1e9 tokens/s
    chunks = engine.explain(first).chunks
    assert {(c.reason, c.tier) for c in chunks} == {(MissReason.COST_MODEL, "redis")}
    assert engine.lookup(first).miss_tokens == {"cost_model": 64}


def test_misses_in_metrics_log_line_and_recent_requests(engines: Engines, caplog: pytest.LogCaptureFixture) -> None:
    engine = engines(log_level="INFO")
    tokens = prompt(17, CHUNK + 3)
    engine.store(tokens, kv(tokens))
    with caplog.at_level(logging.INFO, logger="kvtier"):
        engine.retrieve(prompt(18, 2 * CHUNK))
    assert "missed 64: 64 never_stored" in caplog.text
    engine.lookup(tokens, cache_salt="s")
    text = engine.metrics.render()
    assert 'kvtier_miss_tokens_total{op="retrieve",reason="never_stored"} 64.0' in text
    assert 'kvtier_miss_tokens_total{op="lookup",reason="never_stored"} 32.0' in text
    latest = engine.storage.recent.latest()
    assert [r.op for r in latest] == ["lookup", "retrieve", "store"]
    assert latest[0].miss_tokens == {"never_stored": 32, "partial_chunk": 3}
    assert latest[0].cache_salt == "s" and "'s'" not in repr(latest[0])
    assert latest[2].stored_tokens == 32


def test_the_history_is_bounded() -> None:
    history = KeyHistory(capacity=100)
    for i in range(1000):
        history.note(i.to_bytes(48, "little"), Event.EVICTED, "memory")
    assert len(history) == 100
    assert history.last((999).to_bytes(48, "little")) is not None
    assert history.last((0).to_bytes(48, "little")) is None
    nothing = KeyHistory(capacity=0)
    nothing.note(b"x" * 48, Event.EVICTED, "memory")
    assert len(nothing) == 0
