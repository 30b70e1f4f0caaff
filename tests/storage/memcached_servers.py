"""Real memcached servers for tests and benchmarks: ``memcached`` processes (Debian's package) on free loopback
ports, started with an item size limit large enough for test chunks unless a test asks for another.

``memcached_server`` is a session fixture (one for the whole run); ``own_memcached`` is a server for one test that
may stop, pause or restart it. Every server is stopped at the end, also when a test fails, and is killed by the
kernel if the test process dies first.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
from processes import DIE_WITH_PARENT, free_ports, kill, pause, resume

START_TIMEOUT_SEC = 20.0
MEMCACHED = shutil.which("memcached")
MISSING = "memcached not installed (scripts/test.sh installs the Debian package)"


class MemcachedServer:
    """One ``memcached``; ``stop`` and ``start`` again keep its port (a restart, empty: memcached keeps nothing)."""

    def __init__(self, port: int | None = None, memory_mb: int = 256, item_size: str = "16m", *extra: str) -> None:
        assert MEMCACHED, MISSING
        self.port = port or free_ports(1)[0]
        self.memory_mb = memory_mb
        self.item_size = item_size
        self.extra = extra
        self.url = f"memcached://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        return [
            str(MEMCACHED),
            "-u",
            "root",  # needed when the tests run as root; ignored otherwise
            "-l",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            "0",  # no UDP
            "-m",
            str(self.memory_mb),
            "-I",
            self.item_size,
            "-t",
            "2",
            *self.extra,
        ]

    def start(self) -> MemcachedServer:
        self._proc = subprocess.Popen(
            self.command(), stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=DIE_WITH_PARENT
        )
        deadline = time.monotonic() + START_TIMEOUT_SEC
        while not self._answers():
            if self._proc.poll() is not None:
                error = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                raise RuntimeError(f"memcached exited with {self._proc.returncode}: {error}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"memcached did not answer within {START_TIMEOUT_SEC} s")
            time.sleep(0.02)
        return self

    def _answers(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
            s.sendall(b"version\r\n")
            return s.recv(64).startswith(b"VERSION")
        return False

    def stop(self) -> None:
        """SIGKILL (also a paused server), as in a crash."""
        kill(self._proc)
        self._proc = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections but nothing answers, like a hung server."""
        pause(self._proc)

    def resume(self) -> None:
        resume(self._proc)

    def command_reply(self, command: bytes, end: bytes = b"\r\n") -> bytes:
        """One raw command on a fresh connection; the reply up to ``end``."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(command)
            reply = b""
            while not reply.endswith(end):
                reply += s.recv(1 << 20)
            return reply


def require_memcached() -> None:
    if not MEMCACHED:
        pytest.skip(MISSING)


@pytest.fixture(scope="session")
def memcached_server() -> Iterator[MemcachedServer]:
    require_memcached()
    server = MemcachedServer()
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def own_memcached() -> Iterator[MemcachedServer]:
    """A server of this test's own, which it may stop, pause and restart."""
    require_memcached()
    server = MemcachedServer()
    try:
        yield server.start()
    finally:
        server.stop()
