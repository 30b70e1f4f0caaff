"""The Redis/Valkey tier against real redis-server processes: the storage contract on a standalone server and on
a 3-master cluster; URL parsing; one round trip per prompt; TTL; AUTH/ACL, TLS and Sentinel; faults (a hung, dead
and restarted server, damaged values); two processes sharing KV; admission after N hits."""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
import redis_servers
import remote_helpers
from contract import StorageTierContract, read, store
from processes import free_ports
from redis_servers import RedisClusterServers, RedisSentinel, RedisServer
from remote_helpers import (
    CHUNK,
    LAYOUT,
    config,
    engine_config,
    engine_process,
    fault_engine,
    random_kv,
    same_bits,
    store_and_read_back,
)

from kvtier import CacheEngine
from kvtier.codecs.chunk_format import CHUNK_HEADER_SIZE, decode_header
from kvtier.errors import ConfigError
from kvtier.memory.layout import KVLayout
from kvtier.metrics import CacheMetrics
from kvtier.storage.redis import RedisURL, parse_url
from kvtier.storage.registry import create_remote_tier
from kvtier.storage.remote import RemoteTier

# Fixtures defined with the servers, used here by name.
redis_server = redis_servers.redis_server
redis_cluster = redis_servers.redis_cluster
own_redis = redis_servers.own_redis
make_tier = remote_helpers.make_tier


def names_under(server: RedisServer, prefix: str) -> list[bytes]:
    with server.client() as client:
        return sorted(client.scan_iter(match=f"{prefix}/*"))


# -- the storage contract ------------------------------------------------------------------------------------------


class TestRedisTier(StorageTierContract):
    exact_usage = False  # a shared store is not counted (see RemoteTier.usage)

    @pytest.fixture
    def tier(self, redis_server: RedisServer, make_tier) -> RemoteTier:
        return make_tier(redis_server.url)


class TestRedisClusterTier(StorageTierContract):
    exact_usage = False

    @pytest.fixture
    def tier(self, redis_cluster: RedisClusterServers, make_tier) -> RemoteTier:
        return make_tier(redis_cluster.url)


# -- what is stored, and how it is asked for ------------------------------------------------------------------------


def test_one_key_per_chunk_holding_header_and_payload(redis_server, make_tier, make_obj, make_keys, content) -> None:
    """Each chunk is one key ``<prefix>/<key>`` whose value is the 128-byte header followed by the payload."""
    tier = make_tier(redis_server.url)
    keys = make_keys(3)
    store(tier, make_obj, keys, 32)
    assert names_under(redis_server, tier.prefix[:-1]) == sorted(tier.name_for(k).encode() for k in keys)
    with redis_server.client() as client:
        value = client.get(tier.name_for(keys[0]))
        assert client.pttl(tier.name_for(keys[0])) == -1  # no TTL unless configured
    header = decode_header(value[:CHUNK_HEADER_SIZE], keys[0].id)
    assert header.num_tokens == 32 and len(value) == CHUNK_HEADER_SIZE + header.payload_size
    assert value[CHUNK_HEADER_SIZE:] == content(keys[0].id, header.payload_size).tobytes()


def command_calls(clients: list[redis.Redis], command: str) -> int:
    return sum(int(c.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0)) for c in clients)


@pytest.fixture
def count_sends(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the packed sends of every redis-py connection (one per pipelined batch per node)."""
    sends = [0]
    original = redis.connection.AbstractConnection.send_packed_command

    def counting(self, command, check_health=True):  # type: ignore[no-untyped-def]
        sends[0] += 1
        return original(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)
    return sends


def test_a_prompt_is_one_round_trip(redis_server, make_tier, make_obj, make_keys, pool, count_sends) -> None:
    """Existence checks and reads of a 16-chunk prompt: one send each, carrying 16 EXISTS / 16 GET commands."""
    tier = make_tier(redis_server.url)
    keys = make_keys(16)
    store(tier, make_obj, keys, 32)
    with redis_server.client() as client:
        before = command_calls([client], "exists"), command_calls([client], "get")
        count_sends[0] = 0
        assert tier.contains_many(keys) == [True] * 16
        assert count_sends[0] == 1
        objs = tier.get_many(keys, pool.allocate)
        assert count_sends[0] == 2
        after = command_calls([client], "exists"), command_calls([client], "get")
    assert (after[0] - before[0], after[1] - before[1]) == (16, 16)
    assert all(o is not None for o in objs)
    for obj in objs:
        obj.unref()  # type: ignore[union-attr]


def test_small_chunk_writes_are_one_pipeline(redis_server, make_tier, make_obj, make_keys, pool, count_sends):
    """put_many of 16 small chunks: one send of 16 SET NX; again: nothing new is stored, and still one send."""
    tier = make_tier(redis_server.url)
    keys = make_keys(16)
    objs = [make_obj(k, 32) for k in keys]
    try:
        with redis_server.client() as client:
            before = command_calls([client], "set")
            assert not tier.contains(keys[0])  # the connection is made (its handshake is sends of its own)
            count_sends[0] = 0
            assert tier.put_many(keys, objs) == 16
            assert count_sends[0] == 1
            assert tier.put_many(keys[:4], objs[:4]) == 0 and count_sends[0] == 2
            assert command_calls([client], "set") - before == 20
        assert all(read(tier, k, pool.allocate) is not None for k in keys)
    finally:
        for obj in objs:
            obj.unref()


def test_an_engine_writes_a_prompt_of_small_chunks_in_one_round_trip(redis_server, count_sends) -> None:
    cfg = engine_config(redis_server.url)
    tokens, kv = list(range(256)), random_kv(256)  # 16 chunks of 4 KiB
    with CacheEngine(cfg, LAYOUT, model_name="pipelined-writes") as engine:
        assert engine.lookup(tokens).hit_tokens == 0  # the connection is made
        count_sends[0] = 0
        engine.store(tokens, kv)
        assert engine.flush(10)
        assert count_sends[0] == 1
        engine.storage.memory.clear()
        assert engine.retrieve(tokens).tier_tokens == {"redis": 256}
        engine.clear()


def test_cluster_prompt_spans_nodes_and_is_one_send_per_node(
    redis_cluster, make_tier, make_obj, make_keys, pool, content, count_sends
) -> None:
    """A prompt's keys land on several masters; a batched read sends once to each node holding some of them."""
    tier = make_tier(redis_cluster.url)
    keys = make_keys(16)
    store(tier, make_obj, keys, 32)
    clients = [n.client() for n in redis_cluster.nodes]
    try:
        holding = [c.dbsize() > 0 for c in clients]
        assert sum(holding) >= 2, "16 keys on one node of three: the slots were not spread"
        before = command_calls(clients, "get")
        count_sends[0] = 0
        objs = tier.get_many(keys, pool.allocate)
        assert count_sends[0] == sum(holding)
        assert command_calls(clients, "get") - before == 16
    finally:
        for c in clients:
            c.close()
    for key, obj in zip(keys, objs, strict=True):
        assert obj is not None
        np.testing.assert_array_equal(obj.data, content(key.id, obj.nbytes))
        obj.unref()


def test_values_still_held_are_never_overwritten(redis_server, make_tier, make_obj, make_keys, pool) -> None:
    """Receive buffers are reused only once a value is dropped: values kept across later reads stay intact."""
    tier = make_tier(redis_server.url)
    keys = make_keys(8)
    store(tier, make_obj, keys, 32)
    names = [tier.name_for(k) for k in keys]
    held = tier.store.get_many(names[:4])
    expected = [bytes(v) for v in held]
    for _ in range(3):
        assert [bytes(v) for v in tier.store.get_many(names[4:])] != expected  # dropped at once: reused
    assert [bytes(v) for v in held] == expected


def test_ttl_expires_chunks(redis_server, make_tier, make_obj, make_keys, pool) -> None:
    """With remote_ttl_sec the key carries that TTL and the chunk is gone (a miss) after it."""
    tier = make_tier(redis_server.url, remote_ttl_sec=0.3)
    (key,) = make_keys(1)
    store(tier, make_obj, [key], 32)
    with redis_server.client() as client:
        assert 0 < client.pttl(tier.name_for(key)) <= 300
    assert tier.contains(key)
    time.sleep(0.4)
    assert not tier.contains(key)
    assert tier.get(key, pool.allocate) is None


def test_more_threads_than_connections_wait_for_one(redis_server, make_tier, make_obj, make_keys, pool, metrics):
    """16 threads over a 2-connection pool: calls wait for a free connection, none fails."""
    tier = make_tier(redis_server.url, remote_max_connections=2)
    keys = make_keys(8)
    store(tier, make_obj, keys, 32)
    found: list[int] = []

    def worker() -> None:
        for _ in range(5):
            objs = tier.get_many(keys, pool.allocate)
            found.append(sum(o is not None for o in objs))
            for obj in objs:
                if obj is not None:
                    obj.unref()

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert found == [8] * 80
    assert metrics.errors.total() == 0


# -- URLs --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:6390", RedisURL("standalone", (("127.0.0.1", 6390),), options={"ssl": False})),
        ("redis://cache", RedisURL("standalone", (("cache", 6379),), options={"ssl": False})),
        (
            "redis://kv:p%40ss%3Aw@cache:7000/3",
            RedisURL("standalone", (("cache", 7000),), "kv", "p@ss:w", 3, options={"ssl": False}),
        ),
        ("redis://:secret@cache", RedisURL("standalone", (("cache", 6379),), None, "secret", options={"ssl": False})),
        ("valkey://cache/2", RedisURL("standalone", (("cache", 6379),), db=2, options={"ssl": False})),
        ("valkeys://cache", RedisURL("standalone", (("cache", 6379),), options={"ssl": True})),
        (
            "rediss://cache:6380?ssl_ca_certs=/etc/ca.pem&ssl_cert_reqs=none&ssl_check_hostname=false",
            RedisURL(
                "standalone",
                (("cache", 6380),),
                options={
                    "ssl": True,
                    "ssl_ca_certs": "/etc/ca.pem",
                    "ssl_cert_reqs": "none",
                    "ssl_check_hostname": False,
                },
            ),
        ),
        ("redis://[::1]:7000?db=4", RedisURL("standalone", (("::1", 7000),), db=4, options={"ssl": False})),
        (
            "redis-cluster://a:7000,b:7001,c",
            RedisURL("cluster", (("a", 7000), ("b", 7001), ("c", 6379)), options={"ssl": False}),
        ),
        (
            "redis-cluster://u:pw@a:7000?ssl=true",
            RedisURL("cluster", (("a", 7000),), "u", "pw", options={"ssl": True}),
        ),
        (
            "redis-sentinel://s1:26380,s2/cache-group?db=1",
            RedisURL(
                "sentinel", (("s1", 26380), ("s2", 26379)), db=1, service_name="cache-group", options={"ssl": False}
            ),
        ),
    ],
)
def test_url_forms(url: str, expected: RedisURL) -> None:
    assert parse_url(url) == expected


def test_sentinel_service_name_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDIS_SERVICE_NAME", raising=False)
    assert parse_url("redis-sentinel://s1").service_name == "mymaster"
    monkeypatch.setenv("REDIS_SERVICE_NAME", "from-env")
    assert parse_url("redis-sentinel://s1:26379").service_name == "from-env"
    assert parse_url("redis-sentinel://s1:26379/from-path").service_name == "from-path"


@pytest.mark.parametrize(
    "url",
    [
        "redis://",
        "redis://:pw@",
        "redis://cache:port",
        "redis://cache:70000",
        "redis://cache:0",
        "redis://cache/db1",
        "redis://a:1,b:2",
        "redis://cache?bogus=1",
        "redis://cache?db=x",
        "redis://cache?ssl_ca_certs=/ca.pem",
        "rediss://cache?ssl_cert_reqs=maybe",
        "redis-cluster://a:7000/1",
        "redis-cluster://a:7000?db=2",
        "redis-cluster://a:7000,,b:7001",
        "memcached://cache",
    ],
)
def test_bad_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError, match="remote_url"):
        parse_url(url)


def test_url_errors_do_not_show_the_password() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_url("redis://kv:hunter2@cache:port")
    assert "hunter2" not in str(caught.value) and "kv:***@" in str(caught.value)


def test_every_alias_reaches_the_same_server(redis_server, metrics, make_obj, make_keys, pool) -> None:
    """redis:// and valkey:// URLs go through the registry to working tiers on the same server."""
    (key,) = make_keys(1)
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    tiers = [
        create_remote_tier(f"{scheme}://127.0.0.1:{redis_server.port}/0", config("", remote_prefix=prefix), metrics)
        for scheme in ("redis", "valkey")
    ]
    try:
        store(tiers[0], make_obj, [key], 8)
        assert read(tiers[1], key, pool.allocate) is not None
    finally:
        tiers[0].clear()
        for tier in tiers:
            tier.close()


# -- authentication, TLS, Sentinel -------------------------------------------------------------------------------


def test_acl_user_and_password(own_redis, make_tier, make_obj, make_keys, pool, metrics) -> None:
    """An ACL user with a password works; a wrong password is a counted failure (and a miss), not an exception."""
    with own_redis.client() as admin:
        admin.acl_setuser("kv", enabled=True, passwords=["+s3cret"], keys=["*"], commands=["+@all"])
    (key,) = make_keys(1)
    tier = make_tier(f"redis://kv:s3cret@127.0.0.1:{own_redis.port}")
    store(tier, make_obj, [key], 8)
    assert read(tier, key, pool.allocate) is not None
    wrong = make_tier(f"redis://kv:wrong@127.0.0.1:{own_redis.port}")
    assert wrong.contains(key) is False
    assert metrics.errors.value(tier="redis", kind="exists_failed") == 1


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A server with a TLS port (certificate for 127.0.0.1 from a throwaway CA) beside its plain one."""
    redis_servers.require_redis()
    ca, key, cert = tmp_path / "ca.pem", tmp_path / "server.key", tmp_path / "server.pem"
    ca_key, csr, san = tmp_path / "ca.key", tmp_path / "server.csr", tmp_path / "san.cnf"
    san.write_text("subjectAltName=IP:127.0.0.1\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    steps = [
        ["req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "1", "-subj", "/CN=kvtier-ca"],
        ["req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert, "-extfile", san],
    ]
    for step in steps:
        subprocess.run(["openssl", *map(str, step)], check=True, capture_output=True, timeout=30)
    tls_port = free_ports(1)[0]
    extra = ("--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key))
    server = RedisServer(tmp_path / "redis", extra=(*extra, "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"))
    try:
        server.start()
        yield tls_port, ca
    finally:
        server.stop()


def test_tls(tls_redis, make_tier, make_obj, make_keys, pool, content, metrics) -> None:
    """rediss:// with the CA verifies the server and round-trips chunks (values read off the TLS socket);
    without the CA verification fails (a counted miss); ssl_cert_reqs=none skips it."""
    tls_port, ca = tls_redis
    keys = make_keys(2)
    tier = make_tier(f"rediss://127.0.0.1:{tls_port}?ssl_ca_certs={ca}")
    store(tier, make_obj, keys[:1], 32)
    obj = make_obj(keys[1], 4096)  # 1 MiB: a value larger than one TLS record and one socket read
    assert tier.put(keys[1], obj)
    obj.unref()
    for key in keys:
        got = read(tier, key, pool.allocate)
        assert got is not None and got[1] == content(key.id, len(got[1])).tobytes()
    unverified = make_tier(f"valkeys://127.0.0.1:{tls_port}")
    assert unverified.contains(keys[0]) is False
    assert metrics.errors.value(tier="redis", kind="exists_failed") == 1
    trusting = make_tier(f"rediss://127.0.0.1:{tls_port}?ssl_cert_reqs=none")
    assert trusting.contains_many(keys) == [False, False]  # another prefix: reachable, nothing of its own


def test_sentinel_finds_the_master(own_redis, tmp_path, make_tier, make_obj, make_keys, pool) -> None:
    """redis-sentinel://host:port/service asks the Sentinel for the master and stores there."""
    sentinel = RedisSentinel(tmp_path / "sentinel", own_redis.port, "kv-cache")
    try:
        sentinel.start()
        tier = make_tier(sentinel.url)
        (key,) = make_keys(1)
        store(tier, make_obj, [key], 8)
        assert read(tier, key, pool.allocate) is not None
        assert names_under(own_redis, tier.prefix[:-1]) == [tier.name_for(key).encode()]
    finally:
        sentinel.stop()


# -- faults --------------------------------------------------------------------------------------------------------


def test_hung_dead_and_restarted_server(own_redis: RedisServer) -> None:
    """A hung server (SIGSTOP) makes lookups, retrieves and stores misses within the timeout, then the breaker
    serves fast misses; a dead one (SIGKILL) fails fast; restarted on its port (with its saved data) it serves
    hits again after the cool-down, with the same engine."""
    with fault_engine(own_redis.url) as engine:
        errors = engine.metrics.errors
        tokens, kv = store_and_read_back(engine, "redis")
        with own_redis.client() as client:
            client.save()  # the restart below loads it

        own_redis.pause()
        started = time.monotonic()
        for _ in range(5):
            assert engine.lookup(tokens).hit_tokens == 0
            assert engine.retrieve(tokens).hit_tokens == 0
        engine.store(list(range(100, 164)), kv)
        assert engine.flush(5)
        # Two timeouts open the breaker; the rest are fast (a slow machine may fit in one more probe).
        assert time.monotonic() - started < 3.0
        failed = sum(errors.value(tier="redis", kind=f"{op}_failed") for op in ("exists", "get"))
        assert failed >= 2  # lookups ask which chunks exist; retrieves read at once
        assert errors.value(tier="redis", kind="circuit_open") >= 8

        own_redis.stop()
        time.sleep(0.5)  # the cool-down: the next call probes the dead server
        started = time.monotonic()
        assert engine.lookup(tokens).hit_tokens == 0
        assert time.monotonic() - started < 0.2  # refused at once, no timeout

        own_redis.start()
        time.sleep(0.5)
        assert engine.lookup(tokens).hit_tokens == 64
        got = engine.retrieve(tokens)
        assert got.tier_tokens == {"redis": 64} and same_bits(got.kv, kv)


Damage = Callable[[redis.Redis, str], None]


def _flip(offset: int) -> Damage:
    def damage(client: redis.Redis, name: str) -> None:
        byte = client.getrange(name, offset, offset)
        client.setrange(name, offset, bytes([byte[0] ^ 0x40]))

    return damage


def _cut(length: int) -> Damage:
    def damage(client: redis.Redis, name: str) -> None:
        client.set(name, client.getrange(name, 0, length - 1) if length else b"")

    return damage


@pytest.mark.parametrize(
    ("damage", "kind"),
    [
        (_flip(CHUNK_HEADER_SIZE + 100), "corrupt"),
        (_flip(CHUNK_HEADER_SIZE + 4095), "corrupt"),  # the last payload byte
        (_flip(30), "corrupt"),  # a header field
        (_cut(CHUNK_HEADER_SIZE + 1000), "truncated"),
        (_cut(60), "truncated"),
        (_cut(0), "truncated"),
    ],
    ids=["payload-bit", "last-byte", "header-field", "torn-payload", "torn-header", "empty"],
)
def test_damaged_value_is_a_counted_miss_and_deleted(
    redis_server, make_tier, make_obj, make_keys, pool, metrics, damage, kind
) -> None:
    tier = make_tier(redis_server.url)
    keys = make_keys(2)
    store(tier, make_obj, keys, 32)
    with redis_server.client() as client:
        damage(client, tier.name_for(keys[0]))
        damaged, neighbour = tier.get_many(keys, pool.allocate)
        assert damaged is None and neighbour is not None  # its neighbour is unaffected
        neighbour.unref()
        assert not client.exists(tier.name_for(keys[0]))
    assert metrics.errors.value(tier="redis", kind=kind) == 1
    assert metrics.errors.total() == 1
    assert pool.live_objects == 0


def test_value_copied_under_another_name_is_rejected(redis_server, make_tier, make_obj, make_keys, pool, metrics):
    tier = make_tier(redis_server.url)
    a, b = make_keys(2)
    store(tier, make_obj, [a], 32)
    with redis_server.client() as client:
        client.copy(tier.name_for(a), tier.name_for(b))
    assert tier.get(b, pool.allocate) is None
    assert metrics.errors.value(tier="redis", kind="corrupt") == 1
    assert read(tier, a, pool.allocate) is not None


# -- engines -------------------------------------------------------------------------------------------------------


def test_two_processes_share_kv_through_redis(redis_server) -> None:
    """Process A stores a prompt and exits; process B (own memory, no disk) then retrieves it bit-exact."""
    prefix = f"test-{uuid.uuid4().hex[:12]}"

    def run(action: str) -> str:
        return engine_process(redis_server.url, prefix, action)

    try:
        assert run("store") == "80 True"
        assert run("retrieve") == "80 {'redis': 80} True"
    finally:
        with redis_server.client() as client:
            for name in client.scan_iter(match=f"{prefix}/*"):
                client.delete(name)


def test_a_remote_hit_is_not_written_back(redis_server) -> None:
    """Chunks read from Redis are kept in memory but not queued for Redis again (no SET, no EXISTS)."""
    cfg = engine_config(redis_server.url)
    tokens, kv = list(range(64)), random_kv(64)
    with CacheEngine(cfg, LAYOUT, model_name="no-write-back") as engine, redis_server.client() as client:
        engine.store(tokens, kv)
        assert engine.flush(10)
        engine.storage.memory.clear()
        before = command_calls([client], "set"), command_calls([client], "exists")
        got = engine.retrieve(tokens)
        assert engine.flush(10)
        assert got.tier_tokens == {"redis": 64} and same_bits(got.kv, kv)
        assert engine.lookup(tokens).tier_tokens == {"memory": 64}
        after = command_calls([client], "set"), command_calls([client], "exists")
        assert (after[0] - before[0], after[1] - before[1]) == (0, 0)  # read at once; then found in memory
        engine.clear()


def test_a_retrieve_is_one_round_trip_and_ends_at_the_first_missing_chunk(redis_server, count_sends) -> None:
    """An engine retrieve from Redis sends one pipelined GET batch (no EXISTS first); with a chunk gone from the
    middle it loads the prefix before it. With the cost model on, the tier is asked first (it needs the sizes)."""
    for cost_model, sends in ((0, 1), (1, 2)):  # 1 token/s: recomputing never pays
        cfg = engine_config(redis_server.url, local_cpu=False, recompute_tokens_per_sec=cost_model)
        tokens, kv = list(range(96)), random_kv(96)
        with CacheEngine(cfg, LAYOUT, model_name="one-trip") as engine, redis_server.client() as client:
            engine.store(tokens, kv)
            assert engine.flush(10)
            count_sends[0] = 0
            got = engine.retrieve(tokens)
            assert count_sends[0] == sends
            assert got.tier_tokens == {"redis": 96} and same_bits(got.kv, kv)
            keys = engine.chunk_keys(tokens)[1]
            client.delete(engine.storage.lower[0].name_for(keys[3]))
            got = engine.retrieve(tokens)
            assert got.tier_tokens == {"redis": 48} and same_bits(got.kv, kv[:, :, :48])
            engine.clear()


def test_admission_after_two_hits(redis_server) -> None:
    """With remote_admit_after_hits=2 a stored prompt reaches Redis only once it has been retrieved twice."""
    cfg = engine_config(redis_server.url, remote_admit_after_hits=2)
    tokens, kv = list(range(80)), random_kv(80)
    with CacheEngine(cfg, LAYOUT, model_name="admission") as engine:
        engine.store(tokens, kv)
        assert engine.flush(10) and names_under(redis_server, cfg.remote_prefix) == []
        assert engine.retrieve(tokens).hit_tokens == 80
        assert engine.flush(10) and names_under(redis_server, cfg.remote_prefix) == []
        assert engine.retrieve(tokens).hit_tokens == 80
        assert engine.flush(10)
        assert len(names_under(redis_server, cfg.remote_prefix)) == 80 // CHUNK
        engine.clear()


# -- codecs ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lossless", "int8"])
def test_encoded_chunks_through_redis(redis_server, make_tier, make_kv_obj, make_keys, pool, metrics, name) -> None:
    """``remote_serde`` encodes what goes to Redis (fewer bytes held) and decodes what comes back; a reader with
    the default codec misses a lossy chunk (counted) and does not delete it; a damaged encoded value is a
    counted miss like any other."""
    pytest.importorskip("torch")
    pytest.importorskip("blosc2")
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, dtype="bfloat16")
    tier = make_tier(redis_server.url, remote_serde=name)
    keys = make_keys(2)
    objs = [make_kv_obj(layout, 64, seed=i) for i in range(2)]
    assert tier.put_many(keys, objs) == 2
    with redis_server.client() as client:
        held = client.strlen(tier.name_for(keys[0]))
        assert held < CHUNK_HEADER_SIZE + 0.9 * objs[0].nbytes
    got = tier.get_many(keys, pool.allocate)
    for obj, back in zip(objs, got, strict=True):
        assert back is not None
        error = (back.tensor().float() - obj.tensor().float()).norm() / obj.tensor().float().norm()
        assert error == 0 if name == "lossless" else error < 0.02
        back.unref()
    exact = make_tier(redis_server.url, remote_prefix=tier.prefix[:-1])
    assert (exact.get(keys[0], pool.allocate) is None) == (name == "int8")
    assert metrics.errors.value(tier="redis", kind="codec_mismatch") == int(name == "int8")
    with redis_server.client() as client:
        assert client.exists(tier.name_for(keys[0]))
        client.setrange(tier.name_for(keys[1]), CHUNK_HEADER_SIZE + 10, b"\xff")
    assert tier.get(keys[1], pool.allocate) is None
    assert metrics.errors.value(tier="redis", kind="corrupt") == 1
    for obj in objs:
        obj.unref()


def test_a_kvtier_server_takes_raw_chunks_only() -> None:
    with pytest.raises(ConfigError, match="remote_serde"):
        create_remote_tier("kvtier://127.0.0.1:1", remote_helpers.config("kvtier://127.0.0.1:1", remote_serde="int8"),
                           CacheMetrics())  # fmt: skip


def test_an_unknown_codec_is_a_config_error(redis_server) -> None:
    with pytest.raises(ConfigError, match="unknown codec 'zfp'"):
        create_remote_tier(redis_server.url, remote_helpers.config(redis_server.url, remote_serde="zfp"),
                           CacheMetrics())  # fmt: skip
