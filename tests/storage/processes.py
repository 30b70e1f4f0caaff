"""Helpers for tests that run real servers (Redis, SeaweedFS) as child processes."""

from __future__ import annotations

import contextlib
import ctypes
import signal
import socket
import sys
from collections.abc import Callable


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
