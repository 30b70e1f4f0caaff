"""Mooncake Store as the remote tier: ``mooncakestore://master_host:port`` (LMCache's scheme).

Mooncake Store pools memory that its clients contribute (``global_segment_size`` each) under one master, which holds
the metadata and evicts when the pool fills; values move between clients over its transfer engine (here its TCP
transport; RDMA where the hardware has it). This tier is one such client: it contributes its segment and reads
and writes chunks by name.

- One object per chunk, ``<remote_prefix>/<key>``, holding the stored chunk format. Mooncake keeps the first value
  written under a name (a second put answers success and changes nothing), so writes ask which names exist first
  (one batched call) and send only the absent ones: a chunk is never sent twice, and readers see whole values.
- Writes: small chunks (under 1 MiB) go joined in one ``put_batch`` (the background writer hands this tier up to
  8 MiB of chunks at a time); large ones one ``put_parts`` each.
- Reads are ``batch_get_into`` calls (one round trip per 128 MiB of a prompt) into receive buffers registered with
  the client once and reused: the transfer engine writes each value straight into them, where it is verified and
  copied into pool memory. A read slot is the largest value seen (asked of the store for the first read); a value
  that does not fit is asked its size and read again.
- The master's ``--default_kv_lease_ttl`` (10 s by default) must exceed the time to read a prompt: a read whose
  lease expires mid-transfer fails (``LEASE_EXPIRED``), which is a miss.
- Deletes and ``clear`` are forced: Mooncake leases every object read for ``--default_kv_lease_ttl`` (10 s by default)
  and refuses to remove it meanwhile.
- The client library has no timeouts of its own that kvtier can set, so every call runs on a small pool of threads
  and is abandoned after ``remote_timeout_sec`` plus the time its bytes take at 100 MB/s (the call finishes or fails
  in the background; when every thread is held by a stalled call, calls fail at once): a hung master costs one
  timeout per incident, as for other tiers.

Options come from the URL's query (``?metadata_server=...&protocol=tcp&global_segment_size=<bytes>&...``) over
the JSON file named by ``MOONCAKE_CONFIG_PATH`` (the keys LMCache and vLLM read: ``local_hostname``,
``metadata_server``, ``global_segment_size``, ``local_buffer_size``, ``protocol``, ``device_name``), over defaults.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, fields, replace
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

import numpy as np
from mooncake.store import MooncakeDistributedStore

from kvtier.config import KVTierConfig
from kvtier.errors import ConfigError
from kvtier.metrics import CacheMetrics
from kvtier.storage.receive import MAX_VALUE, ReceiveBuffers
from kvtier.storage.remote import PutItem, RemoteStore, RemoteTier, Value, host_port, value_size

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_MASTER_PORT = 50051
DEFAULT_METADATA_PORT = 8080  # the master's embedded HTTP metadata server (--enable_http_metadata_server)
OBJECT_NOT_FOUND = -704
BUFFER_TOO_SMALL = -600
REGEX_SPECIAL = set(".^$*+?()[]{}|\\")
READ_BATCH_BYTES = 128 << 20  # one batch_get_into reads at most this much
PAGE = 4096
# A call moving data is given remote_timeout_sec plus its bytes at this rate: the client library cannot be told
# a timeout, so one bound covers the whole call, and a large prompt must not time out merely for being large.
SLOWEST_RATE = 100e6
SMALL_VALUE_BYTES = 1 << 20  # below this, chunks are joined and sent in one put_batch


@dataclass(frozen=True)
class MooncakeOptions:
    """A Mooncake client's set-up (the names LMCache's and vLLM's Mooncake configuration use)."""

    master_server_address: str
    metadata_server: str
    local_hostname: str
    protocol: str = "tcp"
    device_name: str = ""
    global_segment_size: int = 3200 << 20  # memory this client contributes to the pool
    local_buffer_size: int = 512 << 20  # this client's transfer buffer, which writes gather into


SIZE_OPTIONS = ("global_segment_size", "local_buffer_size")
TEXT_OPTIONS = ("metadata_server", "local_hostname", "protocol", "device_name")


def parse_url(url: str, environ: dict[str, str] | None = None) -> MooncakeOptions:
    """``mooncakestore://host[:port][?option=value...]`` over ``$MOONCAKE_CONFIG_PATH``. Raises ConfigError."""
    parts = urlsplit(url)
    if parts.scheme != "mooncakestore" or parts.path.strip("/") or "@" in parts.netloc or "," in parts.netloc:
        raise ConfigError(f"remote_url {url!r}: expected mooncakestore://master_host[:port][?options]")
    host, port = host_port(parts.netloc, DEFAULT_MASTER_PORT, url)
    values: dict[str, Any] = _config_file((environ if environ is not None else os.environ).get("MOONCAKE_CONFIG_PATH"))
    try:
        query = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as exc:
        raise ConfigError(f"remote_url {url!r}: {exc}") from None
    for name, text in query:
        if name not in SIZE_OPTIONS + TEXT_OPTIONS:
            known = ", ".join(SIZE_OPTIONS + TEXT_OPTIONS)
            raise ConfigError(f"remote_url {url!r}: unknown option {name!r} (known: {known})")
        values[name] = text
    options = MooncakeOptions(
        master_server_address=f"{host}:{port}",
        metadata_server=f"http://{host}:{DEFAULT_METADATA_PORT}/metadata",
        local_hostname=_own_address(host),
    )
    known = {f.name for f in fields(MooncakeOptions)} - {"master_server_address"}
    for name, value in values.items():
        if name in SIZE_OPTIONS:
            value = _size(name, value, url)
        elif name in TEXT_OPTIONS and not isinstance(value, str):
            raise ConfigError(f"remote_url {url!r}: {name} must be text, not {value!r}"[:300])
        if name in known:
            options = replace(options, **{name: value})
    if options.protocol not in ("tcp", "rdma"):
        raise ConfigError(f"remote_url {url!r}: protocol must be tcp or rdma")
    return options


def _config_file(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"MOONCAKE_CONFIG_PATH {path!r}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"MOONCAKE_CONFIG_PATH {path!r}: expected a JSON object")
    return {k: v for k, v in data.items() if k != "master_server_address"}  # the URL names the master


def _size(name: str, value: Any, url: str) -> int:
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = -1
    if size < 0 or (name == "local_buffer_size" and size == 0):
        raise ConfigError(f"remote_url {url!r}: {name} must be a number of bytes (local_buffer_size > 0)")
    return size


def _own_address(master_host: str) -> str:
    """The address of this host that the master's host is reached from (what other clients connect to)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((master_host, 9))  # no packet is sent: this only picks the route
            return str(probe.getsockname()[0])
    except OSError:
        return "127.0.0.1"


def regex_prefix(prefix: str) -> str:
    """An ECMAScript regex (Mooncake's ``remove_by_regex``) matching names that start with ``prefix``."""
    return "^" + "".join("\\" + c if c in REGEX_SPECIAL else c for c in prefix)


class RegisteredBuffers(ReceiveBuffers):
    """Receive buffers registered with one Mooncake client: ``batch_get_into`` writes only into registered memory
    (into any other it corrupts the process' heap)."""

    def __init__(self, client: MooncakeDistributedStore) -> None:
        super().__init__()
        self.client = client

    def _new(self, nbytes: int) -> np.ndarray:
        buffer = super()._new(nbytes)
        if (rc := self.client.register_buffer(buffer.ctypes.data, nbytes)) != 0:
            raise ConnectionError(f"Mooncake register_buffer failed ({rc})")
        return buffer

    def _discard(self, buffer: np.ndarray) -> None:
        self.client.unregister_buffer(buffer.ctypes.data)


class MooncakeStore(RemoteStore):
    """Chunks in a Mooncake Store (see the module docstring)."""

    write_batch_bytes = 8 << 20  # writes batched up to this many bytes (see put_many)

    def __init__(self, options: MooncakeOptions, *, timeout: float | None, threads: int) -> None:
        self.options = options
        self.timeout = timeout
        self._client: MooncakeDistributedStore | None = None
        self._lock = threading.Lock()
        self._calls = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="kvtier-mooncake")
        self._slots = threading.BoundedSemaphore(max(1, threads))
        self._largest_value = 0  # bytes: a read slot
        self._buffers: RegisteredBuffers | None = None  # with the client

    # -- the client, and bounded calls -------------------------------------------------------------------------
    def _connected(self) -> MooncakeDistributedStore:
        """The set-up client; set up on first use (and again after a failed set-up), so a master that is down
        when the engine starts is a miss now and served once it is up."""
        with self._lock:
            if self._client is None:
                o = self.options
                client = MooncakeDistributedStore()
                rc = client.setup(
                    o.local_hostname,
                    o.metadata_server,
                    o.global_segment_size,
                    o.local_buffer_size,
                    o.protocol,
                    o.device_name,
                    o.master_server_address,
                )
                if rc != 0:
                    raise ConnectionError(f"Mooncake set-up with master {o.master_server_address} failed ({rc})")
                self._client, self._buffers = client, RegisteredBuffers(client)
            return self._client

    def _bounded(self, call: Callable[[MooncakeDistributedStore], T], nbytes: int = 0) -> T:
        """``call(client)`` on the call threads, given up after the timeout plus the time to move ``nbytes`` at
        :data:`SLOWEST_RATE` (see the module docstring)."""
        if not self._slots.acquire(blocking=False):
            raise TimeoutError("every Mooncake call thread is held by a stalled call")
        future = self._calls.submit(lambda: call(self._connected()))
        future.add_done_callback(lambda _: self._slots.release())
        timeout = None if self.timeout is None else self.timeout + nbytes / SLOWEST_RATE
        try:
            return future.result(timeout)
        except FutureTimeout:
            raise TimeoutError(f"Mooncake call gave no answer within {timeout:.1f} s") from None

    # -- RemoteStore --------------------------------------------------------------------------------------------
    def get_many(self, names: Sequence[str]) -> list[Value | None]:
        """One ``batch_get_into`` per :data:`READ_BATCH_BYTES`, each value into a registered buffer of its own (valid
        while its view lives); values larger than the slot are read again at their size."""
        if not names:
            return []
        if not self._largest_value:
            self._fit(self._bounded(lambda client: [client.get_size(names[0])]))
        values = self._read(list(names))
        too_small = [i for i, value in enumerate(values) if value is BUFFER_TOO_SMALL]
        if too_small and self._fit(self._bounded(lambda client: [client.get_size(names[i]) for i in too_small])):
            for i, value in zip(too_small, self._read([names[i] for i in too_small]), strict=True):
                values[i] = value
        return [None if value is BUFFER_TOO_SMALL else value for value in values]  # type: ignore[misc]

    def _fit(self, sizes: list[int]) -> bool:
        """Grow the read slot to the largest of ``sizes`` that a chunk can have (a larger one is left a miss: a
        damaged or hostile store must not make every later read take that much memory). True if it grew."""
        fitting = [size for size in sizes if size <= MAX_VALUE]
        grew = max(fitting, default=0) > self._largest_value
        self._largest_value = max([self._largest_value, *fitting])
        return grew

    def _read(self, names: list[str]) -> list[memoryview | int | None]:
        slot = -(-max(1, self._largest_value) // PAGE) * PAGE  # every full chunk of a layout has the same size
        per_batch = max(1, READ_BATCH_BYTES // slot)
        values: list[memoryview | int | None] = []
        for start in range(0, len(names), per_batch):
            batch = names[start : start + per_batch]

            def read(client: MooncakeDistributedStore, batch: list[str] = batch) -> list[tuple[memoryview, int]]:
                assert self._buffers is not None  # set up with the client
                buffers = [self._buffers.take(slot) for _ in batch]
                addresses = [np.frombuffer(buffer, np.uint8).ctypes.data for buffer in buffers]
                return list(zip(buffers, client.batch_get_into(batch, addresses, [slot] * len(batch)), strict=True))

            values += [_value(buffer, size) for buffer, size in self._bounded(read, len(batch) * slot)]
        return values

    def exists_many(self, names: Sequence[str]) -> list[bool]:
        if not names:
            return []
        found = self._bounded(lambda client: client.batch_is_exist(list(names)))
        if any(f < 0 for f in found):
            raise ConnectionError("Mooncake existence check failed")
        return [f == 1 for f in found]

    def put(self, name: str, parts: Sequence[Value], ttl_sec: float | None, namespace: Any = None) -> bool:
        return self.put_many([(name, parts, namespace)], ttl_sec)[0]

    def put_many(self, items: Sequence[PutItem], ttl_sec: float | None) -> list[bool]:
        """Only the absent names are sent (Mooncake keeps a name's first value and answers a second put with
        success). ``ttl_sec`` is not applied: the master's eviction and leases decide an object's life."""
        present = self.exists_many([name for name, _, _ in items])

        absent = [(name, parts, value_size(parts)) for (name, parts, _), held in zip(items, present, strict=True)
                  if not held]  # fmt: skip
        self._largest_value = max([self._largest_value, *(size for _, _, size in absent)])

        def send(client: MooncakeDistributedStore) -> dict[str, int]:
            # Large chunks: put_parts, which gathers header and payload into the transfer buffer without joining
            # them (1.1 GB/s for 32 MiB chunks, 0.8 of zero-copy put_from; put_batch of joined values: 0.3).
            # Small ones: one put_batch, joined (a put each is a round trip each: 0.2-0.35 of put_batch).
            small = [(n, b"".join(parts)) for n, parts, size in absent if size < SMALL_VALUE_BYTES]
            codes = {n: client.put_parts(n, *parts) for n, parts, size in absent if size >= SMALL_VALUE_BYTES}
            if small:
                rc = client.put_batch([n for n, _ in small], [v for _, v in small])
                codes.update({n: rc for n, _ in small})
            return codes

        codes = self._bounded(send, sum(size for _, _, size in absent)) if absent else {}
        failed = [rc for rc in codes.values() if rc != 0]
        if failed:  # e.g. the pool is full: a failed put leaves the name absent (a miss, never a torn value)
            log.debug("Mooncake put of %d of %d chunks failed (%d)", len(failed), len(codes), failed[0])
        return [codes.get(name) == 0 for name, _, _ in items]

    def delete_many(self, names: Sequence[str]) -> int:
        if not names:
            return 0
        codes = self._bounded(lambda client: client.batch_remove(list(names), True))
        failed = [c for c in codes if c not in (0, OBJECT_NOT_FOUND)]
        if failed:
            raise ConnectionError(f"Mooncake remove failed ({failed[0]})")
        return sum(c == 0 for c in codes)

    def clear(self, prefix: str) -> int:
        removed = self._bounded(lambda client: client.remove_by_regex(regex_prefix(prefix), True))
        if removed < 0:
            raise ConnectionError(f"Mooncake remove_by_regex failed ({removed})")
        return int(removed)

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:  # a hung master must not hang the engine's close: bounded like every call
            closing = self._calls.submit(client.close)
            try:
                closing.result(self.timeout)
            except Exception as exc:
                log.warning("Mooncake client did not close cleanly: %s", exc or type(exc).__name__)
        self._calls.shutdown(wait=False)


def _value(buffer: memoryview, size: int) -> memoryview | int | None:
    if size == BUFFER_TOO_SMALL:
        return BUFFER_TOO_SMALL
    if size <= 0:  # absent (OBJECT_NOT_FOUND), or a failed transfer: a miss
        return None
    return buffer[:size]


def create_mooncake_tier(url: str, config: KVTierConfig, metrics: CacheMetrics) -> RemoteTier:
    """The remote tier for a ``mooncakestore://`` ``remote_url`` (registered in ``kvtier.storage.registry``)."""
    store = MooncakeStore(
        parse_url(url), timeout=config.remote_timeout_sec or None, threads=config.remote_max_connections
    )
    return RemoteTier.from_config("mooncake", store, config, metrics)
