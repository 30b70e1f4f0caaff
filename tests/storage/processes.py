"""Helpers for tests that run real servers (Redis, memcached, Mooncake, SeaweedFS) as child processes: free
ports, dying with the test process, and stopping, hanging and resuming a server the way a test relies on."""

from __future__ import annotations

import contextlib
import ctypes
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports that were free a moment ago (held open together so they differ)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def _die_with_parent() -> Callable[[], None] | None:
    """For the child before exec (Linux): have it SIGKILLed when the process that started it dies, so a crashed
    or killed test run leaves no server behind. Resolved here, in the parent: the child may only call it."""
    if sys.platform != "linux":
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return lambda: prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


DIE_WITH_PARENT = _die_with_parent()


def kill(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGKILL (also a stopped process), as in a crash, and reap it."""
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait(10)


def pause(proc: subprocess.Popen[bytes] | None, timeout: float = 20.0) -> None:
    """SIGSTOP, like a hung server: its ports still accept connections, nothing answers. Returns once every thread
    has stopped: the signal is asynchronous, and a thread busy on another core could still answer a request."""
    assert proc is not None
    proc.send_signal(signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while not stopped(proc.pid):
        if time.monotonic() > deadline:
            raise RuntimeError(f"process {proc.pid} did not stop")
        time.sleep(0.005)


def resume(proc: subprocess.Popen[bytes] | None) -> None:
    assert proc is not None
    proc.send_signal(signal.SIGCONT)


def stopped(pid: int) -> bool:
    """Whether every thread of ``pid`` is stopped (or gone)."""
    tasks = Path(f"/proc/{pid}/task")
    return all(_task_stopped(task) for task in tasks.iterdir()) if tasks.exists() else True


def _task_stopped(task: Path) -> bool:
    with contextlib.suppress(OSError):
        return (task / "stat").read_text().rpartition(")")[2].split()[0] in ("T", "t")
    return True  # gone
