"""Fixtures that run real kvtier servers: in this process (fast) or as a separate `kvtier server` process."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvtier import KVLayout
from kvtier.client import KVTierClient
from servers import CHUNK, ServerProcess, ThreadServer, free_port, http_get

__all__ = ["CHUNK", "LAYOUT", "InProcessServer", "ServerProcess", "free_port", "http_get"]  # for the tests here

LAYOUT = KVLayout(2, 2, 16)


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator:
    """Factory for server processes; all are stopped at the end of the test."""
    started: list[ServerProcess] = []

    def start(*extra: str, disk: Path | None = None, port: int | None = None) -> ServerProcess:
        proc = ServerProcess(disk or tmp_path / "disk", *extra, port=port)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop(signal.SIGTERM)  # a clean stop removes its shared-memory pool


class InProcessServer(ThreadServer):
    """A :class:`ThreadServer` with the small budgets of the server tests, and a client for their layout."""

    def __init__(self, disk: Path, **overrides: object) -> None:
        super().__init__(disk, **{"max_local_cpu_size": 0.05, "max_local_disk_size": 0.1, **overrides})

    def client(self, **kw: object) -> KVTierClient:
        return KVTierClient(
            f"127.0.0.1:{self.port}", model="test-model", layout=LAYOUT, chunk_size=CHUNK, **{"timeout": 5.0, **kw}
        )  # type: ignore[arg-type]


@pytest.fixture
def inproc_server(tmp_path: Path) -> Iterator[InProcessServer]:
    server = InProcessServer(tmp_path / "disk")
    yield server
    server.stop()
