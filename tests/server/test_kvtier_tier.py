"""A kvtier server as the remote tier of in-process engines (remote_url: kvtier://host:port)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from conftest import CHUNK, InProcessServer
from kvtier import CacheEngine, KVLayout, load_config
from kvtier.errors import ConfigError
from kvtier.metrics import CacheMetrics
from kvtier.storage.kvtier_remote import create_kvtier_tier
from kvtier.storage.remote import RemoteTier
from storage.contract import StorageTierContract


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[InProcessServer]:
    srv = InProcessServer(tmp_path_factory.mktemp("kvtier-tier") / "disk")
    yield srv
    srv.stop()


class TestKVTierServerTier(StorageTierContract):
    exact_usage = False

    @pytest.fixture
    def tier(self, server: InProcessServer, metrics: CacheMetrics) -> Iterator[RemoteTier]:
        config = load_config(env={}, overrides={"remote_timeout_sec": 5.0})
        tier = create_kvtier_tier(f"kvtier://127.0.0.1:{server.port}", config, metrics)
        tier.clear()
        yield tier
        tier.clear()
        tier.close()


def test_two_engines_share_kv_through_the_server(server: InProcessServer, tmp_path) -> None:
    """Engine A stores (written through to the server); engine B, with its own empty memory, retrieves it."""
    layout = KVLayout(2, 2, 16)
    overrides = {"chunk_size": CHUNK, "max_local_cpu_size": 0.01, "remote_url": f"kvtier://127.0.0.1:{server.port}"}
    tokens = list(range(500, 580))
    kv = np.random.default_rng(3).standard_normal(layout.chunk_shape(80)).astype(np.float16)
    with CacheEngine(load_config(env={}, overrides=overrides), layout, model_name="shared") as a:
        assert a.store(tokens, kv).stored_tokens == 80
        assert a.flush(10)
    with CacheEngine(load_config(env={}, overrides=overrides), layout, model_name="shared") as b:
        got = b.retrieve(tokens)
        assert got.hit_tokens == 80 and got.tier_tokens == {"kvtier": 80}
        assert np.array_equal(got.kv.view(np.uint16), kv.view(np.uint16))


def test_dead_server_is_a_fast_miss(tmp_path) -> None:
    from conftest import free_port

    config = load_config(
        env={},
        overrides={
            "remote_url": f"kvtier://127.0.0.1:{free_port()}",
            "remote_timeout_sec": 0.2,
            "max_local_cpu_size": 0.01,
        },
    )
    with CacheEngine(config, KVLayout(2, 2, 16), model_name="m") as engine:
        assert engine.lookup(list(range(64))).hit_tokens == 0


def test_bad_url_is_a_config_error(metrics: CacheMetrics) -> None:
    with pytest.raises(ConfigError):
        create_kvtier_tier("kvtier://nohost", load_config(env={}), metrics)


def test_chunks_stored_through_kvtier_url_belong_to_their_tenant(tmp_path) -> None:
    """Chunks an engine writes through remote_url kvtier:// carry their namespace: the server bills them to their
    tenant and clears them with it (they arrived by key alone, so both used to miss them)."""
    srv = InProcessServer(tmp_path / "server-disk")
    layout = KVLayout(2, 2, 16)
    overrides = {"chunk_size": CHUNK, "max_local_cpu_size": 0.01, "remote_url": f"kvtier://127.0.0.1:{srv.port}"}
    kv = np.ones(layout.chunk_shape(64), np.float16)
    try:
        with CacheEngine(load_config(env={}, overrides=overrides), layout, model_name="m") as engine:
            engine.store(list(range(64)), kv, cache_salt="tenant-t")
            engine.store(list(range(64)), kv)
            assert engine.flush(10)
        service = srv.server.service
        assert service.storage.flush(10)
        quotas = service.admin.quotas()
        assert quotas[service.admin.tenant_id("tenant-t")]["used_bytes"] == layout.chunk_bytes(64)
        assert quotas["_default"]["used_bytes"] == layout.chunk_bytes(64)
        assert service.admin.clear("tenant-t") == 8  # 4 chunks, each in the server's memory and on its disk
        assert service.admin.tenant_quota("tenant-t")["used_bytes"] == 0 and service.admin.clear("") == 8
    finally:
        srv.stop()


def test_put_keys_without_a_matching_namespace_is_refused(server: InProcessServer) -> None:
    """A key's namespace must be described, and must hash to the key's own namespace digest: a client cannot
    bill its chunks to another tenant."""
    from kvtier.client.calls import ServerError
    from kvtier.client.client import Connection
    from kvtier.codecs.chunk_format import make_header
    from kvtier.tokens.keys import Namespace

    layout = KVLayout(2, 2, 16)
    ns, other = Namespace("m", layout.descriptor(), cache_salt="mine"), Namespace("m", layout.descriptor())
    key = ns.key(bytes(32))
    payload = bytes(layout.chunk_bytes(16))
    value = make_header(key.id, layout, 16, payload) + payload
    connection = Connection(f"127.0.0.1:{server.port}", timeout=5.0, retries=0)
    try:
        for namespaces in ({}, {ns.digest.hex(): other.fields()}, {ns.digest.hex(): {"model_name": 3}}):
            with pytest.raises(ServerError, match="namespace"):
                connection.put_keys([key.to_str()], [value], namespaces)
        assert connection.put_keys([key.to_str()], [value], {ns.digest.hex(): ns.fields()}) == 1
    finally:
        connection.close()


def test_a_prompt_of_more_chunks_than_one_request_holds_is_found(server: InProcessServer) -> None:
    """A lookup of 1,100 chunks is split into requests whose key list fits a meta frame (at 1024 keys a batch
    was 102 KB, over the 64 KiB limit: every such lookup was a silent miss)."""
    layout = KVLayout(1, 1, 4)
    overrides = {"chunk_size": 1, "remote_url": f"kvtier://127.0.0.1:{server.port}", "max_local_cpu_size": 0.01}
    tokens = list(range(1100))
    kv = np.random.default_rng(0).standard_normal(layout.chunk_shape(1100)).astype(np.float16)
    srv_config = server.server.service.config
    assert srv_config.chunk_size == CHUNK  # the kvtier:// tier is key-level: any client chunk size works
    with CacheEngine(load_config(env={}, overrides=overrides), layout, model_name="long") as a:
        a.store(tokens, kv)
        assert a.flush(60)
    with CacheEngine(load_config(env={}, overrides=overrides), layout, model_name="long") as b:
        got = b.retrieve(tokens)
        assert got.hit_tokens == 1100 and np.array_equal(got.kv.view(np.uint16), kv.view(np.uint16))
