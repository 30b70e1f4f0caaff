"""The same-host zero-copy path: the server's memory pool lives in a shared-memory file that clients map.

A store reserves chunk memory (``STORE_RESERVE`` returns each chunk's offset in the file), the client copies
its KV straight into those offsets and sends ``STORE_COMMIT``; a retrieve pins the cached chunks
(``RETRIEVE_PIN`` returns their offsets), the client copies them out and sends ``SHM_RELEASE``. Only these small
control messages cross the socket. Whatever a client holds is a lease with a deadline: a client that dies
between the two steps loses its lease and the memory comes back, so no crash can leak it.

Clients are trusted with the file's contents (it is created 0600, readable by the server's user only), as
with any shared-memory transport; the socket-level checks (auth, sizes) still apply to every request.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from kvtier.engine.results import StoreResult
from kvtier.protocol import POOL_NAME, pool_path, shared_memory_dir


def shared_memory_path(server_id: str) -> str:
    """A fresh file name in /dev/shm (or the temp dir where there is none) for the server's pool. Files left by
    servers that died without cleaning up (SIGKILL, power loss) are removed first: they hold memory."""
    remove_stale_pools(shared_memory_dir())
    return pool_path(os.getpid(), server_id)


def remove_stale_pools(base: str) -> int:
    """Delete pool files (``kvtier-<pid>-<server id>``) in ``base`` whose process is gone; return how many."""
    removed = 0
    for name in os.listdir(base):
        match = POOL_NAME.fullmatch(name)
        if match is None:
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(base, name))
                removed += 1
        except PermissionError:  # alive, another user's
            continue
    return removed


@dataclass(slots=True)
class Lease:
    release: Callable[[], None]  # gives the memory back (abandon a reservation, unref pinned chunks)
    deadline: float
    commit: Callable[[], StoreResult] | None = None  # for a reservation: publish it


class LeaseTable:
    """Leases by unguessable id; expired ones are released on :meth:`expire`. Thread-safe."""

    def __init__(self, ttl_sec: float) -> None:
        self.ttl_sec = ttl_sec
        self._leases: dict[int, Lease] = {}
        self._lock = threading.Lock()

    def open(self, release: Callable[[], None], commit: Callable[[], StoreResult] | None = None) -> int:
        lease_id = secrets.randbits(62)  # another client cannot commit or release it by guessing
        with self._lock:
            self._leases[lease_id] = Lease(release, time.monotonic() + self.ttl_sec, commit)
        return lease_id

    def take(self, lease_id: int) -> Lease | None:
        """Remove and return a live lease (the caller commits or releases it)."""
        with self._lock:
            return self._leases.pop(lease_id, None)

    def expire(self) -> int:
        now = time.monotonic()
        with self._lock:
            expired = [i for i, lease in self._leases.items() if lease.deadline <= now]
            leases = [self._leases.pop(i) for i in expired]
        for lease in leases:
            lease.release()
        return len(leases)

    def release_all(self) -> None:
        with self._lock:
            leases, self._leases = list(self._leases.values()), {}
        for lease in leases:
            lease.release()

    def __len__(self) -> int:
        return len(self._leases)
