"""The cache engine end to end: bit-exact round trips across tiers, chunking rules, masks, memory pressure,
leases, isolation, restarts, concurrency and metrics."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from kvtier.config import GiB, load_config
from kvtier.engine import CacheEngine
from kvtier.engine.cache_engine import MAX_NAMESPACES
from kvtier.errors import LayoutError
from kvtier.memory.layout import KVLayout

CHUNK = 32
LAYOUT = KVLayout(2, 2, 8)  # 128 bytes per token in fp16: one 32-token chunk is exactly one 4096-byte page
PAGE = 4096


def chunk_budget(num_chunks: int, layout: KVLayout = LAYOUT, chunk_size: int = CHUNK) -> float:
    """A ``max_local_cpu_size`` / ``max_local_disk_size`` in GiB holding ``num_chunks`` full chunks."""
    per_chunk = -(-layout.chunk_bytes(chunk_size) // PAGE) * PAGE
    return num_chunks * per_chunk / GiB


def kv_bits(tokens: Any, layout: KVLayout = LAYOUT) -> np.ndarray:
    """Deterministic, arbitrary KV bit patterns (NaNs included) that depend on (token, position).

    Returned as unsigned ints of the element width, shaped ``(layers, kv, tokens, heads, head_dim)``, so a
    prompt extending another has identical KV over the shared prefix.
    """
    toks = np.asarray(tokens, dtype=np.uint64)
    pos = np.arange(toks.shape[0], dtype=np.uint64)
    per_elem = layout.num_layers * layout.kv_size * layout.num_kv_heads * layout.head_dim
    with np.errstate(over="ignore"):
        x = (toks * np.uint64(0x9E3779B97F4A7C15) + pos * np.uint64(0xC2B2AE3D27D4EB4F))[None, :]
        x = x ^ (np.arange(per_elem, dtype=np.uint64) * np.uint64(0x165667B19E3779F9))[:, None]
        x = (x ^ (x >> np.uint64(31))) * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(29)
    width = {1: np.uint8, 2: np.uint16, 4: np.uint32}[layout.element.itemsize]
    bits = x.astype(width).reshape(layout.num_layers, layout.kv_size, layout.num_kv_heads, layout.head_dim, -1)
    return np.ascontiguousarray(bits.transpose(0, 1, 4, 2, 3))


def kv_array(tokens: Any, layout: KVLayout = LAYOUT) -> np.ndarray:
    """:func:`kv_bits` as a numpy array of the layout's numpy dtype."""
    return kv_bits(tokens, layout).view(layout.element.numpy_name)


def bits_of(kv: Any) -> np.ndarray:
    """The raw bits of a numpy array or torch tensor, for bit-exact comparison (NaN == NaN)."""
    if hasattr(kv, "detach"):
        width = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[kv.element_size()]
        kv = kv.detach().cpu().contiguous().view(width).numpy()
    return kv.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[kv.dtype.itemsize])


def prompt(seed: int, num_tokens: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, 50_000, num_tokens)]


def check_no_leaks(engine: CacheEngine) -> None:
    """No lease or pin outlives its test, and the pool holds exactly the chunks cached in memory."""
    assert engine.flush(10.0)
    assert len(engine.leases) == 0
    storage = engine.storage
    for tier in storage.tiers:
        assert tier.usage().pinned_chunks == 0, tier.name
    cached = storage.memory.usage().chunks if storage.memory is not None else 0
    assert storage.pool.live_objects == cached
    for writer in storage.writers.values():
        assert writer.queued_bytes == 0


class EngineFactory:
    """Builds engines from config overrides; every engine is leak-checked and closed at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.engines: list[CacheEngine] = []

    def __call__(
        self,
        *,
        layout: KVLayout = LAYOUT,
        model_name: str = "test/model",
        cpu_chunks: int | None = 64,
        disk: bool | str | Path = False,
        disk_chunks: int = 256,
        world_size: int = 1,
        rank: int = 0,
        **overrides: Any,
    ) -> CacheEngine:
        values: dict[str, Any] = {"chunk_size": CHUNK, "log_level": "WARNING"}
        if cpu_chunks is not None:
            values["max_local_cpu_size"] = chunk_budget(cpu_chunks, layout, overrides.get("chunk_size", CHUNK))
        if disk:
            values["local_disk"] = str(self.tmp_path / "disk" if disk is True else disk)
            values["max_local_disk_size"] = disk_chunks * 8192 / GiB  # chunk file = 128-byte header + payload
        values.update(overrides)
        config = load_config(overrides=values, env={})
        engine = CacheEngine(config, layout, model_name=model_name, world_size=world_size, rank=rank)
        self.engines.append(engine)
        return engine

    def close(self, engine: CacheEngine) -> None:
        """Leak-check and close one engine now (e.g. to simulate a restart)."""
        check_no_leaks(engine)
        engine.close()
        self.engines.remove(engine)

    def teardown(self) -> None:
        errors = []
        for engine in self.engines:
            try:
                check_no_leaks(engine)
            except AssertionError as exc:
                errors.append(exc)
            finally:
                engine.close()
        if errors:
            raise errors[0]


@pytest.fixture
def make_engine(tmp_path: Path) -> Iterator[EngineFactory]:
    factory = EngineFactory(tmp_path)
    yield factory
    factory.teardown()


def store_kv(engine: CacheEngine, tokens: list[int], layout: KVLayout = LAYOUT, **kwargs: Any):
    return engine.store(tokens, kv_array(tokens, layout), **kwargs)


def assert_kv(got: Any, tokens: list[int], num_tokens: int | None = None, layout: KVLayout = LAYOUT) -> None:
    """``got`` holds, bit for bit, the KV of the first ``num_tokens`` tokens of ``tokens``."""
    n = len(tokens) if num_tokens is None else num_tokens
    np.testing.assert_array_equal(bits_of(got)[:, :, :n], kv_bits(tokens[:n], layout))


def memory_pattern(engine: CacheEngine, tokens: list[int], cache_salt: str = "") -> list[bool]:
    """Which of the prompt's chunks the memory tier holds, in prompt order."""
    _, keys = engine.chunk_keys(tokens, cache_salt)
    return [engine.storage.memory.contains(k) for k in keys]


def assert_prefix_shaped(pattern: list[bool]) -> None:
    """True...True False...False: no chunk is cached after a missing one."""
    held = sum(pattern)
    assert pattern == [True] * held + [False] * (len(pattern) - held), pattern


# -- round trips ---------------------------------------------------------------------------------------


def test_round_trip_from_memory(make_engine):
    """Stored KV comes back bit for bit from memory, with lookup and retrieve agreeing on the hit."""
    engine = make_engine()
    tokens = prompt(1, 4 * CHUNK)
    assert np.isnan(kv_array(tokens)).any()  # NaN payloads must survive too
    result = store_kv(engine, tokens)
    assert (result.stored_tokens, result.skipped_tokens, result.dropped_tokens) == (128, 0, 0)
    look = engine.lookup(tokens)
    assert (look.hit_tokens, look.total_tokens, look.tier_tokens, look.lease) == (128, 128, {"memory": 128}, None)
    got = engine.retrieve(tokens)
    assert (got.hit_tokens, got.loaded_tokens, got.total_tokens) == (128, 128, 128)
    assert got.tier_tokens == {"memory": 128}
    assert got.kv.shape == LAYOUT.chunk_shape(128) and got.kv.dtype == np.float16
    assert_kv(got.kv, tokens)


def test_round_trip_from_disk_only(make_engine):
    """With memory cleared, KV is read back bit-exact from disk and promoted into memory."""
    engine = make_engine(disk=True)
    tokens = prompt(2, 3 * CHUNK)
    store_kv(engine, tokens)
    assert engine.flush(10.0)
    assert engine.storage.lower[0].usage().chunks == 3
    engine.storage.memory.clear()
    assert engine.storage.memory.usage().chunks == 0
    assert engine.lookup(tokens).tier_tokens == {"disk": 96}
    got = engine.retrieve(tokens)
    assert (got.hit_tokens, got.tier_tokens) == (96, {"disk": 96})
    assert_kv(got.kv, tokens)
    assert engine.metrics.promotions.total() == 3
    again = engine.retrieve(tokens)
    assert again.tier_tokens == {"memory": 96}
    assert_kv(again.kv, tokens)


def test_prefix_spread_across_tiers(make_engine):
    """A prefix with its head in memory and its tail on disk (and vice versa) is found and read whole."""
    engine = make_engine(disk=True)
    tokens = prompt(3, 4 * CHUNK)
    store_kv(engine, tokens)
    engine.flush()
    engine.storage.memory.clear()
    assert engine.retrieve(tokens[: 2 * CHUNK]).tier_tokens == {"disk": 64}  # promotes the head
    assert engine.lookup(tokens).tier_tokens == {"memory": 64, "disk": 64}
    got = engine.retrieve(tokens)
    assert (got.hit_tokens, got.tier_tokens) == (128, {"memory": 64, "disk": 64})
    assert_kv(got.kv, tokens)
    # Now drop the head from memory: head from disk, tail from memory.
    _, keys = engine.chunk_keys(tokens)
    assert engine.storage.memory.delete(keys[0])
    assert engine.lookup(tokens).tier_tokens == {"disk": 32, "memory": 96}
    got = engine.retrieve(tokens)
    assert got.tier_tokens == {"disk": 32, "memory": 96}
    assert_kv(got.kv, tokens)


def to_torch(array: np.ndarray, layout: KVLayout) -> torch.Tensor:
    bits = array.view({2: np.int16, 4: np.int32}[array.dtype.itemsize])
    return torch.from_numpy(bits.copy()).view(getattr(torch, layout.element.torch_name))


@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
@pytest.mark.parametrize("source", ["numpy", "torch"])
@pytest.mark.parametrize("dest", [None, "numpy", "torch"])
def test_dtypes_and_containers_bit_exact(make_engine, dtype, source, dest):
    """numpy and torch sources and destinations, in fp16/fp32/bf16, round-trip every bit pattern."""
    layout = KVLayout(2, 2, 8, dtype)
    engine = make_engine(layout=layout)
    tokens = prompt(4, 2 * CHUNK + 5)
    kv = kv_array(tokens, layout)
    if dtype == "bfloat16" and source == "numpy":
        assert kv.dtype == np.uint16  # numpy carries bf16 as raw 16-bit words
    kv_in = to_torch(kv, layout) if source == "torch" else kv
    assert engine.store(tokens, kv_in).stored_tokens == 64
    if dest is None:
        out = None
    elif dest == "numpy":
        out = np.zeros(layout.chunk_shape(len(tokens)), layout.element.numpy_name)
    else:
        out = torch.zeros(layout.chunk_shape(len(tokens)), dtype=getattr(torch, layout.element.torch_name))
    got = engine.retrieve(tokens, out)
    assert got.hit_tokens == 64
    if out is not None:
        assert got.kv is out
    else:
        assert isinstance(got.kv, np.ndarray) and got.kv.dtype == np.dtype(layout.element.numpy_name)
    assert_kv(got.kv, tokens, 64, layout)
    if out is not None:  # tokens past the hit are left untouched
        assert not bits_of(got.kv)[:, :, 64:].any()


def test_torch_tokens_and_views(make_engine):
    """Tokens as a torch tensor and KV as a non-contiguous torch view work like lists and arrays."""
    engine = make_engine()
    tokens = prompt(5, 2 * CHUNK)
    wide = torch.from_numpy(kv_array(tokens + tokens).copy())
    view = wide[:, :, : 2 * CHUNK]  # first half; shares storage with the wider tensor
    assert not view.is_contiguous()
    assert engine.store(torch.tensor(tokens), view).stored_tokens == 64
    assert engine.lookup(np.array(tokens, dtype=np.int32)).hit_tokens == 64
    assert_kv(engine.retrieve(tuple(tokens)).kv, tokens)


# -- chunking rules ------------------------------------------------------------------------------------


def test_unaligned_prompt_without_unfull_chunk(make_engine):
    """With save_unfull_chunk false the tail is not stored and the hit is the aligned length."""
    engine = make_engine(save_unfull_chunk=False)
    tokens = prompt(6, 2 * CHUNK + 17)
    result = store_kv(engine, tokens)
    assert (result.stored_tokens, result.skipped_tokens, result.dropped_tokens) == (64, 17, 0)
    assert engine.lookup(tokens).hit_tokens == 64
    got = engine.retrieve(tokens)
    assert got.hit_tokens == 64 and got.kv.shape[2] == 64
    assert_kv(got.kv, tokens, 64)
    short = tokens[: CHUNK - 1]
    assert store_kv(engine, short).stored_tokens == 0
    assert engine.lookup(short).hit_tokens == 0


def test_unaligned_prompt_with_unfull_chunk(make_engine):
    """With save_unfull_chunk true the same prompt hits fully; a longer one hits only the full chunks."""
    engine = make_engine(save_unfull_chunk=True)
    tokens = prompt(7, 2 * CHUNK + 17)
    assert store_kv(engine, tokens).stored_tokens == 81
    assert engine.lookup(tokens).hit_tokens == 81
    got = engine.retrieve(tokens)
    assert (got.hit_tokens, got.loaded_tokens) == (81, 81)
    assert_kv(got.kv, tokens)
    longer = tokens + prompt(8, 20)
    assert engine.lookup(longer).hit_tokens == 64
    got = engine.retrieve(longer)
    assert got.hit_tokens == 64
    assert_kv(got.kv, longer, 64)
    # Storing the longer prompt adds its full third chunk and its own tail.
    result = store_kv(engine, longer)
    assert (result.stored_tokens, result.skipped_tokens) == (len(longer) - 64, 64)
    assert engine.lookup(longer).hit_tokens == len(longer)
    assert engine.lookup(tokens).hit_tokens == 81


def test_prompt_shorter_than_a_chunk_with_unfull_chunk(make_engine):
    """A prompt below chunk_size is one partial chunk when partials are stored."""
    engine = make_engine(save_unfull_chunk=True)
    tokens = prompt(9, 10)
    assert store_kv(engine, tokens).stored_tokens == 10
    assert engine.lookup(tokens).hit_tokens == 10
    assert_kv(engine.retrieve(tokens).kv, tokens)
    assert engine.lookup(tokens[:9]).hit_tokens == 0


def test_zero_hit(make_engine):
    """A prompt never stored misses: hit 0, an empty KV array, no tiers."""
    engine = make_engine()
    tokens = prompt(10, 3 * CHUNK)
    look = engine.lookup(tokens, pin=True)
    assert (look.hit_tokens, look.tier_tokens, look.lease) == (0, {}, None)
    got = engine.retrieve(tokens)
    assert (got.hit_tokens, got.loaded_tokens, got.tier_tokens) == (0, 0, {})
    assert got.kv.shape == LAYOUT.chunk_shape(0)
    out = np.full(LAYOUT.chunk_shape(len(tokens)), 7, np.float16)
    assert engine.retrieve(tokens, out).hit_tokens == 0
    assert (out == 7).all()


def test_empty_prompt(make_engine):
    """An empty prompt stores, looks up and retrieves nothing."""
    engine = make_engine(save_unfull_chunk=True)
    empty: list[int] = []
    assert engine.store(empty, np.zeros(LAYOUT.chunk_shape(0), np.float16)).stored_tokens == 0
    assert engine.lookup(empty).hit_tokens == 0
    assert engine.retrieve(empty).hit_tokens == 0


def test_longer_prompt_hits_stored_prefix(make_engine):
    """A prompt extending a stored one hits the stored prefix; only it is written into ``out``."""
    engine = make_engine()
    tokens = prompt(11, 2 * CHUNK)
    store_kv(engine, tokens)
    longer = tokens + prompt(12, 2 * CHUNK)
    assert engine.lookup(longer).hit_tokens == 64
    out = np.full(LAYOUT.chunk_shape(len(longer)), 3, np.float16)
    got = engine.retrieve(longer, out)
    assert (got.hit_tokens, got.loaded_tokens, got.total_tokens) == (64, 64, 128)
    assert_kv(out, longer, 64)
    assert (out[:, :, 64:] == 3).all()
    # A diverging prompt shares only the chunks before the divergence.
    diverged = [*tokens[:CHUNK], tokens[CHUNK] + 1, *tokens[CHUNK + 1 :]]
    assert engine.lookup(diverged).hit_tokens == 32


def test_out_shorter_than_prompt_loads_only_chunks_that_fit(make_engine):
    """A destination with fewer tokens than the prompt receives only the whole chunks that fit."""
    engine = make_engine()
    tokens = prompt(13, 4 * CHUNK)
    store_kv(engine, tokens)
    out = np.zeros(LAYOUT.chunk_shape(2 * CHUNK + 10), np.float16)
    got = engine.retrieve(tokens, out)
    assert (got.hit_tokens, got.loaded_tokens) == (64, 64)
    assert_kv(out, tokens, 64)
    assert not out[:, :, 64:].view(np.uint16).any()


def test_store_dedup(make_engine):
    """Storing cached tokens again stores nothing; an extension stores only its new chunks."""
    engine = make_engine()
    tokens = prompt(14, 3 * CHUNK)
    first = store_kv(engine, tokens)
    second = store_kv(engine, tokens)
    assert (first.stored_tokens, second.stored_tokens, second.skipped_tokens, second.dropped_tokens) == (96, 0, 96, 0)
    longer = tokens + prompt(15, CHUNK)
    third = store_kv(engine, longer)
    assert (third.stored_tokens, third.skipped_tokens) == (32, 96)
    assert engine.storage.memory.usage().chunks == 4
    assert engine.metrics.stored_tokens.total() == 128
    assert engine.metrics.store_skipped_tokens.total() == 96 + 96


def test_dedup_counts_chunks_held_only_on_disk(make_engine):
    """A chunk held on disk but not in memory is not stored again."""
    engine = make_engine(disk=True)
    tokens = prompt(16, 2 * CHUNK)
    store_kv(engine, tokens)
    engine.flush()
    engine.storage.memory.clear()
    result = store_kv(engine, tokens)
    assert (result.stored_tokens, result.skipped_tokens) == (0, 64)
    assert engine.lookup(tokens).tier_tokens == {"disk": 64}


# -- masks ---------------------------------------------------------------------------------------------


def test_mask_skips_leading_chunks_on_store(make_engine):
    """A mask with a chunk-aligned False prefix stores only the rest; the skipped head stays uncached."""
    engine = make_engine()
    tokens = prompt(17, 3 * CHUNK)
    mask = [False] * CHUNK + [True] * (2 * CHUNK)
    result = store_kv(engine, tokens, mask=mask)
    assert (result.stored_tokens, result.skipped_tokens) == (64, 32)
    assert memory_pattern(engine, tokens) == [False, True, True]
    assert engine.lookup(tokens).hit_tokens == 0  # the head is missing: no prefix
    head = store_kv(engine, tokens, mask=torch.ones(len(tokens), dtype=torch.bool))
    assert (head.stored_tokens, head.skipped_tokens) == (32, 64)
    assert engine.lookup(tokens).hit_tokens == 96


def test_mask_skips_leading_chunks_on_retrieve(make_engine):
    """A retrieve mask loads only the unmasked part; hit_tokens counts the skipped prefix."""
    engine = make_engine()
    tokens = prompt(18, 3 * CHUNK)
    store_kv(engine, tokens)
    out = np.full(LAYOUT.chunk_shape(len(tokens)), 5, np.float16)
    mask = np.array([False] * 2 * CHUNK + [True] * CHUNK)
    got = engine.retrieve(tokens, out, mask=mask)
    assert (got.hit_tokens, got.loaded_tokens, got.tier_tokens) == (96, 32, {"memory": 32})
    assert (out[:, :, :64] == 5).all()
    np.testing.assert_array_equal(bits_of(out)[:, :, 64:], kv_bits(tokens)[:, :, 64:])


def test_all_false_mask_skips_everything(make_engine):
    """An all-False mask (any length, aligned or not) stores and loads nothing."""
    engine = make_engine()
    tokens = prompt(19, 2 * CHUNK + 3)
    result = store_kv(engine, tokens, mask=[False] * len(tokens))
    assert (result.stored_tokens, result.skipped_tokens) == (0, len(tokens))
    store_kv(engine, tokens)
    assert engine.retrieve(tokens, mask=[False] * len(tokens)).loaded_tokens == 0


@pytest.mark.parametrize(
    "mask",
    [
        [True] * 63,  # too short
        [True] * 65,  # too long
        [True] * 32 + [False] * 32,  # True then False
        [False] * 5 + [True] * 59,  # skip not a multiple of chunk_size
        [False] * 32 + [True] * 16 + [False] * 16,  # gap
        [[True] * 64],  # 2-D
    ],
    ids=["short", "long", "true-false", "unaligned", "gap", "2d"],
)
def test_bad_masks_rejected(make_engine, mask):
    """Masks of the wrong length or shape, or not False...False True...True aligned, raise ValueError."""
    engine = make_engine()
    tokens = prompt(20, 2 * CHUNK)
    with pytest.raises(ValueError):
        store_kv(engine, tokens, mask=mask)
    with pytest.raises(ValueError):
        engine.retrieve(tokens, mask=mask)
    assert engine.storage.memory.usage().chunks == 0


# -- memory pressure and eviction ---------------------------------------------------------------------------


def test_budget_smaller_than_prompt_stores_a_prefix(make_engine):
    """When the prompt does not fit, the head is stored, the tail is reported dropped, lookups see the head."""
    engine = make_engine(cpu_chunks=4)
    tokens = prompt(21, 6 * CHUNK)
    result = store_kv(engine, tokens)
    assert (result.stored_tokens, result.skipped_tokens, result.dropped_tokens) == (128, 0, 64)
    assert memory_pattern(engine, tokens) == [True] * 4 + [False] * 2
    assert engine.lookup(tokens).hit_tokens == 128
    assert_kv(engine.retrieve(tokens).kv, tokens, 128)
    assert engine.metrics.store_dropped_tokens.total() == 64
    # Storing again finds the head cached and still cannot fit the tail.
    again = store_kv(engine, tokens)
    assert (again.stored_tokens, again.skipped_tokens, again.dropped_tokens) == (0, 128, 64)


def test_budget_below_one_chunk_stores_nothing(make_engine):
    """A budget too small for one chunk drops everything and never fails."""
    engine = make_engine(cpu_chunks=None, max_local_cpu_size=2048 / GiB)
    tokens = prompt(22, 2 * CHUNK)
    result = store_kv(engine, tokens)
    assert (result.stored_tokens, result.dropped_tokens) == (0, 64)
    assert engine.lookup(tokens).hit_tokens == 0


def test_tail_evicted_before_head(make_engine):
    """Making room evicts an older prompt's tail first, so it keeps a usable prefix."""
    engine = make_engine(cpu_chunks=4)
    a, b = prompt(23, 3 * CHUNK), prompt(24, 2 * CHUNK)
    store_kv(engine, a)
    store_kv(engine, b)
    assert memory_pattern(engine, a) == [True, True, False]
    assert engine.lookup(a).hit_tokens == 64 and engine.lookup(b).hit_tokens == 64
    assert engine.metrics.evictions.value(tier="memory") == 1


def test_lookup_refreshes_whole_prefix(make_engine):
    """A looked-up prompt becomes most recent, head last: another prompt is evicted instead."""
    engine = make_engine(cpu_chunks=4)
    a, b, c = prompt(25, 2 * CHUNK), prompt(26, 2 * CHUNK), prompt(27, CHUNK)
    store_kv(engine, a)
    store_kv(engine, b)
    engine.lookup(a)
    store_kv(engine, c)
    assert memory_pattern(engine, a) == [True, True]
    assert memory_pattern(engine, b) == [True, False]


def test_storing_extension_refreshes_shared_head(make_engine):
    """Storing a prompt whose head is cached counts as a use of the head: it outlives the new tail."""
    engine = make_engine(cpu_chunks=3)
    head = prompt(28, CHUNK)
    other = prompt(29, CHUNK)
    store_kv(engine, head)
    store_kv(engine, other)
    extended = head + prompt(30, CHUNK)
    assert store_kv(engine, extended).stored_tokens == 32
    store_kv(engine, prompt(31, CHUNK))  # one eviction: the least recently used chunk
    assert memory_pattern(engine, extended) == [True, True]
    assert engine.lookup(extended).hit_tokens == 64
    assert memory_pattern(engine, other) == [False]


@pytest.mark.parametrize("policy", ["LRU", "LFU", "FIFO", "S3FIFO"])
def test_no_orphan_chunks_under_pressure(make_engine, policy):
    """Under pressure lookups report exactly the cached prefix; with LRU no chunk is ever cached after a hole."""
    engine = make_engine(cpu_chunks=7, cache_policy=policy)
    rng = np.random.default_rng(32)
    roots = [prompt(100 + i, CHUNK) for i in range(4)]
    prompts = [roots[i % 4] + prompt(200 + i, int(rng.integers(1, 4)) * CHUNK) for i in range(12)]
    for _ in range(60):
        tokens = prompts[int(rng.integers(len(prompts)))]
        action = rng.integers(3)
        if action == 0:
            result = store_kv(engine, tokens)
            assert result.stored_tokens + result.skipped_tokens + result.dropped_tokens == len(tokens)
        elif action == 1:
            engine.lookup(tokens)
        else:
            got = engine.retrieve(tokens)
            assert_kv(got.kv, tokens, got.hit_tokens)
        if policy == "LRU":  # other policies may evict a shared head whose uses they do not track by recency
            for p in prompts:
                assert_prefix_shaped(memory_pattern(engine, p))
        for p in prompts:
            look = engine.lookup(p)
            pattern = memory_pattern(engine, p)
            assert look.hit_tokens == pattern.index(False) * CHUNK if False in pattern else len(p)


# -- leases --------------------------------------------------------------------------------------------


def test_pinned_chunks_survive_pressure_until_released(make_engine):
    """Chunks pinned by lookup(pin=True) are never evicted; release() makes them evictable again."""
    engine = make_engine(cpu_chunks=4)
    a, b = prompt(40, 2 * CHUNK), prompt(41, 4 * CHUNK)
    store_kv(engine, a)
    look = engine.lookup(a, pin=True)
    assert look.hit_tokens == 64 and look.lease is not None and look.lease.hit_tokens == 64
    assert engine.storage.memory.usage().pinned_chunks == 2
    result = store_kv(engine, b)
    assert (result.stored_tokens, result.dropped_tokens) == (64, 64)
    got = engine.retrieve(a)
    assert got.hit_tokens == 64
    assert_kv(got.kv, a)
    assert engine.release(look.lease) is True
    assert engine.release(look.lease) is False
    assert engine.release(look.lease.id) is False
    assert engine.storage.memory.usage().pinned_chunks == 0
    assert store_kv(engine, b).stored_tokens == 64  # now a's chunks may go
    assert engine.lookup(a).hit_tokens == 0
    assert engine.lookup(b).hit_tokens == 128


def test_overlapping_leases_pin_until_both_released(make_engine):
    """Two leases on the same chunks keep them pinned until the last one is released (released by id)."""
    engine = make_engine(cpu_chunks=4)
    a = prompt(42, 2 * CHUNK)
    store_kv(engine, a)
    first, second = engine.lookup(a, pin=True).lease, engine.lookup(a[:CHUNK], pin=True).lease
    assert first.id != second.id
    assert engine.release(first.id)
    assert engine.storage.memory.usage().pinned_chunks == 1
    assert store_kv(engine, prompt(43, 4 * CHUNK)).stored_tokens == 96  # a's head is still pinned
    assert engine.lookup(a).hit_tokens == 32
    assert engine.release(second)


def test_lease_expires_after_timeout(make_engine):
    """A lease never released expires after pin_timeout_sec; expiry unpins and release then returns False."""
    engine = make_engine(cpu_chunks=4, pin_timeout_sec=60)
    a = prompt(44, 2 * CHUNK)
    store_kv(engine, a)
    lease = engine.lookup(a, pin=True).lease
    assert lease.deadline - time.monotonic() == pytest.approx(60, abs=5)
    assert engine.leases.expire(now=time.monotonic()) == 0
    assert len(engine.leases) == 1
    assert engine.leases.expire(now=lease.deadline + 0.001) == 1
    assert len(engine.leases) == 0
    assert engine.storage.memory.usage().pinned_chunks == 0
    assert engine.release(lease) is False


def test_expired_lease_swept_by_next_call(make_engine):
    """Engine calls sweep expired leases, so a dead client's pins do not block stores."""
    engine = make_engine(cpu_chunks=4, pin_timeout_sec=0.05)
    a, b = prompt(45, 2 * CHUNK), prompt(46, 4 * CHUNK)
    store_kv(engine, a)
    lease = engine.lookup(a, pin=True).lease
    time.sleep(0.1)
    assert store_kv(engine, b).stored_tokens == 128
    assert len(engine.leases) == 0
    assert engine.release(lease) is False
    assert engine.lookup(a).hit_tokens == 0


def test_leases_gauge_and_disk_pins(make_engine):
    """A lease on disk-resident chunks pins them on disk; the active-leases gauge tracks it."""
    engine = make_engine(disk=True)
    a = prompt(47, 3 * CHUNK)
    store_kv(engine, a)
    engine.flush()
    engine.storage.memory.clear()
    look = engine.lookup(a, pin=True)
    assert look.tier_tokens == {"disk": 96}
    disk = engine.storage.lower[0]
    assert disk.usage().pinned_chunks == 3
    assert engine.metrics.active_leases.values() == {(): 1}
    assert engine.release(look.lease)
    assert disk.usage().pinned_chunks == 0
    assert engine.metrics.active_leases.values() == {(): 0}


def test_clear_with_live_lease_then_release(make_engine):
    """clear() while a lease is held empties the cache; releasing the lease afterwards is clean."""
    engine = make_engine()
    a = prompt(48, 2 * CHUNK)
    store_kv(engine, a)
    lease = engine.lookup(a, pin=True).lease
    assert engine.clear() == 2
    assert engine.lookup(a).hit_tokens == 0
    assert engine.release(lease)
    assert engine.storage.memory.usage().pinned_chunks == 0
    assert store_kv(engine, a).stored_tokens == 64


def test_disk_read_without_free_memory_is_a_miss(make_engine):
    """When every memory chunk is pinned, a disk chunk cannot be staged: the retrieve misses, never fails."""
    engine = make_engine(disk=True, cpu_chunks=4)
    a, b = prompt(49, 4 * CHUNK), prompt(39, 2 * CHUNK)
    store_kv(engine, b)
    engine.flush()
    engine.storage.memory.clear()
    store_kv(engine, a)
    engine.flush()  # until a's disk writes finish, they hold a's memory and evicting a frees nothing
    lease = engine.lookup(a, pin=True).lease
    assert engine.lookup(b).tier_tokens == {"disk": 64}
    got = engine.retrieve(b)
    assert (got.hit_tokens, got.tier_tokens) == (0, {})
    assert engine.metrics.errors.value(tier="disk", kind="no_memory") >= 1
    assert engine.storage.lower[0].contains(engine.chunk_keys(b)[1][0])  # not dropped from disk
    assert engine.release(lease)
    got = engine.retrieve(b)
    assert got.tier_tokens == {"disk": 64}
    assert_kv(got.kv, b)


def test_corrupt_middle_chunk_truncates_the_hit(make_engine):
    """A corrupt chunk on disk ends the prefix there: earlier chunks are returned exact, later ones untouched."""
    engine = make_engine(disk=True)
    tokens = prompt(38, 3 * CHUNK)
    store_kv(engine, tokens)
    engine.flush()
    engine.storage.memory.clear()
    disk = engine.storage.lower[0]
    path = disk.path_for(engine.chunk_keys(tokens)[1][1].id)
    raw = bytearray(path.read_bytes())
    raw[200] ^= 0x01
    path.write_bytes(bytes(raw))
    out = np.full(LAYOUT.chunk_shape(len(tokens)), 9, np.float16)
    got = engine.retrieve(tokens, out)
    assert (got.hit_tokens, got.tier_tokens) == (32, {"disk": 32})
    assert_kv(out, tokens, 32)
    assert (out[:, :, 32:] == 9).all()
    assert not path.exists()
    assert engine.lookup(tokens).hit_tokens == 32
    assert engine.retrieve(tokens).kv.shape == LAYOUT.chunk_shape(32)


# -- isolation -----------------------------------------------------------------------------------------


def test_namespaces_of_many_salts_stay_bounded(make_engine):
    """A server engine sees whatever salts clients send: its table of namespaces must not grow with them (10,000
    distinct salts used to keep 10,000 entries), while a salt in use keeps working."""
    engine = make_engine()
    tokens = list(range(32))
    store_kv(engine, tokens, cache_salt="kept")
    for i in range(10_000):
        engine.lookup(tokens, cache_salt=f"salt-{i}")
    assert len(engine._namespaces) <= MAX_NAMESPACES
    assert engine.lookup(tokens, cache_salt="kept").hit_tokens == 32


def test_cache_salt_isolation(make_engine):
    """A tenant's chunks never hit for another tenant (or for no tenant), and are not deduplicated across them."""
    engine = make_engine()
    tokens = prompt(50, 2 * CHUNK)
    assert store_kv(engine, tokens, cache_salt="tenant-a").stored_tokens == 64
    assert engine.lookup(tokens, cache_salt="tenant-a").hit_tokens == 64
    assert engine.lookup(tokens, cache_salt="tenant-b").hit_tokens == 0
    assert engine.lookup(tokens).hit_tokens == 0
    assert engine.retrieve(tokens, cache_salt="tenant-b").hit_tokens == 0
    assert engine.lookup(tokens, cache_salt="tenant-b", pin=True).lease is None
    assert store_kv(engine, tokens, cache_salt="tenant-b").stored_tokens == 64
    assert engine.storage.memory.usage().chunks == 4
    assert engine.delete(tokens, cache_salt="tenant-a") == 2
    assert engine.lookup(tokens, cache_salt="tenant-a").hit_tokens == 0
    assert engine.lookup(tokens, cache_salt="tenant-b").hit_tokens == 64


@pytest.mark.parametrize(
    "other",
    [
        {"model_name": "test/other-model"},
        {"layout": KVLayout(2, 2, 8, "bfloat16")},
        {"layout": KVLayout(2, 4, 4)},  # same bytes per token, different shape
        {"world_size": 2, "rank": 0},
        {"world_size": 2, "rank": 1},
    ],
    ids=["model", "dtype", "heads", "rank0of2", "rank1of2"],
)
def test_engines_sharing_a_disk_dir_never_cross_hit(make_engine, tmp_path, other):
    """Engines differing in model, layout or rank share a disk directory without ever serving each other."""
    shared = tmp_path / "shared-disk"
    writer = make_engine(disk=shared)
    tokens = prompt(51, 3 * CHUNK)
    store_kv(writer, tokens)
    assert writer.flush(10.0)
    reader = make_engine(disk=shared, **other)
    assert reader.storage.lower[0].usage().chunks == 3  # it sees the files...
    assert reader.lookup(tokens).hit_tokens == 0  # ...but none is its own
    assert reader.retrieve(tokens).hit_tokens == 0
    twin = make_engine(disk=shared)  # the same identity does hit
    assert twin.lookup(tokens).tier_tokens == {"disk": 96}
    assert_kv(twin.retrieve(tokens).kv, tokens)


# -- misuse ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((2, 2, 64, 2, 4), np.float16),  # wrong head_dim
        np.zeros((2, 1, 64, 2, 8), np.float16),  # wrong kv size
        np.zeros((3, 2, 64, 2, 8), np.float16),  # wrong layers
        np.zeros((2, 2, 64, 16), np.float16),  # wrong rank
        np.zeros((2, 2, 64, 2, 8), np.float32),  # wrong dtype
        np.zeros((2, 2, 63, 2, 8), np.float16),  # fewer tokens than the prompt
        torch.zeros((2, 2, 64, 2, 8), dtype=torch.bfloat16),  # wrong torch dtype
        torch.zeros((2, 2, 64, 2, 4), dtype=torch.float16),  # wrong torch shape
    ],
    ids=["head_dim", "kv_size", "layers", "ndim", "dtype", "short", "torch-dtype", "torch-shape"],
)
def test_layout_mismatch_on_store(make_engine, bad):
    """KV that does not match the engine's layout (or is too short) raises LayoutError and stores nothing."""
    engine = make_engine()
    tokens = prompt(52, 2 * CHUNK)
    with pytest.raises(LayoutError):
        engine.store(tokens, bad)
    assert engine.storage.memory.usage().chunks == 0


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((2, 2, 64, 2, 4), np.float16),
        np.zeros((2, 2, 64, 2, 8), np.float32),
        np.zeros((2, 2, 64, 2, 8), np.uint16),  # bf16 bits are not fp16
        torch.zeros((2, 2, 64, 2, 8), dtype=torch.float32),
    ],
    ids=["shape", "dtype", "uint16", "torch-dtype"],
)
def test_layout_mismatch_on_retrieve(make_engine, bad):
    """A destination that does not match the layout raises LayoutError, and no reference leaks."""
    engine = make_engine()
    tokens = prompt(53, 2 * CHUNK)
    store_kv(engine, tokens)
    with pytest.raises(LayoutError):
        engine.retrieve(tokens, bad)


def test_unsupported_containers_rejected(make_engine):
    """Plain lists are neither a KV source nor a destination."""
    engine = make_engine()
    tokens = prompt(54, CHUNK)
    with pytest.raises(TypeError):
        engine.store(tokens, kv_array(tokens).tolist())
    with pytest.raises(TypeError):
        engine.retrieve(tokens, [])


def test_invalid_tokens_rejected(make_engine):
    """Bad token ids raise ValueError from every call."""
    engine = make_engine()
    bad = [1, -1] * CHUNK
    with pytest.raises(ValueError):
        engine.lookup(bad)
    with pytest.raises(ValueError):
        engine.store(bad, np.zeros(LAYOUT.chunk_shape(len(bad)), np.float16))
    with pytest.raises(ValueError):
        engine.retrieve(bad)


class FailingDestination:
    """A KVDestination whose copy of chunk ``fail_at`` raises (e.g. a device error mid-retrieve)."""

    def __init__(self, fail_at: int) -> None:
        self.fail_at = fail_at
        self.calls = 0

    def write_from(self, obj, start, end):
        if self.calls == self.fail_at:
            raise RuntimeError("copy failed")
        self.calls += 1

    def synchronize(self):
        return None


@pytest.mark.parametrize("fail_at", [0, 1, 3])
@pytest.mark.parametrize("from_disk", [False, True])
def test_failing_destination_leaks_nothing(make_engine, fail_at, from_disk):
    """A destination that raises mid-retrieve propagates the error and leaks no chunk reference or pin."""
    engine = make_engine(disk=from_disk)
    tokens = prompt(55, 4 * CHUNK)
    store_kv(engine, tokens)
    if from_disk:
        engine.flush()
        engine.storage.memory.clear()
    with pytest.raises(RuntimeError, match="copy failed"):
        engine.retrieve(tokens, FailingDestination(fail_at))
    check_no_leaks(engine)
    engine.clear()
    assert engine.storage.pool.live_objects == 0


# -- prefetch, clear, close ------------------------------------------------------------------------------


def test_prefetch_loads_disk_chunks_into_memory(make_engine):
    """prefetch() promotes a disk-resident prefix into memory and returns its length."""
    engine = make_engine(disk=True)
    tokens = prompt(60, 3 * CHUNK)
    store_kv(engine, tokens)
    engine.flush()
    engine.storage.memory.clear()
    longer = tokens + prompt(61, CHUNK)
    assert engine.prefetch(longer).result(timeout=10) == 96
    assert memory_pattern(engine, longer) == [True, True, True, False]
    assert engine.lookup(longer).tier_tokens == {"memory": 96}
    got = engine.retrieve(longer)
    assert got.tier_tokens == {"memory": 96}
    assert_kv(got.kv, longer, 96)
    assert engine.prefetch(longer).result(timeout=10) == 96  # already in memory
    assert engine.prefetch(prompt(62, 2 * CHUNK)).result(timeout=10) == 0


def test_prefetch_without_disk(make_engine):
    """Without slower tiers prefetch just reports the cached prefix."""
    engine = make_engine()
    tokens = prompt(63, 2 * CHUNK)
    store_kv(engine, tokens)
    assert engine.prefetch(tokens).result(timeout=10) == 64


def test_clear_removes_everything(make_engine):
    """clear() empties memory and disk (files included) and returns how many chunks it removed."""
    engine = make_engine(disk=True)
    a, b = prompt(64, 2 * CHUNK), prompt(65, 3 * CHUNK)
    store_kv(engine, a)
    store_kv(engine, b)
    engine.flush()
    assert engine.clear() == 5 + 5  # memory and disk
    assert engine.lookup(a).hit_tokens == engine.lookup(b).hit_tokens == 0
    assert engine.storage.memory.usage().chunks == 0 and engine.storage.memory.usage().used_bytes == 0
    assert engine.storage.lower[0].usage().used_bytes == 0
    disk_root = engine.storage.lower[0].root
    assert not list(disk_root.glob("*/*/*.kvt"))
    assert store_kv(engine, a).stored_tokens == 64


def test_delete_removes_a_prompt_from_every_tier(make_engine):
    """delete() removes the prompt's chunks from memory and disk and counts those it found."""
    engine = make_engine(disk=True)
    tokens = prompt(66, 2 * CHUNK)
    store_kv(engine, tokens)
    assert engine.delete(tokens) == 2
    assert engine.lookup(tokens).hit_tokens == 0
    assert engine.storage.lower[0].usage().chunks == 0
    assert engine.delete(tokens) == 0


def test_restart_hits_disk(make_engine, tmp_path):
    """close() keeps disk contents: a new engine on the same directory hits and reads bit-exact KV."""
    first = make_engine(disk=True)
    tokens = prompt(67, 3 * CHUNK + 7)
    store_kv(first, tokens)
    first.close()  # no explicit flush: close finishes background writes
    make_engine.engines.remove(first)
    second = make_engine(disk=True)
    assert second.lookup(tokens).tier_tokens == {"disk": 96}
    got = second.retrieve(tokens)
    assert got.hit_tokens == 96
    assert_kv(got.kv, tokens, 96)


def test_context_manager_closes(tmp_path):
    """An engine used as a context manager releases leases and keeps disk contents on exit."""
    config = load_config(
        overrides={
            "chunk_size": CHUNK,
            "max_local_cpu_size": chunk_budget(8),
            "local_disk": str(tmp_path),
            "max_local_disk_size": 0.001,
            "log_level": "WARNING",
        },
        env={},
    )
    tokens = prompt(68, 2 * CHUNK)
    with CacheEngine(config, LAYOUT, model_name="ctx") as engine:
        store_kv(engine, tokens)
        lease = engine.lookup(tokens, pin=True).lease
        assert lease is not None
    assert len(engine.leases) == 0
    with CacheEngine(config, LAYOUT, model_name="ctx") as again:
        assert again.lookup(tokens).hit_tokens == 64


def test_disk_only_staging_without_local_cpu(make_engine):
    """With local_cpu false memory only stages: chunks land on disk and are read back from it."""
    engine = make_engine(disk=True, local_cpu=False)
    assert engine.storage.memory is None
    tokens = prompt(69, 2 * CHUNK)
    assert store_kv(engine, tokens).stored_tokens == 64
    engine.flush()
    assert engine.lookup(tokens).tier_tokens == {"disk": 64}
    got = engine.retrieve(tokens)
    assert got.tier_tokens == {"disk": 64}
    assert_kv(got.kv, tokens)
    assert engine.storage.pool.live_objects == 0


# -- concurrency -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("pressure", [False, True])
def test_concurrent_stores_and_retrieves_are_bit_exact(make_engine, pressure):
    """Several threads storing, looking up and retrieving overlapping prompts always read exact KV."""
    engine = make_engine(disk=True, cpu_chunks=6 if pressure else 128)
    shared = prompt(70, CHUNK)
    prompts = [shared + prompt(71 + i, (1 + i % 3) * CHUNK) for i in range(12)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def work(worker: int) -> None:
        try:
            rng = np.random.default_rng(worker)
            barrier.wait()
            for _ in range(60):
                tokens = prompts[int(rng.integers(len(prompts)))]
                op = int(rng.integers(3))
                if op == 0:
                    store_kv(engine, tokens)
                elif op == 1:
                    look = engine.lookup(tokens, pin=bool(rng.integers(2)))
                    if look.lease is not None:
                        engine.release(look.lease)
                else:
                    out = np.zeros(LAYOUT.chunk_shape(len(tokens)), np.float16) if rng.integers(2) else None
                    got = engine.retrieve(tokens, out)
                    assert_kv(got.kv, tokens, got.hit_tokens)
                    if not pressure and got.hit_tokens:
                        assert got.hit_tokens % CHUNK == 0
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[0]
    for tokens in prompts:  # every prompt stored at least once is readable afterwards
        got = engine.retrieve(tokens)
        assert_kv(got.kv, tokens, got.hit_tokens)


# -- metrics ---------------------------------------------------------------------------------------------


def families(engine: CacheEngine) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(engine.metrics.render())}


def value(fams: dict[str, Any], family: str, sample: str | None = None, **labels: str) -> float:
    name = sample or family
    for s in fams[family].samples:
        if s.name == name and s.labels == labels:
            return s.value
    raise KeyError((family, name, labels))


def test_metrics_after_traffic(make_engine):
    """After mixed traffic the Prometheus text parses and reports every counter, gauge and histogram."""
    engine = make_engine(disk=True, cpu_chunks=4)
    a, b = prompt(80, 2 * CHUNK), prompt(81, 3 * CHUNK)
    store_kv(engine, a)
    store_kv(engine, a)  # dedup
    engine.lookup(a)
    engine.retrieve(a)  # 64 tokens from memory
    engine.flush()
    engine.storage.memory.clear()
    engine.retrieve(a)  # 64 tokens from disk
    store_kv(engine, b)  # evicts from memory
    engine.flush()
    engine.lookup(prompt(82, CHUNK))  # a miss
    # Corrupt one of b's chunk files on disk, then read b from disk: the bad chunk is an error and a miss.
    _, keys = engine.chunk_keys(b)
    disk = engine.storage.lower[0]
    path = disk.path_for(keys[0].id)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    engine.storage.memory.clear()
    assert engine.retrieve(b).hit_tokens == 0

    fams = families(engine)
    assert fams["kvtier_lookup_requests"].type == "counter"
    assert value(fams, "kvtier_lookup_requests", "kvtier_lookup_requests_total") == 2
    assert value(fams, "kvtier_lookup_tokens", "kvtier_lookup_tokens_total") == 64 + 32
    assert value(fams, "kvtier_lookup_hit_tokens", "kvtier_lookup_hit_tokens_total") == 64
    assert value(fams, "kvtier_retrieve_requests", "kvtier_retrieve_requests_total") == 3
    hit = "kvtier_retrieve_hit_tokens_total"
    assert value(fams, "kvtier_retrieve_hit_tokens", hit, tier="memory") == 64
    assert value(fams, "kvtier_retrieve_hit_tokens", hit, tier="disk") == 64
    assert value(fams, "kvtier_stored_tokens", "kvtier_stored_tokens_total") == 64 + 96
    assert value(fams, "kvtier_store_skipped_tokens", "kvtier_store_skipped_tokens_total") == 64
    assert value(fams, "kvtier_store_requests", "kvtier_store_requests_total") == 3
    chunk_file = 128 + LAYOUT.chunk_bytes(CHUNK)
    read = "kvtier_tier_read_bytes_total"
    assert value(fams, "kvtier_tier_read_bytes", read, tier="memory") == LAYOUT.chunk_bytes(64)
    # a from disk (2 files), then b: its 3 files are read in parallel, the first fails, the other 2 are discarded
    assert value(fams, "kvtier_tier_read_bytes", read, tier="disk") == 4 * chunk_file
    write = "kvtier_tier_write_bytes_total"
    assert value(fams, "kvtier_tier_write_bytes", write, tier="memory") == LAYOUT.chunk_bytes(64 + 96)
    assert value(fams, "kvtier_tier_write_bytes", write, tier="disk") == 5 * chunk_file
    assert value(fams, "kvtier_evictions", "kvtier_evictions_total", tier="memory") >= 1
    assert value(fams, "kvtier_errors", "kvtier_errors_total", tier="disk", kind="corrupt") == 1
    assert value(fams, "kvtier_promotions", "kvtier_promotions_total") == 2
    for name in ("kvtier_lookup_seconds", "kvtier_store_seconds", "kvtier_retrieve_seconds"):
        assert fams[name].type == "histogram"
    assert value(fams, "kvtier_lookup_seconds", "kvtier_lookup_seconds_count") == 2
    assert value(fams, "kvtier_store_seconds", "kvtier_store_seconds_count") == 3
    assert value(fams, "kvtier_retrieve_seconds", "kvtier_retrieve_seconds_count") == 3
    assert value(fams, "kvtier_lookup_seconds", "kvtier_lookup_seconds_bucket", le="+Inf") == 2
    assert value(fams, "kvtier_tier_write_seconds", "kvtier_tier_write_seconds_count", tier="disk") == 5
    assert value(fams, "kvtier_tier_read_seconds", "kvtier_tier_read_seconds_count", tier="disk") == 4
    assert value(fams, "kvtier_tier_capacity_bytes", tier="memory") == 4 * PAGE
    assert value(fams, "kvtier_tier_capacity_bytes", tier="disk") == engine.config.local_disk_bytes
    assert value(fams, "kvtier_tier_used_bytes", tier="memory") == engine.storage.memory.usage().used_bytes
    assert value(fams, "kvtier_tier_used_bytes", tier="disk") == 4 * chunk_file  # the corrupt file was dropped
    assert value(fams, "kvtier_tier_chunks", tier="disk") == 4
    assert value(fams, "kvtier_pinned_chunks", tier="memory") == 0
    assert value(fams, "kvtier_background_write_queue_bytes", tier="disk") == 0
    assert value(fams, "kvtier_active_leases") == 0


# -- segments: text cached by its own content, reused at any position ---------------------------------------
def test_a_segment_is_found_by_its_own_tokens_wherever_it_came_from(make_engine):
    """A segment's keys depend on its tokens only (not on what preceded it in a prompt), its trailing partial
    chunk is kept (segments rarely end on a chunk boundary), and its key space is not the prompts' one: the same
    tokens stored as a segment are no prefix hit, and a prefix is no segment hit."""
    engine = make_engine()
    segment = prompt(1, 2 * CHUNK + 9)
    assert store_kv(engine, segment, segment=True).stored_tokens == len(segment)
    assert engine.lookup(segment, segment=True).hit_tokens == len(segment)
    assert engine.lookup(segment).hit_tokens == 0
    got = engine.retrieve(segment, segment=True)
    assert got.hit_tokens == len(segment)
    assert_kv(got.kv, segment)
    store_kv(engine, prompt(2, 2 * CHUNK))
    assert engine.lookup(prompt(2, 2 * CHUNK), segment=True).hit_tokens == 0
    assert engine.delete(segment, segment=True) == 3 and engine.lookup(segment, segment=True).hit_tokens == 0


def test_a_longer_segment_reuses_the_whole_chunks_of_a_shorter_one(make_engine):
    """A segment is found only whole at its tail (the partial chunk's hash commits to its length), so a segment
    extended by a few tokens hits the full chunks they share and computes the rest."""
    engine = make_engine()
    short = prompt(3, CHUNK + 5)
    store_kv(engine, short, segment=True)
    assert engine.lookup([*short, 7, 8, 9], segment=True).hit_tokens == CHUNK


def test_segments_of_tenants_are_apart_and_cleared_with_them(make_engine):
    engine = make_engine(disk=True)
    segment = prompt(4, CHUNK + 3)
    store_kv(engine, segment, segment=True, cache_salt="a")
    assert engine.lookup(segment, segment=True, cache_salt="b").hit_tokens == 0
    assert engine.flush(10)
    digests = engine.storage.tenant_namespaces("a")
    assert engine.namespace("a", segment=True).digest in digests
    assert engine.storage.delete_namespaces(digests) == 4  # 2 chunks, in memory and on disk
