"""The cache server end to end: real `kvtier server` processes, real ZMQ sockets, real HTTP."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import CHUNK, LAYOUT, InProcessServer, ServerProcess, free_port, http_get
from kvtier.client import KVTierClient, ServerError, ServerUnavailable
from kvtier.protocol import Message, Op, Status, encode, layout_to_meta
from servers import http_json, raw_exchange


def kv_for(seed: int, tokens: int) -> np.ndarray:
    raw = np.random.default_rng(seed).integers(0, 2**16, LAYOUT.chunk_shape(tokens), dtype=np.uint16)
    return raw.view(np.float16)


def client_for(server, **kw) -> KVTierClient:  # type: ignore[no-untyped-def]
    return KVTierClient(
        f"127.0.0.1:{server.port}", model="test-model", layout=LAYOUT, chunk_size=CHUNK, **{"timeout": 5.0, **kw}
    )


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.array_equal(a.view(np.uint16), b.view(np.uint16)))


CLIENT_SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np
    from kvtier import KVLayout
    from kvtier.client import KVTierClient
    port, action, seed = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    layout = KVLayout(2, 2, 16)
    raw = np.random.default_rng(seed).integers(0, 2**16, layout.chunk_shape(80), dtype=np.uint16)
    kv = raw.view(np.float16)
    client = KVTierClient(f"127.0.0.1:{port}", model="test-model", layout=layout, chunk_size=16)
    tokens = list(range(seed, seed + 80))
    if action == "store":
        print(client.store(tokens, kv).stored_tokens)
    else:
        got = client.retrieve(tokens)
        print(got.hit_tokens, bool(np.array_equal(got.kv.view(np.uint16), kv.view(np.uint16))))
    """
)


def run_client(port: int, action: str, seed: int) -> str:
    result = subprocess.run(
        [sys.executable, "-c", CLIENT_SCRIPT, str(port), action, str(seed)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_two_client_processes_share_chunks(server_process) -> None:
    """One process stores; another, started afterwards, retrieves the same KV bit for bit."""
    server = server_process()
    assert run_client(server.port, "store", 7) == "80"
    assert run_client(server.port, "retrieve", 7) == "80 True"


def test_restarted_server_keeps_disk_chunks(server_process, tmp_path) -> None:
    """SIGTERM exits cleanly (code 0); a new server on the same disk directory serves the chunks from disk."""
    server = server_process()
    tokens, kv = list(range(64)), kv_for(1, 64)
    with client_for(server) as client:
        assert client.store(tokens, kv).stored_tokens == 64
    assert server.stop(signal.SIGTERM) == 0
    restarted = server_process(port=server.port)
    with client_for(restarted) as client:
        got = client.retrieve(tokens)
    assert got.hit_tokens == 64 and got.tiers == {"disk": 64} and same_bits(got.kv, kv)


def test_client_reconnects_after_a_server_restart(server_process) -> None:
    """The same client object keeps working across a restart of the server on the same port."""
    server = server_process()
    client = client_for(server, timeout=1.0, retries=5)
    first = client.ping()["server_id"]
    server.stop(signal.SIGKILL)
    restarted = server_process(port=server.port)
    assert client.ping()["server_id"] != first
    client.close()
    restarted.stop()


@pytest.mark.parametrize("shared_memory", [False, True])
def test_client_killed_mid_store_leaks_nothing(server_process, shared_memory: bool) -> None:
    """A client killed while storing (mid-send over TCP, or holding reserved shared memory) leaves no memory
    behind once its lease expires, and the server keeps serving."""
    server = server_process("--server-lease-sec", "1")
    before = server.status()["tiers"]["memory"]["used_bytes"]
    script = textwrap.dedent(
        f"""
        import numpy as np
        from kvtier import KVLayout
        from kvtier.client import KVTierClient
        layout = KVLayout(2, 2, 16)
        client = KVTierClient("127.0.0.1:{server.port}", model="test-model", layout=layout, chunk_size=16,
                              shared_memory={shared_memory})
        kv = np.ones(layout.chunk_shape(40000), np.float16)
        for seed in range(1000):
            client.store(list(range(seed * 10**6, seed * 10**6 + 40000)), kv)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    time.sleep(2.0)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 15  # the lease (1 s) expires, then its reserved memory is taken back
    while server.status()["shared_memory"]["leases"] and time.monotonic() < deadline:
        time.sleep(0.2)
    with client_for(server, timeout=60) as client:  # clear first lets queued disk writes land
        client.clear()
        assert server.status()["tiers"]["memory"]["used_bytes"] == before == 0
        assert server.status()["shared_memory"]["leases"] == 0
        assert client.store(list(range(32)), kv_for(2, 32)).stored_tokens == 32


def test_auth_is_required_on_data_plane_and_mutating_admin(server_process) -> None:
    server = server_process("--server-auth-token", "s3cret")
    with client_for(server) as anonymous, pytest.raises(ServerError) as info:
        anonymous.ping()
    assert info.value.status == Status.UNAUTHORIZED
    with client_for(server, auth_token="wrong") as wrong, pytest.raises(ServerError):
        wrong.lookup([1, 2, 3])
    with client_for(server, auth_token="s3cret") as client:
        assert client.store(list(range(16)), kv_for(3, 16)).stored_tokens == 16
    assert http_get(server.http_port, "/clear", method="POST")[0] == 401
    assert http_get(server.http_port, "/clear", token="nope", method="POST")[0] == 401
    assert http_get(server.http_port, "/clear", token="s3cret", method="POST")[0] == 200
    assert http_get(server.http_port, "/metrics")[0] == 200  # reading stays open


@pytest.mark.parametrize("shared_memory", [False, True])
def test_round_trip_over_tcp_and_shared_memory(inproc_server, shared_memory: bool) -> None:
    """Store and retrieve give the same bits whichever transport carries the KV; outputs can be preallocated."""
    tokens, kv = list(range(1000, 1090)), kv_for(8, 90)
    with inproc_server.client(shared_memory=shared_memory) as client:
        stored = client.store(tokens, kv)
        assert (stored.stored_tokens, stored.skipped_tokens) == (80, 10)
        assert client.store(tokens, kv).stored_tokens == 0
        got = client.retrieve(tokens)
        assert got.hit_tokens == 80 and same_bits(got.kv, kv[:, :, :80])
        out = np.zeros_like(kv)
        assert client.retrieve(tokens, out=out).kv is out and same_bits(out[:, :, :80], kv[:, :, :80])
        partial = client.retrieve(tokens, skip_tokens=32)
        assert partial.hit_tokens == 80 and partial.loaded_tokens == 48
    status = inproc_server.server.service.status()
    assert status["shared_memory"]["leases"] == 0


def test_tenants_never_see_each_others_chunks(inproc_server) -> None:
    tokens, kv = list(range(48)), kv_for(4, 48)
    with inproc_server.client() as client:
        client.store(tokens, kv, cache_salt="tenant-a")
        assert client.lookup(tokens, cache_salt="tenant-b").hit_tokens == 0
        assert client.retrieve(tokens, cache_salt="tenant-b").hit_tokens == 0
        assert client.lookup(tokens).hit_tokens == 0
        got = client.retrieve(tokens, cache_salt="tenant-a")
        assert got.hit_tokens == 48 and same_bits(got.kv, kv)


def test_lookup_lease_release_and_prefetch_and_delete(inproc_server) -> None:
    tokens = list(range(40))
    with inproc_server.client() as client:
        client.store(tokens, kv_for(5, 40))
        found = client.lookup(tokens, pin=True)
        assert found.hit_tokens == 32 and found.lease is not None
        assert client.release(found.lease) and not client.release(found.lease)
        client.prefetch(tokens)
        assert client.delete(tokens) == 2
        assert client.lookup(tokens).hit_tokens == 0


def test_metrics_parse_with_prometheus_parser_after_traffic(inproc_server) -> None:
    with inproc_server.client() as client:
        client.store(list(range(32)), kv_for(6, 32))
        client.retrieve(list(range(32)))
        client.lookup(list(range(32)))
    status, body = http_get(inproc_server.http_port, "/metrics")
    names = {f.name for f in text_string_to_metric_families(body.decode())}
    for needed in (
        "kvtier_lookup_requests",
        "kvtier_lookup_hit_tokens",
        "kvtier_retrieve_hit_tokens",
        "kvtier_stored_tokens",
        "kvtier_tier_read_bytes",
        "kvtier_tier_write_bytes",
        "kvtier_tier_write_seconds",
        "kvtier_retrieve_seconds",
        "kvtier_evictions",
        "kvtier_tier_used_bytes",
        "kvtier_tier_capacity_bytes",
        "kvtier_errors",
        "kvtier_server_requests",
        "kvtier_server_connected_clients",
        "kvtier_server_request_seconds",
    ):
        assert needed in names, needed
    assert status == 200
    assert http_get(inproc_server.http_port, "/openapi.json")[0] == 200
    assert http_get(inproc_server.http_port, "/nope")[0] == 404


def namespace_meta() -> dict:
    return {"model": "test-model", "layout": layout_to_meta(LAYOUT), "chunk_size": CHUNK}


@pytest.mark.parametrize(
    ("frames", "status"),
    [
        ([b"garbage"], Status.BAD_REQUEST),
        ([b"x" * 32, b"{}"], Status.BAD_REQUEST),
        ([bytes(encode(Message(Op.PING, 1))[0])[:-1], b"{}"], Status.BAD_REQUEST),
    ],
)
def test_malformed_frames_get_an_error_reply(inproc_server, frames, status) -> None:
    reply = raw_exchange(inproc_server.port, frames)
    assert reply is not None and reply.status == status
    with inproc_server.client() as client:
        assert client.ping()["chunk_size"] == CHUNK


def test_wrong_version_unknown_op_and_bad_payloads(inproc_server) -> None:
    port = inproc_server.port
    head, meta = encode(Message(Op.PING, 9))
    wrong_version = bytearray(bytes(head))
    wrong_version[4] = 99
    import zlib

    wrong_version[-4:] = zlib.crc32(bytes(wrong_version[:-4])).to_bytes(4, "little")
    assert raw_exchange(port, [bytes(wrong_version), bytes(meta)]).status == Status.UNSUPPORTED_VERSION
    assert raw_exchange(port, [bytes(f) for f in encode(Message(77, 3))]).status == Status.UNKNOWN_OP
    cases = [
        (Op.STORE, {**namespace_meta()}, [np.arange(16, dtype="<u4").tobytes(), b"short"]),
        (Op.LOOKUP, {**namespace_meta()}, [b"abc"]),
        (Op.LOOKUP, {"model": 5, "layout": layout_to_meta(LAYOUT)}, [b""]),
        (Op.LOOKUP, {**namespace_meta(), "layout": {"num_layers": -1}}, [b""]),
        (Op.LOOKUP, {**namespace_meta(), "chunk_size": 7}, [b""]),
        (Op.LOOKUP, {**namespace_meta(), "rank": 3}, [b""]),
        (Op.RETRIEVE, {**namespace_meta(), "skip_tokens": 5}, [np.arange(32, dtype="<u4").tobytes()]),
        (Op.RELEASE, {**namespace_meta(), "lease": "x"}, []),
    ]
    for op, meta_dict, payload in cases:
        reply = raw_exchange(port, [bytes(f) for f in encode(Message(op, 5, meta_dict, payload))])
        assert reply is not None and reply.status == Status.BAD_REQUEST, (op, meta_dict, reply)
    with inproc_server.client() as client:
        assert client.ping()["chunk_size"] == CHUNK


def test_oversize_request_is_dropped_and_server_keeps_serving(server_process) -> None:
    server = server_process("--server-max-request-mb", "1")
    tokens = list(range(1024))  # 1024 tokens x 256 B = 256 KiB... make the KV frame exceed 1 MiB
    big = np.zeros(LAYOUT.chunk_shape(8192), np.float16)
    with client_for(server, timeout=1.0, retries=0, shared_memory=False) as client, pytest.raises(ServerUnavailable):
        client.store(list(range(8192)), big)
    with client_for(server) as client:
        assert client.store(tokens, np.zeros(LAYOUT.chunk_shape(1024), np.float16)).stored_tokens == 1024


def test_deadline_and_busy_are_reported(inproc_server) -> None:
    """A request whose deadline passed before it ran is answered DEADLINE_EXCEEDED, not executed."""
    message = Message(Op.PING, 11, {}, [], timeout_ms=1)
    time.sleep(0.01)
    reply = inproc_server.server.service.handle(message, received_at=time.monotonic() - 1.0)
    assert reply.status == Status.DEADLINE_EXCEEDED


def test_unreachable_server_raises_unavailable_quickly() -> None:
    started = time.monotonic()
    client = KVTierClient(f"127.0.0.1:{free_port()}", model="m", layout=LAYOUT, timeout=0.3, retries=1)
    with client, pytest.raises(ServerUnavailable):
        client.ping()
    assert time.monotonic() - started < 3.0


def test_server_process_logs_and_exits_cleanly_on_sigint(tmp_path) -> None:
    server = ServerProcess(tmp_path / "disk")
    assert server.stop(signal.SIGINT) == 0
    assert "kvtier server stopped" in server.log.read_text()


def test_admin_clear_by_tenant_delete_pin_and_quota(inproc_server) -> None:
    """Clearing one tenant leaves the others; delete and pin act on a prompt's chunks; a tenant's quota
    evicts only its own chunks."""
    port, ns = inproc_server.http_port, {"model": "test-model", "layout": layout_to_meta(LAYOUT), "chunk_size": CHUNK}
    with inproc_server.client() as client:
        for salt in ("a", "b"):
            client.store(list(range(64)), kv_for(9, 64), cache_salt=salt)
        # 4 chunks, each in memory and on disk
        assert http_json(port, "POST", "/clear", {"cache_salt": "a"}) == (200, {"cleared_chunks": 8})
        assert client.lookup(list(range(64)), cache_salt="a").hit_tokens == 0
        assert client.lookup(list(range(64)), cache_salt="b").hit_tokens == 64

        status, pinned = http_json(port, "POST", "/pin", {**ns, "tokens": list(range(64)), "cache_salt": "b"})
        assert status == 200 and pinned["pinned_tokens"] == 64
        assert inproc_server.server.service.storage.memory.usage().pinned_chunks == 4
        assert http_json(port, "POST", "/unpin", {"pin_id": pinned["pin_id"]}) == (200, {"unpinned": True})
        assert http_json(port, "POST", "/delete", {**ns, "tokens": list(range(64)), "cache_salt": "b"})[1] == {
            "deleted_chunks": 4
        }

        chunk_bytes = LAYOUT.chunk_bytes(CHUNK)
        status, body = http_json(port, "PUT", "/quota/q", {"limit_gb": 3 * chunk_bytes / 2**30})
        q = inproc_server.server.service.admin.tenant_id("q")
        assert status == 200 and body["quotas"][q]["limit_bytes"] == 3 * chunk_bytes
        client.store(list(range(100, 164)), kv_for(10, 64))  # another tenant, untouched by q's quota
        client.store(list(range(64)), kv_for(11, 64), cache_salt="q")  # 4 chunks, quota 3: its own tail goes
        quotas = http_json(port, "GET", "/quota")[1]["quotas"]
        assert quotas[q]["used_bytes"] <= 3 * chunk_bytes and quotas["_default"]["used_bytes"] == 4 * chunk_bytes
        assert client.lookup(list(range(100, 164))).hit_tokens == 64
        assert http_json(port, "DELETE", "/quota/q")[0] == 200
    assert http_json(port, "POST", "/pin", {"tokens": "x"})[0] == 400
    assert http_json(port, "PUT", "/quota/q", {"limit_gb": -1})[0] == 400
    assert http_json(port, "POST", "/nope")[0] == 404


def test_a_flood_of_clients_gets_backpressure_not_failures(tmp_path) -> None:
    """With one worker and room for one request in flight, 12 concurrent clients are told BUSY, back off and
    retry, and every store and retrieve still completes correctly."""
    import threading

    server = InProcessServer(tmp_path / "disk", server_workers=1, server_max_inflight=1)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            with server.client(retries=20, shared_memory=False) as client:
                tokens, kv = list(range(i * 100, i * 100 + 48)), kv_for(i, 48)
                for _ in range(5):
                    client.store(tokens, kv)
                    assert same_bits(client.retrieve(tokens).kv, kv)
        except BaseException as exc:  # collected and re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    busy = server.server.service.server_metrics.requests
    server.stop()
    assert not errors, errors[:3]
    assert sum(busy.value(op=op, status="BUSY") for op in ("STORE", "RETRIEVE")) > 0


def test_pools_and_writer_files_left_by_dead_processes_are_removed(tmp_path) -> None:
    """A server killed without cleaning up leaves its shared-memory file, a client its liveness file; the next
    server start deletes both, and nothing of a live server or client."""
    import fcntl
    import os

    from kvtier.server.shared_memory import remove_stale_files

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"kvtier-{dead.pid}-{'a' * 32}"
    alive = tmp_path / f"kvtier-{os.getpid()}-{'d' * 32}"
    other = tmp_path / "kvtier-notapid-x"
    dead_writer = tmp_path / f"kvtier-client-{dead.pid}-{'b' * 32}"
    live_writer = tmp_path / f"kvtier-client-{os.getpid()}-{'c' * 32}"
    for path in (stale, alive, other, dead_writer, live_writer):
        path.write_bytes(b"x")
    with open(live_writer) as held:
        fcntl.flock(held, fcntl.LOCK_SH)
        assert remove_stale_files(str(tmp_path)) == 2
    assert not stale.exists() and not dead_writer.exists()
    assert alive.exists() and other.exists() and live_writer.exists()


def test_replies_stay_within_the_message_limit(tmp_path) -> None:
    """A retrieve over TCP of a prefix larger than server_max_request_mb comes back as the longest prefix that
    fits, and a key-level read answers keys past the limit as misses: no reply is built bigger than a request
    may be (it used to be the whole cached prefix, whatever its size)."""
    from conftest import InProcessServer
    from kvtier.client.client import Connection

    server = InProcessServer(tmp_path / "disk", server_max_request_mb=1)
    tokens, kv = list(range(8192)), kv_for(21, 8192)  # 2 MiB of KV, 512 chunks
    try:
        with server.client(shared_memory=True) as writer:  # a store this size over TCP would exceed the limit
            assert writer.store(tokens, kv).stored_tokens == 8192
        with server.client(shared_memory=False, timeout=30) as client:
            got = client.retrieve(tokens)
            assert got.hit_tokens == 4096 and same_bits(got.kv, kv[:, :, :4096])  # 1 MiB of it
            assert client.retrieve(tokens, skip_tokens=4096).hit_tokens == 0  # skip beyond what fits
        keys = [k.to_str() for k in server.server.service.storage.memory.keys()]  # noqa: SIM118 (a method)
        connection = Connection(server.url, timeout=30)
        values = connection.get_keys(keys[:512])
        connection.close()
        found = [v for v in values if v is not None]
        assert 0 < len(found) < 512 and sum(len(v) for v in found) <= (1 << 20) + 4096 + 128
    finally:
        server.stop()


@pytest.mark.parametrize("shared_memory", [False, True])
def test_segments_through_the_server(inproc_server, shared_memory: bool) -> None:
    """A segment stored by one client (40 tokens: two full chunks and a partial one) is retrieved whole, bit for
    bit, by another, over TCP and through shared memory; it is no prefix hit."""
    segment, kv = list(range(7000, 7040)), kv_for(31, 40)
    with inproc_server.client(shared_memory=shared_memory) as a, inproc_server.client(shared_memory=shared_memory) as b:
        assert a.store(segment, kv, segment=True).stored_tokens == 40
        assert b.lookup(segment, segment=True).hit_tokens == 40 and b.lookup(segment).hit_tokens == 0
        got = b.retrieve(segment, segment=True)
        assert got.hit_tokens == 40 and same_bits(got.kv, kv)
        metrics = inproc_server.server.service.metrics
        assert metrics.segment_stored_tokens.total() == 40 and metrics.segment_retrieved_tokens.total() == 40
        assert "kvtier_segment_retrieved_tokens_total 40" in http_get(inproc_server.http_port, "/metrics")[1].decode()
        assert b.delete(segment, segment=True) == 3


def test_a_server_without_segments_is_never_sent_one() -> None:
    """A server that predates segments would ignore the field and answer for a prompt: the client asks for the
    server's features first and refuses."""
    from servers import HostileServer, scripted_reply

    old = HostileServer([lambda r: [scripted_reply(r, meta={"server_id": "x", "version": "0.0", "chunk_size": 16})]])
    client = KVTierClient(f"127.0.0.1:{old.port}", model="m", layout=LAYOUT, chunk_size=CHUNK, shared_memory=False)
    with client, pytest.raises(ServerError, match="segments"):
        client.lookup(list(range(16)), segment=True)
    old.close()


def test_a_model_not_gated_for_the_servers_lossy_codec_gets_a_clear_error(tmp_path) -> None:
    """The server's disk codec is lossy: a model with a passing gate record is served, one without gets an error
    naming the gate (never approximate KV it was not measured for), and the server goes on serving."""
    from kvtier.codecs.gate import GateRecord, save_record

    gates = tmp_path / "gates.json"
    save_record(gates, GateRecord("test-model", "int8", 1, "float16", 3, 16, 0.0, 0.0, 1.0, 1.0, 1.9))
    server = InProcessServer(tmp_path / "disk", local_disk_serde="int8", codec_gate_file=str(gates))
    tokens, kv = list(range(32)), kv_for(6, 32)
    try:
        with server.client() as client:
            assert client.store(tokens, kv).stored_tokens == 32
        with KVTierClient(f"127.0.0.1:{server.port}", model="other-model", layout=LAYOUT, chunk_size=CHUNK,
                          timeout=5.0) as other, pytest.raises(ServerError, match="never measured"):  # fmt: skip
            other.store(tokens, kv)
        with server.client() as client:
            assert client.retrieve(tokens).hit_tokens == 32
    finally:
        server.stop()


def test_tcp_replies_from_reused_buffers_stay_bit_exact(inproc_server) -> None:
    """Retrieve replies go out of buffers the server reuses once ZMQ has sent them: two prompts of the same size,
    read back in turn by two clients (one keeping its replies alive), always come back as stored."""
    prompts = [(list(range(i * 1000, i * 1000 + 64)), kv_for(10 + i, 64)) for i in range(2)]
    with inproc_server.client(shared_memory=False) as first, inproc_server.client(shared_memory=False) as second:
        for tokens, kv in prompts:
            first.store(tokens, kv)
        kept = []
        for rep in range(6):
            for client, (tokens, kv) in zip((first, second), prompts[rep % 2 :] + prompts[: rep % 2], strict=True):
                got = client.retrieve(tokens)
                assert got.hit_tokens == 64 and same_bits(got.kv, kv)
                if client is first:
                    kept.append((got.kv, kv))  # views of received messages, held while later replies go out
        assert all(same_bits(view, kv) for view, kv in kept)
