"""Real Redis servers for tests and benchmarks: ``redis-server`` processes on free loopback ports, each in a
temporary directory, with nothing persisted unless asked (``SAVE``), and a 3-master Redis Cluster.

``redis_server`` and ``redis_cluster`` are session fixtures (one of each for the whole run); ``own_redis`` is a
server for one test that may stop, pause or restart it. Every server is stopped at the end, also when a test
fails, and is killed by the kernel if the test process dies first.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from processes import DIE_WITH_PARENT, free_ports, kill, pause, resume

START_TIMEOUT_SEC = 20.0
REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
MISSING = "redis-server/redis-cli not installed (scripts/test.sh installs the Debian packages)"


class RedisServer:
    """One ``redis-server``; ``stop`` and ``start`` again keep its port and directory (a restart)."""

    def __init__(self, root: Path, port: int | None = None, extra: tuple[str, ...] = ()) -> None:
        assert REDIS_SERVER, MISSING
        self.root = root
        self.port = port or free_ports(1)[0]
        self.extra = extra
        self.url = f"redis://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)

    def command(self) -> list[str]:
        return [
            str(REDIS_SERVER),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.root),
            "--logfile",
            str(self.root / "redis.log"),
            *self.extra,
        ]

    def start(self) -> RedisServer:
        self._proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, preexec_fn=DIE_WITH_PARENT)
        deadline = time.monotonic() + START_TIMEOUT_SEC
        with self.client(timeout=0.5) as client:
            while True:
                if self._proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self._proc.returncode}: {self.log_tail()}")
                with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                    if client.ping():
                        return self
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not answer PING within {START_TIMEOUT_SEC} s")
                time.sleep(0.02)

    def stop(self) -> None:
        """SIGKILL (also a paused server): nothing is saved, as in a crash."""
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

    def client(self, timeout: float = 5.0) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=timeout, socket_connect_timeout=timeout, protocol=2)

    def log_tail(self) -> str:
        path = self.root / "redis.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""


class RedisClusterServers:
    """A Redis Cluster of three masters (no replicas) on loopback, slots spread by ``redis-cli --cluster``."""

    def __init__(self, root: Path) -> None:
        ports = free_ports(6)  # a client port and a cluster bus port per node (the default, +10000, may not fit)
        cluster = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000")
        self.nodes = [
            RedisServer(root / f"node{i}", ports[i], (*cluster, "--cluster-port", str(ports[3 + i]))) for i in range(3)
        ]
        self.url = "redis-cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> RedisClusterServers:
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
        subprocess.run(
            [str(REDIS_CLI), "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=START_TIMEOUT_SEC,
        )
        deadline = time.monotonic() + START_TIMEOUT_SEC
        while not all(self._ok(n) for n in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not reach cluster_state:ok")
            time.sleep(0.05)
        return self

    @staticmethod
    def _ok(node: RedisServer) -> bool:
        with node.client() as client:
            return client.cluster("INFO")["cluster_state"] == "ok"  # type: ignore[no-any-return]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def require_redis() -> None:
    if not (REDIS_SERVER and REDIS_CLI):
        pytest.skip(MISSING)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    require_redis()
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    require_redis()
    cluster = RedisClusterServers(tmp_path_factory.mktemp("redis-cluster"))
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of this test's own, which it may stop, pause and restart."""
    require_redis()
    server = RedisServer(tmp_path / "redis")
    try:
        yield server.start()
    finally:
        server.stop()


class RedisSentinel(RedisServer):
    """A Sentinel watching ``master_port`` as service ``service_name`` (quorum 1)."""

    def __init__(self, root: Path, master_port: int, service_name: str) -> None:
        super().__init__(root)
        self.url = f"redis-sentinel://127.0.0.1:{self.port}/{service_name}"
        lines = [
            f"port {self.port}",
            "bind 127.0.0.1",
            f"dir {root}",
            f"logfile {root / 'redis.log'}",
            f"sentinel monitor {service_name} 127.0.0.1 {master_port} 1",
        ]
        self.config = root / "sentinel.conf"  # Sentinel rewrites its config file: it must be its own, writable
        self.config.write_text("\n".join(lines) + "\n")

    def command(self) -> list[str]:
        return [str(REDIS_SERVER), str(self.config), "--sentinel"]
