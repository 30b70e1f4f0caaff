"""Tenant salts are secrets: the salt is all that separates one tenant's KV from another's, so no listing shows one
(``/status``, ``/quota``, the data plane's STATS, the disk tier's files). Tenants appear by an opaque id; whoever
holds a salt can ask about that tenant."""

from __future__ import annotations

import json
import os
import stat

import numpy as np

from conftest import LAYOUT, http_get
from kvtier.protocol import Message, Op, encode
from servers import http_json, raw_exchange

SECRET = "tenant-secret-Zq81"


def store_for_tenant(server) -> None:  # type: ignore[no-untyped-def]
    with server.client() as client:
        client.store(list(range(64)), np.ones(LAYOUT.chunk_shape(64), np.float16), cache_salt=SECRET)
        client.store(list(range(64)), np.ones(LAYOUT.chunk_shape(64), np.float16))  # the default tenant
        assert server.server.service.storage.flush(10)


def test_no_listing_shows_a_salt(inproc_server) -> None:
    store_for_tenant(inproc_server)
    port = inproc_server.http_port
    chunk_bytes = LAYOUT.chunk_bytes(16)
    assert http_json(port, "PUT", f"/quota/{SECRET}", {"limit_gb": 8 * chunk_bytes / 2**30})[0] == 200
    bodies = [http_get(port, path)[1] for path in ("/status", "/quota", "/metrics")]
    stats = raw_exchange(inproc_server.port, [bytes(f) for f in encode(Message(Op.STATS, 3))])
    assert stats is not None
    bodies.append(json.dumps(stats.meta).encode())
    for body in bodies:
        assert SECRET.encode() not in body
    quotas = json.loads(bodies[1])["quotas"]
    assert set(quotas) == {"_default", tenant_id(inproc_server, SECRET)}
    assert quotas[tenant_id(inproc_server, SECRET)] == {"limit_bytes": 8 * chunk_bytes, "used_bytes": 4 * chunk_bytes}


def test_the_holder_of_a_salt_can_ask_about_its_tenant(inproc_server) -> None:
    store_for_tenant(inproc_server)
    status, body = http_json(inproc_server.http_port, "GET", f"/quota/{SECRET}")
    assert status == 200
    assert body == {"tenant": tenant_id(inproc_server, SECRET), "limit_bytes": None, "used_bytes": 4 * 4096}
    assert http_json(inproc_server.http_port, "GET", "/quota/nobody")[1]["used_bytes"] == 0


def test_tenant_ids_are_keyed_not_a_plain_hash_of_the_salt(tmp_path) -> None:
    """Ids differ between servers: a listing cannot be matched against a dictionary of likely salts."""
    from conftest import InProcessServer

    a, b = InProcessServer(tmp_path / "a"), InProcessServer(tmp_path / "b")
    try:
        assert tenant_id(a, SECRET) != tenant_id(b, SECRET)
    finally:
        a.stop()
        b.stop()


def test_the_disk_tier_keeps_no_salt_and_no_file_others_can_read(inproc_server, tmp_path) -> None:
    store_for_tenant(inproc_server)
    disk = tmp_path / "disk"
    files = [p for p in disk.rglob("*") if p.is_file()]
    assert any(p.name == "namespace.json" for p in files) and any(p.suffix == ".kvt" for p in files)
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), path
        assert stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0, path
    for directory in [disk, *(p for p in disk.rglob("*") if p.is_dir())]:
        assert stat.S_IMODE(os.stat(directory).st_mode) & 0o077 == 0, directory


def test_clear_by_tenant_still_finds_the_tenants_disk_chunks(inproc_server) -> None:
    store_for_tenant(inproc_server)
    assert http_json(inproc_server.http_port, "POST", "/clear", {"cache_salt": SECRET}) == (200, {"cleared_chunks": 8})
    with inproc_server.client() as client:
        assert client.lookup(list(range(64)), cache_salt=SECRET).hit_tokens == 0
        assert client.lookup(list(range(64))).hit_tokens == 64


def tenant_id(server, salt: str) -> str:  # type: ignore[no-untyped-def]
    return server.server.service.admin.tenant_id(salt)


def test_any_salt_can_be_addressed_in_a_path(inproc_server) -> None:
    """URL-encoded, a salt may hold slashes and newlines (found by fuzzing: a newline used to give a 404)."""
    with inproc_server.client() as client:
        client.store(list(range(16)), np.ones(LAYOUT.chunk_shape(16), np.float16), cache_salt="a/b\nc")
    status, body = http_json(inproc_server.http_port, "GET", "/quota/a%2Fb%0Ac")
    assert status == 200 and body["used_bytes"] == LAYOUT.chunk_bytes(16)
