"""The S3 tier against a real S3-compatible server (SeaweedFS, started once per session by ``s3_server``): the
storage contract, URL and credential handling, multipart uploads and ranged reads, and faults (a dead, hung or
restarted server; damaged objects; two engine processes sharing chunks through the bucket)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from contract import StorageTierContract, read, store
from s3_server import LIMITED_ACCESS_KEY, LIMITED_SECRET_KEY, SeaweedS3, s3_server  # noqa: F401

from kvtier import CacheEngine, KVLayout, load_config
from kvtier.codecs.chunk_format import CHUNK_HEADER_SIZE
from kvtier.config import KVTierConfig
from kvtier.errors import ConfigError, StorageError
from kvtier.memory.pool import MemoryPool
from kvtier.metrics import CacheMetrics
from kvtier.storage.registry import create_remote_tier
from kvtier.storage.remote import RemoteTier
from kvtier.storage.s3 import S3Location, S3Store, create_s3_tier, make_client, parse_s3_url

BUCKET = "kvtier-test"
MiB = 1 << 20


def s3_config(server: SeaweedS3, **overrides: Any) -> KVTierConfig:
    """Settings for ``server`` with the test identity; ``overrides`` win (None values are dropped)."""
    settings = {
        "s3_endpoint_url": server.endpoint,
        "s3_region": server.region,
        "s3_access_key_id": server.access_key,
        "s3_secret_access_key": server.secret_key,
        "remote_timeout_sec": 1.0,
        **overrides,
    }
    return load_config(env={}, overrides=settings)


def fresh_url(bucket: str = BUCKET) -> str:
    """A URL of a prefix no other test uses, so every test starts from an empty tier."""
    return f"s3://{bucket}/t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def server(s3_server: SeaweedS3) -> SeaweedS3:  # noqa: F811
    """The session server, running (a fault test that failed half-way may have left it stopped)."""
    s3_server.start()
    return s3_server


def open_tier(server: SeaweedS3, metrics: CacheMetrics, url: str | None = None, **overrides: Any) -> RemoteTier:
    return create_s3_tier(url or fresh_url(), s3_config(server, **overrides), metrics)


class TestS3TierContract(StorageTierContract):
    exact_usage = False  # a shared bucket is not counted

    @pytest.fixture
    def tier(self, server: SeaweedS3, metrics: CacheMetrics) -> Iterator[RemoteTier]:
        t = open_tier(server, metrics)
        yield t
        t.clear()
        t.close()


# -- URLs and configuration ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "bucket", "prefix"),
    [
        ("s3://kv-cache", "kv-cache", ""),
        ("s3://kv-cache/", "kv-cache", ""),
        ("s3://kv.cache-01/team/a/", "kv.cache-01", "team/a"),
        ("s3://abc//deep//", "abc", "deep"),
    ],
)
def test_parse_url(url: str, bucket: str, prefix: str) -> None:
    assert parse_s3_url(url) == S3Location(bucket, prefix)


@pytest.mark.parametrize(
    "url",
    [
        "s3://",
        "s3:///prefix",
        "s3://ab",  # too short
        "s3://" + "a" * 64,  # too long
        "s3://Upper-Case",
        "s3://under_score",
        "s3://-leading-dash",
        "s3://double..dot",
        "s3://192.168.0.1",
        "s3://key:secret@bucket",
        "s3://bucket:9000",
        "s3://bucket/prefix?region=eu-west-1",
        "s3://bucket#fragment",
    ],
)
def test_malformed_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError, match="remote_url"):
        create_remote_tier(url, load_config(env={}), CacheMetrics())


def test_access_key_without_secret_is_a_config_error() -> None:
    config = load_config(env={}, overrides={"s3_access_key_id": "AKIA-only"})
    with pytest.raises(ConfigError, match="s3_secret_access_key"):
        create_s3_tier("s3://bucket", config, CacheMetrics())


def test_registry_builds_the_tier_with_the_configured_client() -> None:
    """Endpoint, region, timeouts, pool size and retries reach the boto3 client; the URL's path and
    remote_prefix combine into the name prefix."""
    config = load_config(
        env={},
        overrides={
            "s3_endpoint_url": "http://127.0.0.1:9",
            "s3_region": "eu-west-3",
            "s3_access_key_id": "a",
            "s3_secret_access_key": "b",
            "remote_timeout_sec": 0.25,
            "remote_max_connections": 7,
            "remote_prefix": "kv/",
        },
    )
    tier = create_remote_tier("s3://my-bucket/team/a/", config, CacheMetrics())
    try:
        assert isinstance(tier, RemoteTier) and isinstance(tier.store, S3Store)
        assert (tier.name, tier.store.bucket, tier.prefix) == ("s3", "my-bucket", "team/a/kv/")
        client = tier.store.client
        assert client.meta.endpoint_url == "http://127.0.0.1:9"
        assert client.meta.region_name == "eu-west-3"
        cfg = client.meta.config
        assert (cfg.connect_timeout, cfg.read_timeout, cfg.max_pool_connections) == (0.25, 0.25, 7)
        assert cfg.retries == {"mode": "standard", "total_max_attempts": 2}
    finally:
        tier.close()


def test_ttl_is_reported_as_not_applied(caplog: pytest.LogCaptureFixture) -> None:
    config = load_config(env={}, overrides={"remote_ttl_sec": 60, "s3_endpoint_url": "http://127.0.0.1:9"})
    create_s3_tier("s3://bucket", config, CacheMetrics()).close()
    assert "lifecycle rule" in caplog.text


# -- credentials and buckets ---------------------------------------------------------------------------------


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> pytest.MonkeyPatch:  # type: ignore[no-untyped-def]
    """No AWS settings but the ones a test sets (no ~/.aws, no inherited AWS_* variables)."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return monkeypatch


def round_trip(tier: RemoteTier, make_obj, make_keys, pool: MemoryPool) -> bool:  # type: ignore[no-untyped-def]
    (key,) = make_keys(1)
    stored = tier.put(key, obj := make_obj(key))
    obj.unref()
    return stored and read(tier, key, pool.allocate) is not None


def test_endpoint_region_and_credentials_from_the_aws_environment(
    server: SeaweedS3, aws_env: pytest.MonkeyPatch, metrics, make_obj, make_keys, pool
) -> None:
    """With no s3_* keys, boto3's standard chain is used: AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID..."""
    aws_env.setenv("AWS_ENDPOINT_URL", server.endpoint)
    aws_env.setenv("AWS_REGION", server.region)
    aws_env.setenv("AWS_ACCESS_KEY_ID", server.access_key)
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", server.secret_key)
    tier = create_s3_tier(fresh_url(), load_config(env={}), metrics)
    try:
        assert round_trip(tier, make_obj, make_keys, pool)
        assert metrics.errors.total() == 0
    finally:
        tier.clear()
        tier.close()


def test_configured_credentials_win_over_the_environment(
    server: SeaweedS3, aws_env: pytest.MonkeyPatch, metrics, make_obj, make_keys, pool
) -> None:
    aws_env.setenv("AWS_ACCESS_KEY_ID", "wrong")
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    tier = open_tier(server, metrics)
    try:
        assert round_trip(tier, make_obj, make_keys, pool)
    finally:
        tier.clear()
        tier.close()


def test_wrong_credentials_are_failed_calls_not_exceptions(
    server: SeaweedS3, metrics, make_obj, make_keys, pool
) -> None:
    tier = open_tier(server, metrics, s3_access_key_id=server.access_key, s3_secret_access_key="wrong")
    (key,) = make_keys(1)
    obj = make_obj(key)
    try:
        assert tier.put(key, obj) is False
        assert tier.get(key, pool.allocate) is None
        assert metrics.errors.value(tier="s3", kind="put_failed") == 1
        assert metrics.errors.value(tier="s3", kind="get_failed") == 1
    finally:
        obj.unref()
        tier.close()


def test_missing_bucket_reads_as_empty_and_is_created_on_first_write(
    server: SeaweedS3, metrics, make_obj, make_keys, pool
) -> None:
    bucket = f"kvtier-new-{uuid.uuid4().hex[:8]}"
    tier = open_tier(server, metrics, url=f"s3://{bucket}/p")
    try:
        keys = make_keys(2)
        assert tier.contains_many(keys) == [False, False]
        assert tier.get(keys[0], pool.allocate) is None
        assert tier.clear() == 0 and not tier.delete(keys[0])
        assert metrics.errors.total() == 0  # absent, not failing: the breaker stays closed
        assert round_trip(tier, make_obj, make_keys, pool)
        server.client().head_bucket(Bucket=bucket)
    finally:
        tier.clear()
        tier.close()


def test_bucket_creation_refused_is_reported(server: SeaweedS3, metrics, make_obj, make_keys) -> None:
    """Credentials that may write objects but not create buckets: the error says what to do."""
    config = s3_config(server, s3_access_key_id=LIMITED_ACCESS_KEY, s3_secret_access_key=LIMITED_SECRET_KEY)
    store_ = S3Store(make_client(config), f"kvtier-refused-{uuid.uuid4().hex[:8]}")
    try:
        with pytest.raises(StorageError, match=r"does not exist and creating it failed.*CreateBucket"):
            store_.put("name", [b"value"], None)
    finally:
        store_.close()


# -- large objects -------------------------------------------------------------------------------------------


@pytest.fixture
def big_pool() -> Iterator[MemoryPool]:
    p = MemoryPool(64 * MiB)
    yield p
    p.close()


def count_calls(client: Any, operation: str) -> list[dict[str, Any]]:
    """Parameters of every ``operation`` call the client makes from now on."""
    calls: list[dict[str, Any]] = []
    client.meta.events.register(f"provide-client-params.s3.{operation}", lambda params, **kw: calls.append(params))
    return calls


def test_large_chunk_goes_as_multipart_and_comes_back_by_ranges(
    server: SeaweedS3, metrics, make_keys, big_pool: MemoryPool, content
) -> None:
    """A chunk of 3+ parts (5 MiB parts): uploaded as parts, read back by parallel ranged GETs, bit-exact."""
    layout = KVLayout(num_layers=4, num_kv_heads=8, head_dim=128, dtype="float16")  # 16 KiB per token
    s3 = S3Store(make_client(s3_config(server)), BUCKET, workers=8, part_size=5 * MiB)
    tier = RemoteTier("s3", s3, metrics, prefix=f"t-{uuid.uuid4().hex[:12]}")
    parts = count_calls(s3.client, "UploadPart")
    gets = count_calls(s3.client, "GetObject")
    (key,) = make_keys(1)
    obj = big_pool.allocate(layout, 700)  # 11.2 MiB + the 128-byte header: parts of 5, 5 and 1.2 MiB
    assert obj is not None
    obj.data[:] = content(key.id, obj.nbytes)
    try:
        assert tier.put(key, obj) is True
        assert tier.put(key, obj) is False  # the conditional completion refuses a second copy
        assert len(parts) == 6
        got = tier.get(key, big_pool.allocate)
        assert got is not None and got.num_tokens == 700
        np.testing.assert_array_equal(got.data, obj.data)
        got.unref()
        starts = sorted(int(g["Range"].removeprefix("bytes=").split("-")[0]) for g in gets)
        assert starts == [0, 5 * MiB, 10 * MiB]
        assert all(g.get("IfMatch") for g in gets if not g["Range"].startswith("bytes=0-"))
    finally:
        obj.unref()
        tier.clear()
        tier.close()
    assert big_pool.live_objects == 0


def test_batch_filling_every_connection_reads_whole_objects(server: SeaweedS3) -> None:
    """As many objects as connections: one plain GET each (ranges would only add requests)."""
    s3 = S3Store(make_client(s3_config(server)), BUCKET, workers=2, part_size=5 * MiB)
    gets = count_calls(s3.client, "GetObject")
    names = [f"whole-{uuid.uuid4().hex}" for _ in range(2)]
    values = [np.random.default_rng(i).integers(0, 256, 6 * MiB, dtype=np.uint8).tobytes() for i in range(2)]
    try:
        for name, value in zip(names, values, strict=True):
            assert s3.put(name, [value], None)
        assert s3.get_many([*names, "absent"]) == [*values, None]
        assert [g.get("Range") for g in gets] == [None] * 3
    finally:
        s3.delete_many(names)
        s3.close()


def test_object_deleted_between_its_ranges_is_a_miss(server: SeaweedS3, metrics) -> None:
    """Later ranges are pinned to the first one's ETag: a value is never stitched from two objects."""
    client = make_client(s3_config(server))
    s3 = S3Store(client, BUCKET, part_size=5 * MiB)
    name = f"torn-{uuid.uuid4().hex}"
    value = np.random.default_rng(1).integers(0, 256, 12 * MiB, dtype=np.uint8).tobytes()
    try:
        assert s3.put(name, [value], None)

        def delete_before_second_range(params: dict[str, Any], **kwargs: Any) -> None:
            if "If-Match" in params["headers"]:
                client.delete_object(Bucket=BUCKET, Key=name)

        client.meta.events.register("before-call.s3.GetObject", delete_before_second_range)
        assert s3.get_many([name]) == [None]
    finally:
        s3.close()


def test_server_without_conditional_writes_gets_plain_ones(server: SeaweedS3, caplog) -> None:
    """A server answering If-None-Match with 501 NotImplemented: logged once, then writes go unconditionally."""
    client = make_client(s3_config(server))
    rejected: list[str] = []

    def no_conditionals(params: dict[str, Any], model: Any, **kwargs: Any) -> Any:
        if "If-None-Match" in params["headers"]:
            rejected.append(model.name)
            error = {"Code": "NotImplemented", "Message": "conditional writes are not supported"}
            return SimpleNamespace(status_code=501), {"Error": error, "ResponseMetadata": {"HTTPStatusCode": 501}}
        return None

    client.meta.events.register("before-call.s3.PutObject", no_conditionals)
    s3 = S3Store(client, BUCKET)
    name = f"plain-{uuid.uuid4().hex}"
    try:
        assert s3.put(name, [b"one"], None) is True
        assert s3.put(name, [b"two"], None) is True  # cannot tell, overwrites (same key, same bytes in kvtier)
        assert rejected == ["PutObject"]
        assert "conditional writes" in caplog.text
        assert s3.get_many([name]) == [bytearray(b"two")]
    finally:
        s3.delete_many([name])
        s3.close()


# -- damaged objects -----------------------------------------------------------------------------------------


def _flip(offset: int):  # type: ignore[no-untyped-def]
    def damage(raw: bytes) -> bytes:
        out = bytearray(raw)
        out[offset] ^= 0x40
        return bytes(out)

    return damage


@pytest.mark.parametrize(
    ("damage", "kind"),
    [
        (_flip(CHUNK_HEADER_SIZE + 100), "corrupt"),
        (_flip(-1), "corrupt"),
        (_flip(30), "corrupt"),
        (lambda raw: raw[: CHUNK_HEADER_SIZE + 2000], "truncated"),
        (lambda raw: raw[:60], "truncated"),
        (lambda raw: b"", "truncated"),
    ],
    ids=["payload-bit", "last-byte", "header-field", "torn-payload", "torn-header", "empty"],
)
def test_damaged_object_is_a_counted_miss_and_deleted(
    server: SeaweedS3, metrics, make_obj, make_keys, pool, damage, kind
) -> None:
    tier = open_tier(server, metrics)
    client = server.client()
    try:
        keys = make_keys(2)
        store(tier, make_obj, keys, 32)
        name = tier.name_for(keys[0])
        raw = client.get_object(Bucket=BUCKET, Key=name)["Body"].read()
        client.put_object(Bucket=BUCKET, Key=name, Body=damage(raw))
        assert tier.get(keys[0], pool.allocate) is None
        assert metrics.errors.value(tier="s3", kind=kind) == 1
        assert metrics.errors.total() == 1
        assert not tier.contains(keys[0])  # deleted
        assert pool.live_objects == 0
        assert read(tier, keys[1], pool.allocate) is not None
    finally:
        tier.clear()
        tier.close()


# -- faults through the engine -------------------------------------------------------------------------------

FAULT_TIMEOUT = 0.5
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype="float16")


def engine_config(server: SeaweedS3, url: str, **overrides: Any) -> KVTierConfig:
    return s3_config(
        server,
        remote_url=url,
        chunk_size=16,
        max_local_cpu_size=0.01,
        remote_timeout_sec=FAULT_TIMEOUT,
        remote_circuit_failures=2,
        remote_circuit_cooldown_sec=0.5,
        **overrides,
    )


def kv_for(tokens: int, seed: int) -> np.ndarray:
    raw = np.random.default_rng(seed).integers(0, 2**16, LAYOUT.chunk_shape(tokens), dtype=np.uint16)
    return raw.view(np.float16)


@pytest.fixture
def engine(server: SeaweedS3) -> Iterator[CacheEngine]:
    """An engine whose prompt (64 tokens, 4 chunks) is stored in S3 only (its memory tier emptied)."""
    url = fresh_url()
    eng = CacheEngine(engine_config(server, url), LAYOUT, model_name="fault-test")
    eng.store(PROMPT, kv_for(len(PROMPT), 0))
    assert eng.flush(10)
    eng.storage.memory.clear()  # type: ignore[union-attr]
    yield eng
    server.start()
    eng.clear()
    eng.close()


PROMPT = list(range(1000, 1064))


def remote_tier(engine: CacheEngine) -> RemoteTier:
    (tier,) = [t for t in engine.storage.lower if t.name == "s3"]
    assert isinstance(tier, RemoteTier)
    return tier


def timed_lookup_and_retrieve(engine: CacheEngine) -> tuple[int, int, float]:
    started = time.perf_counter()
    hit = engine.lookup(PROMPT).hit_tokens
    loaded = engine.retrieve(PROMPT).loaded_tokens
    return hit, loaded, time.perf_counter() - started


def wait_for_hits(engine: CacheEngine, deadline_sec: float = 10.0) -> float:
    """Seconds until a lookup finds the prompt again."""
    started = time.perf_counter()
    while engine.lookup(PROMPT).hit_tokens != len(PROMPT):
        assert time.perf_counter() - started < deadline_sec, "the remote tier did not recover"
        time.sleep(0.05)
    return time.perf_counter() - started


def assert_retrieves_from_s3(engine: CacheEngine) -> None:
    """The whole prompt is read from S3, bit-exact; afterwards only S3 holds it again (no writes pending)."""
    engine.storage.memory.clear()  # type: ignore[union-attr]
    result = engine.retrieve(PROMPT)
    assert result.tier_tokens == {"s3": len(PROMPT)}
    np.testing.assert_array_equal(result.kv.view(np.uint16), kv_for(len(PROMPT), 0).view(np.uint16))
    assert engine.flush(10)  # the promotion also offers the chunks back to S3 (found present there)
    engine.storage.memory.clear()  # type: ignore[union-attr]


def test_a_retrieve_reads_at_once_without_asking_first(server: SeaweedS3, engine: CacheEngine) -> None:
    """A GET of a missing object answers as fast as a HEAD: a retrieve sends GETs only, one per chunk (and one
    for the chunk after the prompt's cached part, found missing), never HEADs."""
    tier = remote_tier(engine)
    heads, gets = count_calls(tier.store.client, "HeadObject"), count_calls(tier.store.client, "GetObject")
    longer = [*PROMPT, *range(5000, 5016)]
    result = engine.retrieve(longer)
    assert result.tier_tokens == {"s3": len(PROMPT)}
    np.testing.assert_array_equal(result.kv.view(np.uint16), kv_for(len(PROMPT), 0).view(np.uint16))
    assert heads == [] and len(gets) == len(PROMPT) // 16 + 1


@pytest.mark.slow
def test_dead_server_gives_fast_misses_and_recovery_after_restart(server: SeaweedS3, engine: CacheEngine) -> None:
    """Server killed: every lookup/retrieve is a miss well within the timeout (connections are refused), the
    circuit opens; server restarted: hits come back by themselves, in the same engine."""
    assert_retrieves_from_s3(engine)
    server.stop()
    try:
        for _ in range(4):
            hit, loaded, seconds = timed_lookup_and_retrieve(engine)
            assert (hit, loaded) == (0, 0)
            assert seconds < 2 * FAULT_TIMEOUT
        tier = remote_tier(engine)
        assert tier.breaker.state in ("open", "half-open")
        assert engine.metrics.errors.value(tier="s3", kind="circuit_open") >= 1
    finally:
        server.start()
    wait_for_hits(engine)
    assert remote_tier(engine).breaker.state == "closed"
    assert_retrieves_from_s3(engine)


@pytest.mark.slow
def test_hung_server_is_bounded_by_the_timeout(server: SeaweedS3, engine: CacheEngine) -> None:
    """Server frozen (SIGSTOP: connections open, no answers): a call waits at most timeout x attempts, then
    the open circuit answers at once; thawed, hits resume."""
    server.pause()
    try:
        durations = [timed_lookup_and_retrieve(engine) for _ in range(4)]
    finally:
        server.resume()
    assert all((hit, loaded) == (0, 0) for hit, loaded, _ in durations)
    bound = 2 * FAULT_TIMEOUT + 0.5  # two attempts, their backoff, and a loaded 2-core machine's slack
    assert max(seconds for *_, seconds in durations) < 2 * bound  # lookup and retrieve each time out once
    assert durations[-1][2] < 0.2  # circuit open: no waiting at all
    wait_for_hits(engine)
    assert_retrieves_from_s3(engine)


# -- two processes -------------------------------------------------------------------------------------------

_PROCESS = """
import json, sys
import numpy as np
from kvtier import CacheEngine, KVLayout, load_config

settings, role = json.loads(sys.argv[1]), sys.argv[2]
layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype="float16")
prompt = list(range(5000, 5000 + 96))
kv = np.random.default_rng(7).integers(0, 2**16, layout.chunk_shape(96), dtype=np.uint16).view(np.float16)
with CacheEngine(load_config(env={}, overrides=settings), layout, model_name="shared") as engine:
    if role == "store":
        engine.store(prompt, kv)
        assert engine.flush(30)
        print(json.dumps({"stored": True}))
    else:
        result = engine.retrieve(prompt)
        exact = bool(np.array_equal(result.kv.view(np.uint16), kv.view(np.uint16)))
        print(json.dumps({"tiers": result.tier_tokens, "exact": exact}))
"""


@pytest.mark.slow
def test_two_engine_processes_share_chunks_through_s3(server: SeaweedS3) -> None:
    """Process A stores (memory tier + S3, no shared disk); process B, a fresh process, retrieves bit-exact."""
    url = fresh_url()
    settings = {k: v for k, v in engine_config(server, url).to_dict().items() if k.startswith(("s3_", "remote_"))}
    settings["chunk_size"] = 16

    def run(role: str) -> dict[str, Any]:
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(_PROCESS), json.dumps(settings), role],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]

    try:
        assert run("store") == {"stored": True}
        assert run("retrieve") == {"tiers": {"s3": 96}, "exact": True}
    finally:
        create_s3_tier(url, s3_config(server), CacheMetrics()).clear()
