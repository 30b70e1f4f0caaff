"""A real Mooncake Store for tests and benchmarks: ``mooncake_master`` (with its embedded HTTP metadata server, so
no etcd) and one standalone ``mooncake_client`` contributing the pool's memory, both from the Mooncake wheel, on
free loopback ports. Their metadata and metrics ports bind every interface whatever the flags say.

``mooncake_store`` is a session fixture; ``own_mooncake`` is one for a test that may stop, pause or restart it.
Everything is stopped at the end, also when a test fails, and killed by the kernel if the test process dies.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from processes import DIE_WITH_PARENT, free_ports, kill, pause, resume

START_TIMEOUT_SEC = 30.0


def _binary(name: str) -> str | None:
    beside = Path(sys.executable).parent / name  # the virtual environment's, when PATH does not have it
    return shutil.which(name) or (str(beside) if beside.exists() else None)


MASTER = _binary("mooncake_master")
PROVIDER = _binary("mooncake_client")
MISSING = "Mooncake not installed (scripts/test.sh installs its wheel and Debian's libibverbs1)"


class MooncakeStore:
    """A master and a provider client holding ``pool_mb`` of memory. ``url`` is for kvtier (which then adds
    no memory of its own: ``global_segment_size=0``)."""

    def __init__(self, root: Path, pool_mb: int = 512, lease_ms: int = 100, client_buffer_mb: int = 128) -> None:
        assert MASTER and PROVIDER, MISSING
        self.root = root
        self.pool_mb = pool_mb
        self.lease_ms = lease_ms
        self.rpc_port, self.metadata_port, self.metrics_port, self.provider_port, self.provider_http = free_ports(5)
        self.metadata = f"http://127.0.0.1:{self.metadata_port}/metadata"
        self.url = (
            f"mooncakestore://127.0.0.1:{self.rpc_port}?metadata_server={self.metadata}"
            f"&global_segment_size=0&local_buffer_size={client_buffer_mb << 20}&protocol=tcp&local_hostname=127.0.0.1"
        )
        self._master: subprocess.Popen[bytes] | None = None
        self._provider: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)

    def start(self) -> MooncakeStore:
        self._master = self._spawn("master", [
            str(MASTER), "--rpc_address=127.0.0.1", f"--rpc_port={self.rpc_port}",
            "--enable_http_metadata_server=true", "--http_metadata_server_host=127.0.0.1",
            f"--http_metadata_server_port={self.metadata_port}", f"--metrics_port={self.metrics_port}",
            "--rpc_thread_num=2", f"--default_kv_lease_ttl={self.lease_ms}",
        ])  # fmt: skip
        self._wait_for_port(self.rpc_port, self._master)
        self._provider = self._spawn("provider", [
            str(PROVIDER), "--host=127.0.0.1", f"--port={self.provider_port}",
            f"--http_port={self.provider_http}", f"--master_server_address=127.0.0.1:{self.rpc_port}",
            f"--metadata_server={self.metadata}", f"--global_segment_size={self.pool_mb} MB",
            "--local_buffer_size=16 MB", "--protocol=tcp",
        ])  # fmt: skip
        self._wait_for_port(self.provider_port, self._provider)
        return self

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - the process writes it until it stops
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, preexec_fn=DIE_WITH_PARENT)

    def _wait_for_port(self, port: int, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + START_TIMEOUT_SEC
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"a Mooncake process exited with {proc.returncode}: {self.log_tail()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                time.sleep(0.3)  # listening; give it a moment to register
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"Mooncake did not listen on {port} within {START_TIMEOUT_SEC} s")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGKILL, as in a crash (the pool's contents are gone)."""
        for proc in (self._provider, self._master):
            kill(proc)
        self._master = self._provider = None

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in (self._master, self._provider) if p is not None]

    def pause(self) -> None:
        """SIGSTOP the master: its port still accepts connections but nothing answers."""
        pause(self._master)

    def resume(self) -> None:
        resume(self._master)

    def log_tail(self) -> str:
        return "".join(p.read_text(errors="replace")[-1500:] for p in sorted(self.root.glob("*.log")))


def require_mooncake() -> None:
    if not (MASTER and PROVIDER):
        pytest.skip(MISSING)
    try:
        import mooncake.store  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"{MISSING}: {exc}")


@pytest.fixture(scope="session")
def mooncake_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MooncakeStore]:
    require_mooncake()
    store = MooncakeStore(tmp_path_factory.mktemp("mooncake"))
    try:
        yield store.start()
    finally:
        store.stop()


@pytest.fixture
def own_mooncake(tmp_path: Path) -> Iterator[MooncakeStore]:
    require_mooncake()
    store = MooncakeStore(tmp_path / "mooncake", pool_mb=64)
    try:
        yield store.start()
    finally:
        store.stop()
