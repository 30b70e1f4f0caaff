"""The admin HTTP API against malformed and hostile requests, over raw sockets: every one gets a prompt 4xx with a
reason (or, for a client that goes away, nothing is done), and the server goes on serving."""

from __future__ import annotations

import json
import socket
import time

import numpy as np
import pytest

from conftest import CHUNK, LAYOUT, InProcessServer, http_get
from kvtier.protocol import layout_to_meta
from servers import http_json

NAMESPACE = {"model": "test-model", "layout": layout_to_meta(LAYOUT), "chunk_size": CHUNK}


def raw_http(port: int, request: bytes, *, half_close: bool = False, timeout: float = 5.0) -> bytes:
    """Send ``request`` as is; everything the server answers before closing (or ``timeout``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        received = b""
        try:
            sock.sendall(request)  # the server may answer (and close) before it has read everything
            if half_close:
                sock.shutdown(socket.SHUT_WR)
            while chunk := sock.recv(65536):
                received += chunk
                if b"\r\n\r\n" in received and _complete(received):
                    break
        except (TimeoutError, ConnectionResetError, BrokenPipeError):
            pass
        return received


def _complete(response: bytes) -> bool:
    head, _, body = response.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/") else 0


def post(path: str, body: bytes, *, length: int | None = None, method: str = "POST") -> bytes:
    size = len(body) if length is None else length
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {size}\r\n\r\n"
    return head.encode() + body


def stored_chunks(server: InProcessServer) -> int:
    return server.server.service.storage.memory.usage().chunks


@pytest.fixture
def server(inproc_server):  # type: ignore[no-untyped-def]
    with inproc_server.client() as client:
        client.store(list(range(64)), np.ones(LAYOUT.chunk_shape(64), np.float16))
    return inproc_server


HOSTILE_BODIES = {
    "deep nesting": b"[" * 100_000 + b"]" * 100_000,
    "deep object": b'{"cache_salt":' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    "huge integer": b'{"pin_id":' + b"9" * 5000 + b"}",
    "not JSON": b"{nope",
    "a list": b"[1, 2]",
    "invalid UTF-8": b'{"cache_salt": "\xff"}',
    "wrong type": b'{"cache_salt": 5}',
    "unknown field": b'{"cache_salt": "a", "everything": true}',
}


@pytest.mark.parametrize("path", ["/clear", "/delete", "/explain", "/lookup", "/pin", "/prefetch", "/unpin"])
@pytest.mark.parametrize("body", list(HOSTILE_BODIES.values()), ids=list(HOSTILE_BODIES))
def test_hostile_bodies_get_a_400_with_a_reason(server, path: str, body: bytes) -> None:
    response = raw_http(server.http_port, post(path, body))
    assert status_of(response) == 400, response[:300]
    assert json.loads(response.partition(b"\r\n\r\n")[2])["error"]
    assert stored_chunks(server) == 4  # nothing was cleared or deleted


@pytest.mark.parametrize("limit", ['"x"', "null", "true", "[]", "-1", "1e400", "NaN"])
def test_a_quota_that_is_not_a_number_gets_a_400(server, limit: str) -> None:
    response = raw_http(server.http_port, post("/quota/t", f'{{"limit_gb": {limit}}}'.encode(), method="PUT"))
    assert status_of(response) == 400, response[:300]


def test_a_negative_content_length_is_refused_at_once(server) -> None:
    started = time.monotonic()
    response = raw_http(server.http_port, post("/clear", b"{}", length=-1))
    assert 400 <= status_of(response) < 500 and time.monotonic() - started < 2.0
    assert stored_chunks(server) == 4


def test_a_body_cut_short_by_a_half_closed_connection_runs_nothing(server) -> None:
    raw_http(server.http_port, post("/clear", b"{}", length=100), half_close=True)
    time.sleep(0.2)
    assert stored_chunks(server) == 4  # /clear did not run on a body that never arrived
    assert http_get(server.http_port, "/healthcheck")[0] == 200


def test_a_body_that_never_arrives_gets_a_408(server, monkeypatch) -> None:
    monkeypatch.setattr("kvtier.server.http.BODY_TIMEOUT_SEC", 0.5)
    started = time.monotonic()
    response = raw_http(server.http_port, post("/clear", b"{", length=100))
    assert status_of(response) == 408 and time.monotonic() - started < 3.0
    assert stored_chunks(server) == 4


def test_a_body_over_the_limit_gets_a_413_without_being_read(server) -> None:
    started = time.monotonic()
    response = raw_http(server.http_port, post("/delete", b"{", length=1 << 40))
    assert status_of(response) == 413 and time.monotonic() - started < 2.0


def test_oversized_headers_and_garbage_requests_get_4xx(server) -> None:
    assert 400 <= status_of(raw_http(server.http_port, b"GARBAGE\r\n\r\n")) < 500
    huge = b"GET /status HTTP/1.1\r\nHost: x\r\nX-Junk: " + b"a" * 200_000 + b"\r\n\r\n"
    answer = raw_http(server.http_port, huge)  # a 400, unless the reset of the unread rest overtook it
    assert answer == b"" or 400 <= status_of(answer) < 500
    assert http_get(server.http_port, "/healthcheck")[0] == 200


def test_wrong_methods_and_paths_get_404_or_405_as_json(server) -> None:
    for method, path, code in (("GET", "/clear", 405), ("POST", "/status", 405), ("GET", "/nope", 404)):
        response = raw_http(server.http_port, f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert status_of(response) == code and json.loads(response.partition(b"\r\n\r\n")[2])["error"]


def test_valid_requests_still_work_after_the_abuse(server) -> None:
    for body in HOSTILE_BODIES.values():
        raw_http(server.http_port, post("/clear", body))
    status, pinned = http_json(server.http_port, "POST", "/pin", {**NAMESPACE, "tokens": list(range(64))})
    assert status == 200 and pinned["pinned_tokens"] == 64
    assert http_json(server.http_port, "POST", "/unpin", {"pin_id": pinned["pin_id"]}) == (200, {"unpinned": True})
    assert http_json(server.http_port, "POST", "/clear") == (200, {"cleared_chunks": 8})


def test_pins_and_quotas_are_bounded(server, monkeypatch) -> None:
    """Each pin holds memory until unpinned and each quota is an entry per tenant: both are capped, so a token
    holder's script gone wrong cannot grow them without end."""
    monkeypatch.setattr("kvtier.server.admin.MAX_ADMIN_PINS", 3)
    monkeypatch.setattr("kvtier.server.admin.MAX_QUOTAS", 2)
    prompt = {**NAMESPACE, "tokens": list(range(64))}
    pins = [http_json(server.http_port, "POST", "/pin", prompt) for _ in range(4)]
    assert [status for status, _ in pins] == [200, 200, 200, 400] and "unpin" in pins[3][1]["error"]
    assert http_json(server.http_port, "POST", "/unpin", {"pin_id": pins[0][1]["pin_id"]})[0] == 200
    assert http_json(server.http_port, "POST", "/pin", prompt)[0] == 200
    statuses = [http_json(server.http_port, "PUT", f"/quota/t{i}", {"limit_gb": 1})[0] for i in range(3)]
    assert statuses == [200, 200, 400]
    assert http_json(server.http_port, "PUT", "/quota/t0", {"limit_gb": 2})[0] == 200  # changing one is fine


def test_an_unauthenticated_client_never_makes_the_server_read_a_body(tmp_path) -> None:
    """A mutating request without the token is refused on its headers: its body (here one that never comes) is
    not waited for, read or parsed."""
    server = InProcessServer(tmp_path / "disk", server_auth_token="t0ken")
    try:
        started = time.monotonic()
        response = raw_http(server.http_port, post("/delete", b"[", length=10 << 20))
        assert status_of(response) == 401 and time.monotonic() - started < 2.0
    finally:
        server.stop()


def test_lookup_tells_a_router_how_much_of_a_prompt_is_cached_and_where(server) -> None:
    """A stored 64-token prompt: its prefix and a longer prompt starting with it hit 64 tokens in memory; another
    tenant's or another model's lookups miss; nothing is pinned by a lookup."""
    prompt = {**NAMESPACE, "tokens": list(range(64))}
    status, found = http_json(server.http_port, "POST", "/lookup", prompt)
    assert status == 200
    assert found == {"hit_tokens": 64, "total_tokens": 64, "tier_tokens": {"memory": 64}, "chunk_size": CHUNK}
    longer = {**prompt, "tokens": [*range(64), *range(1000, 1040)]}
    assert http_json(server.http_port, "POST", "/lookup", longer)[1]["hit_tokens"] == 64
    for other in ({**prompt, "cache_salt": "tenant-b"}, {**prompt, "model": "other-model"}):
        assert http_json(server.http_port, "POST", "/lookup", other)[1]["hit_tokens"] == 0
    assert server.server.service.storage.memory.usage().pinned_chunks == 0
    assert http_json(server.http_port, "POST", "/lookup", {**prompt, "tokens": [-1]})[0] == 400


def test_explain_says_where_each_chunk_is_and_why_the_others_miss(server) -> None:
    """The stored 64-token prompt extended by a partial chunk: its chunks in memory, the tail a partial chunk;
    another tenant's view of the same tokens names the other tenant only as "another tenant's" (the operator's
    endpoint); token ids and text are both accepted, one of them at a time."""
    body = {**NAMESPACE, "tokens": [*range(64), 5, 6, 7]}
    status, found = http_json(server.http_port, "POST", "/explain", body)
    assert status == 200
    assert (found["hit_tokens"], found["total_tokens"], found["chunk_size"]) == (64, 67, CHUNK)
    assert found["miss_tokens"] == {"partial_chunk": 3}
    expected = [(start, start + CHUNK, "memory", None) for start in range(0, 64, CHUNK)]
    assert [(c["start"], c["end"], c["tier"], c["reason"]) for c in found["chunks"]] == [
        *expected,
        (64, 67, None, "partial_chunk"),
    ]
    other = http_json(server.http_port, "POST", "/explain", {**body, "cache_salt": "tenant-b"})[1]
    assert other["chunks"][0]["reason"] == "other_namespace"
    assert other["chunks"][0]["detail"] == "cached under another tenant's cache_salt"
    assert http_json(server.http_port, "POST", "/explain", {**body, "text": "hello"})[0] == 400  # both
    assert http_json(server.http_port, "POST", "/explain", NAMESPACE)[0] == 400  # neither
    status, refused = http_json(server.http_port, "POST", "/explain", {**NAMESPACE, "text": "hello"})
    assert status == 400 and "send tokens" in refused["error"]  # "test-model" is no model directory


def test_recent_requests_show_hits_and_misses_by_tenant_id(server) -> None:
    lookup = {**NAMESPACE, "tokens": [*range(64), *range(500, 532)], "cache_salt": "tenant-a"}
    http_json(server.http_port, "POST", "/lookup", lookup)
    status, recent = http_json(server.http_port, "GET", "/requests?limit=2")
    assert status == 200 and len(recent["requests"]) == 2
    newest, store = recent["requests"]
    assert (newest["op"], newest["model"], newest["hit_tokens"], newest["total_tokens"]) == (
        "lookup",
        "test-model",
        0,
        96,
    )
    assert newest["miss_tokens"] == {"never_stored": 96}  # another tenant's chunks are never shown as such
    assert newest["tenant"] not in ("tenant-a", "_default") and "tenant-a" not in json.dumps(recent)
    assert (store["op"], store["stored_tokens"], store["tenant"]) == ("store", 64, "_default")
    assert http_json(server.http_port, "GET", "/requests?limit=0")[0] == 400


def test_prefetch_loads_prompts_from_disk_into_memory(server) -> None:
    """The memory tier emptied, the prompt is on disk only; /prefetch (wait) brings it back into memory; without
    wait it answers at once and the load finishes in the background."""
    server.server.service.storage.memory.clear()
    server.server.service.storage.flush(10)
    lookup = {**NAMESPACE, "tokens": list(range(64))}
    assert http_json(server.http_port, "POST", "/lookup", lookup)[1]["tier_tokens"] == {"disk": 64}
    body = {**NAMESPACE, "prompts": [list(range(64)), [7, 8, 9]], "wait": True}
    assert http_json(server.http_port, "POST", "/prefetch", body) == (200, {"prompts": 2, "loaded_tokens": [64, 0]})
    assert http_json(server.http_port, "POST", "/lookup", lookup)[1]["tier_tokens"] == {"memory": 64}
    queued = http_json(server.http_port, "POST", "/prefetch", {**body, "wait": False})
    assert queued == (200, {"prompts": 2, "loaded_tokens": None})
    for bad in ({**body, "prompts": []}, {**body, "prompts": [[-1]]}, {**body, "prompts": "x"}):
        assert http_json(server.http_port, "POST", "/prefetch", bad)[0] == 400
