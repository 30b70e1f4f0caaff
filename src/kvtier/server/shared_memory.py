"""The same-host zero-copy path: the server's memory pool lives in a shared-memory file that clients map.

A store reserves chunk memory (``STORE_RESERVE`` returns each chunk's offset in the file), the client copies
its KV straight into those offsets and sends ``STORE_COMMIT``; a retrieve pins the cached chunks
(``RETRIEVE_PIN`` returns their offsets), the client copies them out and sends ``SHM_RELEASE``. Only these small
control messages cross the socket. Whatever a client holds is a lease with a deadline, so a client that dies
between the two steps cannot leak memory; and no timing of a stalled client (GC pause, swap, SIGSTOP) can make
the cache serve wrong KV:

- a read lease that expires is released (its memory may be reused at once); the client's ``SHM_RELEASE`` then
  answers ``released: false`` and the client discards what it copied: a miss, never another prompt's bytes;
- a write lease that expires while its writer still lives is *held*, not released: the writer may still copy
  into that memory, so it is never handed to anyone else. A late ``STORE_COMMIT`` still publishes it (the copy
  is complete by then); once the writer has exited it is released. Liveness is a file the client creates in the
  shared-memory directory and holds a ``flock`` on while its process lives (``kvtier-client-<pid>-<id>``): the
  kernel drops the lock when the process dies, however it dies, in any PID namespace. A reservation whose reply
  was lost (the client timed out) is never written: the client numbers its reservations and each
  ``STORE_RESERVE`` says below which number all of them are finished, so such orphans are released then.

Clients are trusted with the file's contents (it is created 0600, readable by the server's user only), as
with any shared-memory transport; the socket-level checks (auth, sizes) still apply to every request.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from kvtier.engine.results import StoreResult
from kvtier.protocol import POOL_NAME, WRITER_NAME, pool_path, shared_memory_dir

log = logging.getLogger("kvtier.server")
WRITER_CHECK_SEC = 1.0  # how often a held write lease's writer is checked for having exited


def shared_memory_path(server_id: str) -> str:
    """A fresh file name in /dev/shm (or the temp dir where there is none) for the server's pool. Files left by
    servers and clients that died without cleaning up (SIGKILL, power loss) are removed first."""
    remove_stale_files(shared_memory_dir())
    return pool_path(os.getpid(), server_id)


def remove_stale_files(base: str) -> int:
    """Delete pool files (``kvtier-<pid>-<server id>``) whose process is gone and client liveness files whose
    lock is free; return how many."""
    removed = 0
    for name in os.listdir(base):
        path = os.path.join(base, name)
        pool = POOL_NAME.fullmatch(name)
        if pool is not None:
            stale = not _process_exists(int(pool.group(1)))
        elif WRITER_NAME.fullmatch(name):
            stale = not writer_alive(path)
        else:
            continue
        if stale:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed += 1
    return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def writer_alive(path: str) -> bool:
    """Whether the client that created liveness file ``path`` still runs: it holds a shared lock on the file
    until its process ends. When that cannot be told (a file we may not open), the answer is yes: holding
    memory longer can never corrupt anything."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # BlockingIOError: the client holds its lock
        return True
    finally:
        os.close(fd)  # also drops our lock, had we taken it
    return False


@dataclass(slots=True)
class ShmLease:
    release: Callable[[], None]  # gives the memory back (abandon a reservation, unref pinned chunks)
    deadline: float
    commit: Callable[[], StoreResult] | None = None  # for a reservation: publish it
    writer: str | None = None  # a reservation's writer's liveness file
    number: int = 0  # the writer's number for this reservation
    stalled: bool = False  # a write lease past its deadline, held because its writer lives


class ShmLeaseTable:
    """Shared-memory leases by unguessable id; expired ones are released on :meth:`expire` (write leases only
    once their writer has exited). Thread-safe."""

    def __init__(self, ttl_sec: float) -> None:
        self.ttl_sec = ttl_sec
        self._leases: dict[int, ShmLease] = {}
        self._lock = threading.Lock()

    def open(
        self,
        release: Callable[[], None],
        commit: Callable[[], StoreResult] | None = None,
        writer: str | None = None,
        number: int = 0,
    ) -> int:
        lease_id = secrets.randbits(62)  # another client cannot commit or release it by guessing
        with self._lock:
            self._leases[lease_id] = ShmLease(release, time.monotonic() + self.ttl_sec, commit, writer, number)
        return lease_id

    def settle(self, writer: str, done_below: int) -> int:
        """Release ``writer``'s reservations numbered below ``done_below``: it says it writes none of them any
        more (their reply was lost, most likely, so it never learnt where they are). Returns how many."""
        with self._lock:
            done = [i for i, lease in self._leases.items() if lease.writer == writer and lease.number < done_below]
            leases = [self._leases.pop(i) for i in done]
        for lease in leases:
            lease.release()
        return len(leases)

    def take(self, lease_id: int) -> ShmLease | None:
        """Remove and return a lease that was not released (the caller commits or releases it)."""
        with self._lock:
            return self._leases.pop(lease_id, None)

    def expire(self) -> int:
        """Release the leases past their deadline whose memory nobody can still write; return how many."""
        now = time.monotonic()
        with self._lock:
            due = [(i, lease) for i, lease in self._leases.items() if lease.deadline <= now]
        released = 0
        for lease_id, lease in due:
            if lease.writer is not None and writer_alive(lease.writer):
                if not lease.stalled:
                    log.warning(
                        "a client holds a shared-memory reservation past server_lease_sec (%.1f s) and still runs: "
                        "its memory is kept until it commits or exits",
                        self.ttl_sec,
                    )
                lease.stalled, lease.deadline = True, now + WRITER_CHECK_SEC
                continue
            with self._lock:
                taken = self._leases.pop(lease_id, None)
            if taken is lease:  # not committed or released meanwhile
                lease.release()
                released += 1
        return released

    def release_all(self) -> None:
        with self._lock:
            leases, self._leases = list(self._leases.values()), {}
        for lease in leases:
            lease.release()

    def stalled(self) -> int:
        """Write leases held past their deadline because their writer still runs."""
        with self._lock:
            return sum(1 for lease in self._leases.values() if lease.stalled)

    def __len__(self) -> int:
        return len(self._leases)
