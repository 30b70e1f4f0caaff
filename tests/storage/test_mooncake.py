"""The Mooncake Store tier against a real Mooncake Store (``mooncake_master`` + a standalone ``mooncake_client``
holding the pool, TCP transport): the storage contract; URLs and ``MOONCAKE_CONFIG_PATH``; one call per prompt;
a full pool; faults (a hung master, a dead store and its restart); damaged values; two engine processes sharing
KV through it."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import mooncake_servers
import numpy as np
import pytest
import remote_helpers
from contract import StorageTierContract, read, store
from mooncake_servers import MooncakeStore
from remote_helpers import (
    config,
    count_held,
    engine_process,
    fault_engine,
    same_bits,
    store_and_read_back,
)

from kvtier import KVLayout
from kvtier.codecs.chunk_format import CHUNK_HEADER_SIZE
from kvtier.errors import ConfigError
from kvtier.metrics import CacheMetrics
from kvtier.storage.registry import create_remote_tier
from kvtier.storage.remote import RemoteTier

mooncake_store = mooncake_servers.mooncake_store
own_mooncake = mooncake_servers.own_mooncake
make_tier = remote_helpers.make_tier


class TestMooncakeTier(StorageTierContract):
    exact_usage = False  # a shared store is not counted
    atomic_put = False  # Mooncake answers success to every put of a name it holds (the first value stays)

    @pytest.fixture
    def tier(self, mooncake_store: MooncakeStore, make_tier) -> RemoteTier:
        return make_tier(mooncake_store.url)


# -- URLs and options ----------------------------------------------------------------------------------------------


def test_url_options_over_the_config_file_over_defaults(tmp_path: Path) -> None:
    from kvtier.storage.mooncake import parse_url

    path = tmp_path / "mooncake.json"
    path.write_text(json.dumps({"metadata_server": "http://meta:8080/metadata", "global_segment_size": 1 << 30,
                                "protocol": "tcp", "master_server_address": "ignored:1"}))  # fmt: skip
    options = parse_url("mooncakestore://master:50052?local_buffer_size=268435456", {"MOONCAKE_CONFIG_PATH": str(path)})
    assert options.master_server_address == "master:50052"
    assert options.metadata_server == "http://meta:8080/metadata"
    assert (options.global_segment_size, options.local_buffer_size) == (1 << 30, 256 << 20)
    defaults = parse_url("mooncakestore://127.0.0.1", {})
    assert defaults.master_server_address == "127.0.0.1:50051"
    assert defaults.metadata_server == "http://127.0.0.1:8080/metadata" and defaults.local_hostname == "127.0.0.1"


@pytest.mark.parametrize(
    "url",
    ["mooncakestore://", "mooncakestore://a/path", "mooncakestore://a?nope=1", "mooncakestore://a?protocol=udp",
     "mooncakestore://a?local_buffer_size=0", "mooncakestore://a?global_segment_size=big", "mooncakestore://a,b"],
)  # fmt: skip
def test_bad_urls_are_config_errors(url: str) -> None:
    from kvtier.storage.mooncake import parse_url

    with pytest.raises(ConfigError, match="remote_url"):
        parse_url(url, {})


@pytest.mark.parametrize(
    ("content", "message"),
    [("[1, 2", "MOONCAKE_CONFIG_PATH"), ("[1, 2]", "MOONCAKE_CONFIG_PATH"), ('{"protocol": 5}', "protocol"),
     ('{"metadata_server": ["x"]}', "metadata_server"), ('{"global_segment_size": -1}', "global_segment_size"),
     ('{"local_buffer_size": "1e999"}', "local_buffer_size")],
)  # fmt: skip
def test_a_bad_config_file_is_a_config_error(tmp_path: Path, content: str, message: str) -> None:
    from kvtier.storage.mooncake import parse_url

    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(ConfigError, match=message):
        parse_url("mooncakestore://a", {"MOONCAKE_CONFIG_PATH": str(tmp_path / "bad.json")})


def test_regex_prefix_matches_only_the_prefix() -> None:
    import re

    from kvtier.storage.mooncake import regex_prefix

    pattern = re.compile(regex_prefix("t-a.b+c/"))
    assert pattern.match("t-a.b+c/x") and not pattern.match("t-aXb+c/x") and not pattern.match("x/t-a.b+c/")


# -- calls -----------------------------------------------------------------------------------------------------------


def test_a_prompt_is_one_call_and_a_chunk_is_never_sent_twice(mooncake_store, make_tier, make_obj, make_keys, pool):
    tier = make_tier(mooncake_store.url)
    calls: list[str] = []
    bounded = tier.store._bounded

    def counting(call, nbytes=0):  # type: ignore[no-untyped-def]
        calls.append(call.__qualname__)
        return bounded(call, nbytes)

    tier.store._bounded = counting  # type: ignore[method-assign]
    keys = make_keys(16)
    objs = [make_obj(k, 32) for k in keys]
    try:
        assert tier.put_many(keys, objs) == 16
        assert len(calls) == 2  # which exist, then the absent ones
        assert tier.put_many(keys, objs) == 0  # all there: nothing sent
        calls.clear()
        got = tier.get_many(keys, pool.allocate)
        assert len(calls) == 1 and all(g is not None for g in got)
        for obj in got:
            obj.unref()  # type: ignore[union-attr]
    finally:
        for obj in objs:
            obj.unref()


def test_a_full_pool_loses_chunks_to_misses_never_to_wrong_kv(own_mooncake, make_obj, make_keys, pool, content):
    """A 64 MB pool offered 100 MB: writes beyond what it holds fail or evict, counted, without an exception;
    every chunk read back is bit-exact."""
    metrics = CacheMetrics()
    tier = create_remote_tier(own_mooncake.url, config(own_mooncake.url), metrics)
    keys = make_keys(400)
    for key in keys:
        obj = make_obj(key, 2048)  # 256 KiB
        tier.put(key, obj)
        obj.unref()
    assert 0 < count_held(tier, keys, pool.allocate, content) < 400
    assert metrics.errors.value(tier="mooncake", kind="corrupt") == 0
    tier.close()


def test_damaged_value_is_a_counted_miss_and_deleted(mooncake_store, make_tier, make_obj, make_keys, pool, metrics):
    tier = make_tier(mooncake_store.url)
    keys = make_keys(2)
    store(tier, make_obj, keys, 32)
    name = tier.name_for(keys[0])
    client = tier.store._connected()
    value = bytes(client.get(name))
    assert client.remove(name, True) == 0
    assert client.put_parts(name, value[: CHUNK_HEADER_SIZE + 100] + bytes([value[CHUNK_HEADER_SIZE + 100] ^ 1])
                            + value[CHUNK_HEADER_SIZE + 101 :]) == 0  # fmt: skip
    damaged, neighbour = tier.get_many(keys, pool.allocate)
    assert damaged is None and neighbour is not None
    neighbour.unref()
    assert client.is_exist(name) == 0
    assert metrics.errors.value(tier="mooncake", kind="corrupt") == 1
    assert read(tier, keys[1], pool.allocate) is not None


# -- faults --------------------------------------------------------------------------------------------------------


def test_hung_master_dead_store_and_restart(own_mooncake: MooncakeStore) -> None:
    """A hung master (SIGSTOP) makes lookups and retrieves misses within the timeout, then the breaker serves fast
    misses; killed, misses stay fast; restarted (empty) it takes stores and serves hits again."""
    with fault_engine(own_mooncake.url, timeout=1.0) as engine:
        errors = engine.metrics.errors
        tokens, kv = store_and_read_back(engine, "mooncake")

        own_mooncake.pause()
        started = time.monotonic()
        for _ in range(5):
            assert engine.lookup(tokens).hit_tokens == 0
            assert engine.retrieve(tokens).hit_tokens == 0
        assert time.monotonic() - started < 4.0  # two timeouts open the breaker; the rest are fast
        assert errors.value(tier="mooncake", kind="circuit_open") >= 8

        own_mooncake.resume()
        own_mooncake.stop()
        own_mooncake.start()
        deadline = time.monotonic() + 20
        while engine.store(tokens, kv).stored_tokens and engine.flush(10) and engine.lookup(tokens).hit_tokens < 64:
            assert time.monotonic() < deadline, "the tier did not recover"
            time.sleep(0.3)
        got = engine.retrieve(tokens)
        assert got.tier_tokens == {"mooncake": 64} and same_bits(got.kv, kv)


def test_two_processes_share_kv_through_mooncake(mooncake_store) -> None:
    """Process A stores a prompt and exits; process B then retrieves it bit-exact (the pool is the provider's)."""
    prefix = f"test-{uuid.uuid4().hex[:12]}"

    def run(action: str) -> str:
        return engine_process(mooncake_store.url, prefix, action)

    assert run("store") == "80 True"
    assert run("retrieve") == "80 {'mooncake': 80} True"


def test_reads_go_in_batches_and_values_larger_than_the_slot_are_read_again(
    mooncake_store, make_tier, make_keys, content, monkeypatch
):
    """A 1 MiB chunk, then 11 of 8 MiB, read in batches of 32 MiB by a tier that has never seen their size: it asks
    for the first one's, the larger ones do not fit that slot and are read again at their size; all bit-exact."""
    from kvtier.memory.pool import MemoryPool
    from kvtier.storage import mooncake

    monkeypatch.setattr(mooncake, "READ_BATCH_BYTES", 32 << 20)
    layout = KVLayout(num_layers=4, num_kv_heads=8, head_dim=128, dtype="float16")  # 16 KiB per token
    pool = MemoryPool(256 << 20)
    writer, reader = make_tier(mooncake_store.url), None
    keys = make_keys(12)
    try:
        for i, key in enumerate(keys):
            obj = pool.allocate(layout, 64 if i == 0 else 512)
            assert obj is not None
            obj.data[:] = content(key.id, obj.nbytes)
            assert writer.put(key, obj)
            obj.unref()
        reader = create_remote_tier(mooncake_store.url, config(mooncake_store.url, remote_prefix=writer.prefix[:-1]),
                                    CacheMetrics())  # fmt: skip
        calls: list[int] = []
        bounded = reader.store._bounded
        reader.store._bounded = lambda call, nbytes=0: calls.append(nbytes) or bounded(call, nbytes)  # type: ignore[method-assign]
        got = reader.get_many(keys, pool.allocate)
        assert all(g is not None for g in got)
        # the first size; one batch of 1 MiB slots; the sizes that did not fit; 11 values of 8 MiB + a header, 3 a batch
        assert len(calls) == 1 + 1 + 1 + 4
        for key, obj in zip(keys, got, strict=True):
            np.testing.assert_array_equal(obj.data, content(key.id, obj.nbytes))  # type: ignore[union-attr]
            obj.unref()  # type: ignore[union-attr]
    finally:
        if reader is not None:
            reader.close()
        pool.close()


def test_a_value_larger_than_any_chunk_is_a_miss_and_does_not_grow_the_read_slot(
    mooncake_store, make_tier, make_obj, make_keys, pool, monkeypatch
):
    from kvtier.storage import mooncake

    tier = make_tier(mooncake_store.url)
    small, large = make_keys(2)
    store(tier, make_obj, [small], 4)
    store(tier, make_obj, [large], 64)  # 8 KiB of payload; the small one fits a 4 KiB slot
    monkeypatch.setattr(mooncake, "MAX_VALUE", 4096)  # the large value is now "larger than any chunk"
    reader = make_tier(mooncake_store.url, remote_prefix=tier.prefix[:-1])
    got_small, got_large = reader.get_many([small, large], pool.allocate)
    assert got_large is None and got_small is not None
    got_small.unref()
    assert reader.store._largest_value <= 4096
