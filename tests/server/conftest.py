"""Fixtures that run real kvtier servers: in this process (fast) or as a separate `kvtier server` process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvtier import KVLayout, load_config
from kvtier.client import KVTierClient
from kvtier.server.main import Server

LAYOUT = KVLayout(2, 2, 16)
CHUNK = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(port: int, path: str, token: str | None = None, method: str = "GET") -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class ServerProcess:
    """`kvtier server` as a child process on free loopback ports."""

    def __init__(self, disk: Path, *extra: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.http_port = free_port()
        self.args = [
            sys.executable,
            "-m",
            "kvtier.cli.main",
            "server",
            "--port",
            str(self.port),
            "--http-port",
            str(self.http_port),
            "--chunk-size",
            str(CHUNK),
            "--max-local-cpu-size",
            "0.05",
            "--local-disk",
            str(disk),
            "--max-local-disk-size",
            "0.1",
            *extra,
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.log = disk.parent / f"server-{self.port}-{time.monotonic_ns()}.log"
        self._log_file = open(self.log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.args, stdout=self._log_file, stderr=subprocess.STDOUT, env=env)
        self._wait_healthy()

    def _wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log.read_text()}")
            try:
                if http_get(self.http_port, "/healthcheck")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not healthy after {timeout} s: {self.log.read_text()}")

    def status(self) -> dict:
        return json.loads(http_get(self.http_port, "/status")[1])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()
        return self.proc.returncode


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


class InProcessServer:
    def __init__(self, disk: Path, **overrides: object) -> None:
        self.port, self.http_port = free_port(), free_port()
        config = load_config(
            env={},
            overrides={
                "port": self.port,
                "http_port": self.http_port,
                "chunk_size": CHUNK,
                "max_local_cpu_size": 0.05,
                "local_disk": str(disk),
                "max_local_disk_size": 0.1,
                **overrides,
            },
        )
        self.server = Server(config)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        assert self.server.ready.wait(10)

    def client(self, **kw: object) -> KVTierClient:
        return KVTierClient(
            f"127.0.0.1:{self.port}", model="test-model", layout=LAYOUT, chunk_size=CHUNK, **{"timeout": 5.0, **kw}
        )  # type: ignore[arg-type]

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(30)


@pytest.fixture
def inproc_server(tmp_path: Path) -> Iterator[InProcessServer]:
    server = InProcessServer(tmp_path / "disk")
    yield server
    server.stop()
