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
