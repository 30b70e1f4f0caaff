"""The memcached tier against real memcached processes: the storage contract on one server and on three spread by
rendezvous hashing; URL parsing; one item per chunk; one round trip per server for a prompt; chunks above the
server's item limit, a full server that does not evict, an evicting one; TTL; faults (a hung, dead and restarted
server; one server of three down); damaged values; an engine through it."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from urllib.parse import unquote

import memcached_servers
import pytest
import remote_helpers
from contract import StorageTierContract, read, store
from memcached_servers import MemcachedServer
from pymemcache.client.base import Client
from remote_helpers import (
    LAYOUT,
    config,
    count_held,
    engine_config,
    fault_engine,
    random_kv,
    same_bits,
    store_and_read_back,
)

from kvtier import CacheEngine, load_config
from kvtier.codecs.chunk_format import CHUNK_HEADER_SIZE, decode_header
from kvtier.errors import ConfigError
from kvtier.storage import memcached
from kvtier.storage.memcached import MemcachedURL, create_memcached_tier, parse_url
from kvtier.storage.registry import create_remote_tier
from kvtier.storage.remote import RemoteTier

memcached_server = memcached_servers.memcached_server
own_memcached = memcached_servers.own_memcached
make_tier = remote_helpers.make_tier


@pytest.fixture(scope="module")
def memcached_trio() -> Iterator[list[MemcachedServer]]:
    memcached_servers.require_memcached()
    servers = [MemcachedServer() for _ in range(3)]
    try:
        yield [s.start() for s in servers]
    finally:
        for s in servers:
            s.stop()


def url_of(servers: list[MemcachedServer]) -> str:
    return "memcached://" + ",".join(f"127.0.0.1:{s.port}" for s in servers)


def raw_client(server: MemcachedServer) -> Client:
    return Client(("127.0.0.1", server.port), default_noreply=False, timeout=5)


def items_on(server: MemcachedServer, prefix: str) -> int:
    """Items whose name starts with ``prefix`` (metadump lists names URL-encoded)."""
    dump = server.command_reply(b"lru_crawler metadump all\r\n", b"END\r\n")
    names = [unquote(line[4:].split(b" ")[0].decode()) for line in dump.split(b"\n") if line.startswith(b"key=")]
    return sum(name.startswith(prefix) for name in names)


# -- the storage contract ------------------------------------------------------------------------------------------


class TestMemcachedTier(StorageTierContract):
    exact_usage = False  # a shared store is not counted (see RemoteTier.usage)

    @pytest.fixture
    def tier(self, memcached_server: MemcachedServer, make_tier) -> RemoteTier:
        return make_tier(memcached_server.url)


class TestThreeMemcachedServers(StorageTierContract):
    exact_usage = False

    @pytest.fixture
    def tier(self, memcached_trio: list[MemcachedServer], make_tier) -> RemoteTier:
        return make_tier(url_of(memcached_trio))


# -- URLs ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "servers"),
    [
        ("memcached://cache", (("cache", 11211),)),
        ("memcached://10.0.0.1:11311", (("10.0.0.1", 11311),)),
        ("memcached://a:1,b,c:3", (("a", 1), ("b", 11211), ("c", 3))),
        ("memcached://[::1]:11211", (("::1", 11211),)),
    ],
)
def test_url_forms(url: str, servers: tuple[tuple[str, int], ...]) -> None:
    assert parse_url(url) == MemcachedURL(servers)


@pytest.mark.parametrize(
    "url",
    ["memcached://", "memcached://a:0", "memcached://a:x", "memcached://a/1", "memcached://a?x=1",
     "memcached://u:p@a", "memcached://a,a", "memcached://a:1,"],
)  # fmt: skip
def test_bad_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError, match="remote_url"):
        parse_url(url)


@pytest.mark.parametrize("prefix", ["with space", "tab\there", "é", "x" * 101])
def test_prefixes_memcached_cannot_carry_are_config_errors(prefix: str, metrics) -> None:
    with pytest.raises(ConfigError, match="remote_prefix"):
        create_memcached_tier("memcached://a", load_config(env={}, overrides={"remote_prefix": prefix}), metrics)


def test_the_registry_builds_it(memcached_server, metrics) -> None:
    tier = create_remote_tier(memcached_server.url, config(memcached_server.url), metrics)
    assert isinstance(tier, RemoteTier) and tier.name == "memcached"
    tier.close()


# -- what is stored, and how it is asked for ------------------------------------------------------------------------


def test_one_item_per_chunk_holding_header_and_payload(memcached_server, make_tier, make_obj, make_keys, content):
    tier = make_tier(memcached_server.url)
    keys = make_keys(3)
    store(tier, make_obj, keys, 32)
    assert items_on(memcached_server, tier.prefix) == 3
    value = raw_client(memcached_server).get(tier.name_for(keys[0]))
    header = decode_header(value[:CHUNK_HEADER_SIZE], keys[0].id)
    assert header.num_tokens == 32 and len(value) == CHUNK_HEADER_SIZE + header.payload_size
    assert value[CHUNK_HEADER_SIZE:] == content(keys[0].id, header.payload_size).tobytes()


@pytest.fixture
def count_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts the commands the tier sends to servers (each one round trip): meta commands, gets, adds."""
    calls: dict[str, int] = {}

    def counted(name: str, original):  # type: ignore[no-untyped-def]
        def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
            calls[name] = calls.get(name, 0) + 1
            return original(*args, **kwargs)

        return counting

    monkeypatch.setattr(Client, "raw_command", counted("raw_command", Client.raw_command))
    for name in ("_get_values", "_add_many"):
        monkeypatch.setattr(memcached, name, counted(name, getattr(memcached, name)))
    return calls


def test_a_prompt_is_one_round_trip_per_server(memcached_trio, make_tier, make_obj, make_keys, pool, count_calls):
    """Existence checks (meta commands, no values) and reads of a 30-chunk prompt: one command per server holding
    some of its keys; the keys are spread over all three."""
    tier = make_tier(url_of(memcached_trio))
    keys = make_keys(30)
    store(tier, make_obj, keys, 32)
    holding = [items_on(s, tier.prefix) for s in memcached_trio]
    assert sum(holding) == 30 and all(n >= 3 for n in holding), holding
    count_calls.clear()
    assert tier.contains_many(keys) == [True] * 30
    assert count_calls == {"raw_command": 3}
    objs = tier.get_many(keys, pool.allocate)
    assert count_calls == {"raw_command": 3, "_get_values": 3}
    assert all(o is not None for o in objs)
    for obj in objs:
        obj.unref()  # type: ignore[union-attr]


def test_a_batch_of_writes_is_one_round_trip_per_server(memcached_trio, make_tier, make_obj, make_keys, count_calls):
    tier = make_tier(url_of(memcached_trio))
    keys = make_keys(30)
    objs = [make_obj(k, 32) for k in keys]
    try:
        assert tier.put_many(keys, objs) == 30
        assert count_calls == {"_add_many": 3}
        assert tier.put_many(keys, objs) == 0  # already there: not stored twice
        assert tier.contains_many(keys) == [True] * 30
    finally:
        for obj in objs:
            obj.unref()


def test_removing_a_server_moves_only_its_keys(memcached_trio, metrics) -> None:
    """Rendezvous hashing: with one server of three gone from the list, the others keep every key they had."""
    three = create_memcached_tier(url_of(memcached_trio), config(url_of(memcached_trio)), metrics)
    two = create_memcached_tier(url_of(memcached_trio[:2]), config(url_of(memcached_trio[:2])), metrics)
    names = [f"k/{i}" for i in range(300)]
    before = [three.store.server_for(n).label for n in names]
    after = [two.store.server_for(n).label for n in names]
    gone = f"127.0.0.1:{memcached_trio[2].port}"
    assert all(b == a for b, a in zip(before, after, strict=True) if b != gone)
    assert 60 < before.count(gone) < 140  # about a third
    three.close()
    two.close()


def test_chunks_above_the_item_limit_are_not_stored(make_obj, make_keys, pool, metrics, caplog) -> None:
    """On a server started without -I (1 MiB items), a 2 MiB chunk is not stored: counted, warned about once
    with the setting to change, a miss on read; small chunks still are."""
    memcached_servers.require_memcached()
    server = MemcachedServer(None, 64, "1m").start()
    try:
        tier = create_memcached_tier(server.url, config(server.url), metrics)
        big, small = make_keys(2)
        with caplog.at_level(logging.WARNING, logger="kvtier"):
            for _ in range(2):
                obj = make_obj(big, 16384)  # 16384 tokens x 128 bytes = 2 MiB
                assert not tier.put(big, obj)
                obj.unref()
        assert [r.message for r in caplog.records if "-I" in r.message] and len(caplog.records) == 1
        assert metrics.errors.value(tier="memcached", kind="too_large") == 2
        assert tier.get(big, pool.allocate) is None
        store(tier, make_obj, [small], 32)
        assert read(tier, small, pool.allocate) is not None
        assert tier.breaker.state == "closed"
        tier.close()
    finally:
        server.stop()


def test_a_full_server_that_does_not_evict_refuses_writes(make_obj, make_keys, pool, metrics) -> None:
    """memcached -M answers out of memory: the write is not stored (counted), the tier stays up and serves
    what it holds."""
    memcached_servers.require_memcached()
    server = MemcachedServer(None, 8, "1m", "-M").start()
    try:
        tier = create_memcached_tier(server.url, config(server.url), metrics)
        keys = make_keys(200)
        stored = [tier.put(k, o) for k, o in _objs(make_obj, keys, 2048)]  # 256 KiB each, 50 MiB in all
        assert stored[0] and not all(stored)
        assert metrics.errors.value(tier="memcached", kind="refused") > 0
        assert tier.breaker.state == "closed"
        assert read(tier, keys[0], pool.allocate) is not None
        tier.close()
    finally:
        server.stop()


def test_an_evicting_server_loses_chunks_to_misses_never_to_wrong_kv(make_obj, make_keys, pool, content, metrics):
    memcached_servers.require_memcached()
    server = MemcachedServer(None, 8, "1m").start()
    try:
        tier = create_memcached_tier(server.url, config(server.url), metrics)
        keys = make_keys(200)
        assert all(tier.put(k, o) for k, o in _objs(make_obj, keys, 2048))  # 50 MiB into 8 MiB
        assert 0 < count_held(tier, keys, pool.allocate, content) < 100
        assert metrics.errors.total() == 0, metrics.errors.samples()
        tier.close()
    finally:
        server.stop()


def _objs(make_obj, keys, tokens: int) -> Iterator:  # type: ignore[no-untyped-def]
    for key in keys:
        obj = make_obj(key, tokens)
        yield key, obj
        obj.unref()


def test_ttl_expires_chunks(memcached_server, make_tier, make_obj, make_keys) -> None:
    """remote_ttl_sec becomes the item's expiry (whole seconds, at least 1)."""
    tier = make_tier(memcached_server.url, remote_ttl_sec=0.3)
    (key,) = make_keys(1)
    store(tier, make_obj, [key], 32)
    assert tier.contains(key)
    deadline = time.monotonic() + 5
    while tier.contains(key) and time.monotonic() < deadline:  # memcached's clock ticks once a second
        time.sleep(0.2)
    assert not tier.contains(key)


# -- faults --------------------------------------------------------------------------------------------------------


def test_hung_dead_and_restarted_server(own_memcached: MemcachedServer) -> None:
    """A hung server (SIGSTOP) makes lookups, retrieves and stores misses within the timeout, then the breakers
    serve fast misses; a dead one fails fast; restarted on its port (empty: memcached keeps nothing) it takes
    stores and serves hits again after the cool-down, with the same engine."""
    with fault_engine(own_memcached.url) as engine:
        errors = engine.metrics.errors
        tokens, kv = store_and_read_back(engine, "memcached")

        own_memcached.pause()
        started = time.monotonic()
        for _ in range(5):
            assert engine.lookup(tokens).hit_tokens == 0, "a hit from a hung server"
            assert engine.retrieve(tokens).hit_tokens == 0, "a hit from a hung server"
        engine.store(list(range(100, 164)), kv)
        assert engine.flush(5)
        assert time.monotonic() - started < 3.0  # two timeouts open the breakers; the rest are fast
        failed = sum(errors.value(tier="memcached", kind=f"{op}_failed") for op in ("exists", "get"))
        assert failed >= 2  # lookups ask which chunks exist; retrieves read at once
        assert errors.value(tier="memcached", kind="circuit_open") >= 8

        own_memcached.stop()
        time.sleep(0.5)
        started = time.monotonic()
        assert engine.lookup(tokens).hit_tokens == 0
        assert time.monotonic() - started < 0.2  # refused at once, no timeout

        own_memcached.start()
        time.sleep(0.5)
        assert engine.lookup(tokens).hit_tokens == 0, "a restarted memcached is empty"
        assert engine.store(tokens, kv).stored_tokens == 64 and engine.flush(10)
        got = engine.retrieve(tokens)
        assert got.tier_tokens == {"memcached": 64} and same_bits(got.kv, kv)


def test_one_server_of_three_down_loses_only_its_share(make_obj, make_keys, pool, metrics) -> None:
    """With one server killed, the keys on the other two are still hits (bounded time, no exception), the dead
    one's are misses, and after the first failures it is skipped at once."""
    memcached_servers.require_memcached()
    servers = [MemcachedServer().start() for _ in range(3)]
    try:
        url = url_of(servers)
        tier = create_memcached_tier(url, config(url, remote_timeout_sec=0.5, remote_circuit_failures=1), metrics)
        keys = make_keys(30)
        store(tier, make_obj, keys, 32)
        dead = servers[1]
        on_dead = [tier.store.server_for(tier.name_for(k)).label == f"127.0.0.1:{dead.port}" for k in keys]
        dead.stop()
        for _ in range(3):
            started = time.monotonic()
            assert tier.contains_many(keys) == [not d for d in on_dead]
            objs = tier.get_many(keys, pool.allocate)
            assert [o is not None for o in objs] == [not d for d in on_dead]
            for obj in objs:
                if obj is not None:
                    obj.unref()
            assert time.monotonic() - started < 1.5
        assert tier.breaker.state == "closed"  # the tier as a whole is up
        assert metrics.errors.value(tier="memcached", kind="server_circuit_open") >= 2
        tier.close()
    finally:
        for s in servers:
            s.stop()


def _flip(offset: int) -> Callable[[bytes], bytes]:
    return lambda value: value[:offset] + bytes([value[offset] ^ 0x40]) + value[offset + 1 :]


@pytest.mark.parametrize(
    ("damage", "kind"),
    [
        (_flip(CHUNK_HEADER_SIZE + 100), "corrupt"),
        (_flip(30), "corrupt"),
        (lambda value: value[: CHUNK_HEADER_SIZE + 1000], "truncated"),
        (lambda value: b"", "truncated"),
    ],
    ids=["payload-bit", "header-field", "torn-payload", "empty"],
)
def test_damaged_value_is_a_counted_miss_and_deleted(
    memcached_server, make_tier, make_obj, make_keys, pool, metrics, damage, kind
) -> None:
    tier = make_tier(memcached_server.url)
    keys = make_keys(2)
    store(tier, make_obj, keys, 32)
    client = raw_client(memcached_server)
    name = tier.name_for(keys[0])
    client.set(name, damage(client.get(name)))
    damaged, neighbour = tier.get_many(keys, pool.allocate)
    assert damaged is None and neighbour is not None
    neighbour.unref()
    assert client.get(name) is None
    assert metrics.errors.value(tier="memcached", kind=kind) == 1
    assert metrics.errors.total() == 1
    assert pool.live_objects == 0


def test_an_engine_through_memcached_is_bit_exact(memcached_server) -> None:
    cfg = engine_config(memcached_server.url, local_cpu=False)
    tokens, kv = list(range(80)), random_kv(80)
    with CacheEngine(cfg, LAYOUT, model_name="engine") as engine:
        assert engine.store(tokens, kv).stored_tokens == 80 and engine.flush(10)
        got = engine.retrieve(tokens)
        assert got.tier_tokens == {"memcached": 80} and same_bits(got.kv, kv)
        engine.clear()


@pytest.mark.parametrize(
    "reply",
    [b"VALUE k 0 99999999999999\r\n", b"VALUE k 0 -5\r\n", b"VALUE k 0\r\n", b"SERVER_ERROR busy\r\n",
     b"VALUE k 0 4\r\nabcdXY", b"\xff" * 70000],
    ids=["huge-size", "negative-size", "short-header", "error", "no-crlf-after-value", "endless-line"],
)  # fmt: skip
def test_a_hostile_server_gives_misses_not_memory_or_exceptions(reply: bytes, metrics, make_keys, pool) -> None:
    """A "server" answering a get with nonsense: a counted failure and a miss, and no memory taken for what it
    announces."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = listener.accept()
                with conn:
                    if conn.recv(65536).startswith(b"get "):
                        conn.sendall(reply)
                        time.sleep(0.2)

    threading.Thread(target=serve, daemon=True).start()
    url = f"memcached://127.0.0.1:{listener.getsockname()[1]}"
    tier = create_memcached_tier(url, config(url, remote_timeout_sec=0.5), metrics)
    try:
        assert tier.get_many(make_keys(1), pool.allocate) == [None]
        assert metrics.errors.value(tier="memcached", kind="get_failed") == 1
        assert pool.live_objects == 0
    finally:
        tier.close()
        listener.close()
