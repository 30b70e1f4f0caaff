"""Real kvtier servers on free loopback ports for any test that needs one: a ``kvtier server`` child process
(:class:`ServerProcess`) or a server in a thread of the test process (:class:`ThreadServer`, real ZMQ and shared
memory, faster to start). Importable as ``servers``: pytest puts ``tests/`` on ``sys.path``."""

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from kvtier.config import load_config
from kvtier.protocol import Message, Status, decode, encode
from kvtier.server.main import Server

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


def http_json(
    port: int, method: str, path: str, body: dict[str, Any] | None = None, token: str | None = None
) -> tuple[int, Any]:
    """An admin API call with a JSON body; (status, decoded JSON reply)."""
    data = json.dumps(body or {}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, method=method, headers={"Content-Type": "application/json"}
    )
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def raw_exchange(port: int, frames: list[bytes], timeout_ms: int = 3000) -> Message | None:
    """Send raw frames to a server's data plane; its decoded reply, or None if none came."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{port}")
    try:
        sock.send_multipart(frames)
        if not sock.poll(timeout_ms):
            return None
        return decode(sock.recv_multipart())
    finally:
        sock.close()


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


class ThreadServer:
    """A kvtier server in a thread of this process, with its own disk tier; ``overrides`` are config keys
    (``port`` 0 or absent: a free one)."""

    def __init__(self, disk: Path, **overrides: Any) -> None:
        values = {
            "chunk_size": CHUNK,
            "max_local_cpu_size": 0.25,
            "local_disk": str(disk),
            "max_local_disk_size": 0.5,
            **overrides,
        }
        values["port"] = values.get("port") or free_port()
        values["http_port"] = values.get("http_port") or free_port()
        config = load_config(env={}, overrides=values)
        self.port, self.http_port = config.port, config.http_port
        self.url = f"tcp://127.0.0.1:{config.port}"
        self.server = Server(config)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        assert self.server.ready.wait(10)

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(30)


Answer = Callable[[Message], list[list[bytes]]]


class HostileServer:
    """A ROUTER socket on a free port that answers each request with the frames the test scripts for it (one
    ``Answer`` per request, in order): a server that does not follow the protocol (a version skew, a bug or an
    attacker), played by the test against the real clients."""

    def __init__(self, answers: list[Answer]) -> None:
        self.port = free_port()
        self.socket = zmq.Context.instance().socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(f"tcp://127.0.0.1:{self.port}")
        self.answers = list(answers)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while self.answers and not self._stop.is_set():
            if not self.socket.poll(50):
                continue
            identity, *frames = self.socket.recv_multipart()
            for reply in self.answers.pop(0)(decode(frames)):
                self.socket.send_multipart([identity, *reply])

    def close(self) -> None:
        self._stop.set()
        self.thread.join(15)
        self.socket.close()


def scripted_reply(
    request: Message, status: Status = Status.OK, meta: dict[str, Any] | None = None, request_id: int | None = None
) -> list[bytes]:
    """A well-formed reply to ``request`` (or, with ``request_id``, addressed to another request)."""
    rid = request.request_id if request_id is None else request_id
    return [bytes(f) for f in encode(Message(request.op, rid, meta or {}, [], status))]


class HttpProcess:
    """A process serving HTTP at ``url`` (``health`` answers 200 once it serves), its output in ``log``, in a
    session of its own so that :meth:`stop` stops its children too (vLLM's engine core)."""

    def __init__(self, command: list[str], log: Path, url: str, env: dict[str, str] | None = None) -> None:
        self.log = log
        self.url = url
        with open(log, "w") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait_healthy(self, timeout: float = 900, health: str = "/health") -> HttpProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"{self.url} exited ({self.proc.returncode}):\n{self.tail()}"
            try:
                with urllib.request.urlopen(self.url + health, timeout=2) as reply:
                    if reply.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(1)
        raise AssertionError(f"{self.url} not healthy after {timeout} s:\n{self.tail()}")

    def tail(self, chars: int = 5000) -> str:
        return self.log.read_text()[-chars:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def vllm_serve(
    log: Path,
    *args: str,
    connector: dict[str, Any] | None = None,
    role: str = "kv_both",
    env: dict[str, str] | None = None,
) -> HttpProcess:
    """``vllm serve`` of the local model (SmolLM2, fp32, eager) on a free port, with kvtier's connector in ``role``
    (``connector``: its extra config) unless ``connector`` is None, and ``args``. One reserved core leaves vLLM one
    to compute on (of 2 here), whatever the connector (vLLM's CPU backend reserves a core of its own for a
    connector otherwise); ``env`` adds to the environment."""
    from kvtier.integrations.models import model_path

    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(model_path()), "--port", str(port),
               "--enforce-eager", "--dtype", "float32", *args]  # fmt: skip
    if connector is not None:
        kv_config = {"kv_connector": "KVTierConnector", "kv_connector_module_path": "kvtier.integrations.vllm",
                     "kv_role": role, "kv_connector_extra_config": connector}  # fmt: skip
        command += ["--kv-transfer-config", json.dumps(kv_config)]
    defaults = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}
    return HttpProcess(command, log, f"http://127.0.0.1:{port}", {**os.environ, **defaults, **(env or {})})


def vllm_serve_with_server(
    log: Path,
    server_port: int,
    *,
    role: str = "kv_both",
    chunk_size: int = 256,
    extra_config: dict[str, Any] | None = None,
    args: tuple[str, ...] = (),
) -> HttpProcess:
    """:func:`vllm_serve` with the connector on the kvtier server at ``server_port``, without vLLM's own prefix
    cache (every hit is kvtier's), as examples/vllm_serve_check.sh starts it."""
    connector = {"server_url": f"tcp://127.0.0.1:{server_port}", "chunk_size": chunk_size, **(extra_config or {})}
    return vllm_serve(log, "--no-enable-prefix-caching", *args, connector=connector, role=role)
