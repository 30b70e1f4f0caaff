"""A client that stalls past its lease (GC pause, swap, SIGSTOP) between taking shared memory and copying: never
wrong KV, whatever the timing. Reads: the release is not confirmed, so the copy is a miss. Writes: the memory it
reserved is not reused while it may still write there (it lives), and is taken back once it exits.
Also lookup pins (the other lease of the system) under the same stall."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from conftest import LAYOUT, InProcessServer
from kvtier.client import KVTierClient
from kvtier.protocol import Op, shared_memory_dir
from storage.processes import stopped

LEASE_SEC = 0.3


@pytest.fixture
def server(tmp_path):  # type: ignore[no-untyped-def]
    # No disk tier: a chunk lives only in memory, so freed memory is what the next store gets.
    srv = InProcessServer(tmp_path / "disk", server_lease_sec=LEASE_SEC, local_disk=None, max_local_disk_size=0)
    yield srv
    srv.stop()


def kv_of(seed: int, tokens: int = 48) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**16, LAYOUT.chunk_shape(tokens), np.uint16).view(np.float16)


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.array_equal(a.view(np.uint16), b.view(np.uint16)))


def wait_for_leases(srv: InProcessServer, count: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while len(srv.server.service.shm.leases) != count:
        assert time.monotonic() < deadline, f"leases: {len(srv.server.service.shm.leases)}, expected {count}"
        time.sleep(0.02)


def stall_first_copy(client: KVTierClient, meanwhile) -> None:  # type: ignore[no-untyped-def]
    """Make ``client``'s next shared-memory copy wait, while ``meanwhile()`` runs, until its lease expired."""
    copy = client._copy_chunks

    def stalled(pairs):  # type: ignore[no-untyped-def]
        client._copy_chunks = copy
        time.sleep(LEASE_SEC * 2)
        meanwhile()
        copy(pairs)

    client._copy_chunks = stalled  # type: ignore[method-assign]


def test_a_reader_stalled_past_its_lease_gets_a_miss_not_another_prompts_kv(server) -> None:
    p1, p2 = list(range(48)), list(range(1000, 1048))
    with server.client(shared_memory=True) as reader, server.client(shared_memory=True) as other:
        other.store(p1, kv_of(1))

        def reuse_the_memory() -> None:  # the pin expired: p1's memory is freed and another prompt takes it
            wait_for_leases(server, 0)
            other.clear()
            other.store(p2, kv_of(2))

        stall_first_copy(reader, reuse_the_memory)
        got = reader.retrieve(p1)
        assert got.hit_tokens == 0 and got.loaded_tokens == 0  # not p2's bytes reported as p1's
        again = reader.retrieve(p2)
        assert again.hit_tokens == 48 and same(again.kv, kv_of(2))


def test_a_writer_stalled_past_its_lease_never_overwrites_another_prompts_chunks(server) -> None:
    p1, p2 = list(range(48)), list(range(1000, 1048))
    with server.client(shared_memory=True) as writer, server.client(shared_memory=True) as other:
        stall_first_copy(writer, lambda: other.store(p2, kv_of(2)))
        stored = writer.store(p1, kv_of(1))
        assert stored.stored_tokens == 48  # its reservation was held, not reused: the late commit is good
        assert same(other.retrieve(p2).kv, kv_of(2))  # p2 is intact
        assert same(other.retrieve(p1).kv, kv_of(1))
    wait_for_leases(server, 0)


STALLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys, numpy as np
    from kvtier import KVLayout
    from kvtier.client import KVTierClient
    port, seed = int(sys.argv[1]), int(sys.argv[2])
    layout = KVLayout(2, 2, 16)
    kv = np.random.default_rng(seed).integers(0, 2**16, layout.chunk_shape(48), np.uint16).view(np.float16)
    client = KVTierClient(f"127.0.0.1:{port}", model="test-model", layout=layout, chunk_size=16, shared_memory=True)
    copy = client._copy_chunks
    def stop_then_copy(pairs):
        print("reserved", flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)  # stalled between STORE_RESERVE and its copy
        copy(pairs)
    client._copy_chunks = stop_then_copy
    print(client.store(list(range(48)), kv).stored_tokens, flush=True)
    """
)


def start_stalled_writer(server: InProcessServer, seed: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", STALLED_WRITER, str(server.port), str(seed)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "reserved"
    deadline = time.monotonic() + 10
    while not stopped(proc.pid):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(LEASE_SEC * 3)  # far past its lease
    return proc


def test_a_sigstopped_writer_resumes_into_memory_nobody_else_got(server) -> None:
    """A real process stopped by SIGSTOP after STORE_RESERVE; meanwhile another prompt is stored; SIGCONT."""
    proc = start_stalled_writer(server, seed=5)
    with server.client(shared_memory=True) as other:
        other.store(list(range(1000, 1048)), kv_of(6))
        os.kill(proc.pid, signal.SIGCONT)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0 and out.strip() == "48"
        assert same(other.retrieve(list(range(1000, 1048))).kv, kv_of(6))
        assert same(other.retrieve(list(range(48))).kv, kv_of(5))


def test_a_stalled_writer_that_dies_gives_its_memory_back(server) -> None:
    memory = server.server.service.storage.pool
    before = memory.used_bytes
    proc = start_stalled_writer(server, seed=7)
    assert len(server.server.service.shm.leases) == 1 and memory.used_bytes > before  # held: the writer lives
    proc.kill()
    proc.wait()
    wait_for_leases(server, 0)
    assert memory.used_bytes == before


def test_a_lookup_pin_outlived_by_a_stalled_client_is_only_a_lost_pin(tmp_path) -> None:
    """Lookup leases (pin=True) expire; a client that comes back late finds its release refused and the next
    retrieve serves the right KV (or a miss), never another prompt's."""
    srv = InProcessServer(tmp_path / "disk", pin_timeout_sec=LEASE_SEC, local_disk=None, max_local_disk_size=0)
    try:
        with srv.client() as client:
            client.store(list(range(48)), kv_of(8))
            lease = client.lookup(list(range(48)), pin=True).lease
            time.sleep(LEASE_SEC * 2)
            client.clear()
            client.store(list(range(1000, 1048)), kv_of(9))
            assert lease is not None and client.release(lease) is False
            assert client.retrieve(list(range(48))).hit_tokens == 0
            assert same(client.retrieve(list(range(1000, 1048))).kv, kv_of(9))
    finally:
        srv.stop()


def test_a_client_that_fails_between_reserve_and_commit_hands_the_reservation_back(server) -> None:
    """An error in the copy (here: the caller's KV cannot be read) abandons the reservation at once instead of
    leaving memory reserved until the process exits."""
    memory = server.server.service.storage.pool
    before = memory.used_bytes
    with server.client(shared_memory=True) as client:

        def failing(pairs):  # type: ignore[no-untyped-def]
            raise RuntimeError("copy failed")

        client._copy_chunks = failing  # type: ignore[method-assign]
        with pytest.raises(RuntimeError):
            client.store(list(range(48)), kv_of(10))
        assert len(server.server.service.shm.leases) == 0 and memory.used_bytes == before


def test_a_client_removes_its_liveness_file_when_closed(server) -> None:
    with server.client(shared_memory=True) as client:
        client.store(list(range(48)), kv_of(11))
        path = os.path.join(shared_memory_dir(), client._session.name)  # type: ignore[union-attr]
        assert os.path.exists(path)
    assert not os.path.exists(path)


def test_a_reservation_whose_reply_was_lost_is_not_held_until_the_client_exits(server) -> None:
    """The first STORE_RESERVE's reply is lost (the client timed out; the server had reserved): the client never
    learnt the offsets, so it can never write there. Its next reservation tells the server which of its earlier
    ones are finished, and the orphan is released instead of being held for as long as the writer lives."""
    pool = server.server.service.storage.pool
    with server.client(shared_memory=True) as client:
        exchange = client.connection._exchange
        lost = []

        def lose_first_reserve(message):  # type: ignore[no-untyped-def]
            reply = exchange(message)
            if message.op == Op.STORE_RESERVE and not lost:
                lost.append(reply)
                return None  # as if it timed out: the client retries
            return reply

        client.connection._exchange = lose_first_reserve  # type: ignore[method-assign]
        assert client.store(list(range(48)), kv_of(12)).stored_tokens == 48
        assert lost and len(server.server.service.shm.leases) == 1  # the orphan
        time.sleep(LEASE_SEC * 2)
        client.store(list(range(2000, 2048)), kv_of(13))
        wait_for_leases(server, 0)
        client.clear()
    assert pool.used_bytes == 0
