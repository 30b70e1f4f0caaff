"""Memcached as the remote tier: ``memcached://host[:port][,host:port...]``.

One item per chunk, ``<remote_prefix>/<key>``, holding the stored chunk format (header, then payload), written by
``add`` (store only if absent) with the reply awaited: a reader sees the whole chunk or nothing, the first writer
wins, and a write the server refuses is known, never lost in silence (pymemcache's default ``noreply`` would).

Several servers share the chunks by rendezvous (highest random weight) hashing: each key goes to the server that
scores highest for it, so adding or removing a server moves only that server's share. A server that fails is
skipped, its keys misses and its writes dropped, by a circuit breaker of its own, while the others keep serving;
its keys are not moved to another server (they would miss there too, and be stored twice on its return). A call
where every server asked failed raises, so the tier's own breaker and error counters see an outage.

Memcached refuses items larger than its ``-I`` setting (1 MiB by default; an item of exactly the limit is
refused too, for its own overhead). kvtier does not split chunks into several items (a chunk would then be
readable only in parts): each server's limit is read from ``stats settings`` and a chunk larger than it is not
stored, with one warning that names the setting. Start memcached with ``-I`` above the chunk size
(``docs/remote_tiers.md``).

Reads are one multi-key ``get`` per server and writes one ``add`` per chunk, sent on pymemcache's pooled
connections with the values received into and sent from kvtier's buffers as they are (pymemcache's own calls copy
each value several times: measured in ``docs/benchmarks.md``). Existence checks and deletes use memcached's meta
commands (``mg``/``md`` with ``q``, closed by ``mn``): one round
trip per server for a whole prompt, with no values sent. ``clear`` lists keys with ``lru_crawler metadump``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from pymemcache.client.base import PooledClient
from pymemcache.exceptions import MemcacheUnknownError

from kvtier.config import KVTierConfig
from kvtier.errors import ConfigError
from kvtier.metrics import CacheMetrics
from kvtier.storage.receive import ReceiveBuffers, SocketReader
from kvtier.storage.remote import CircuitBreaker, PutItem, RemoteStore, RemoteTier, Value, host_port, value_size
from kvtier.tokens.keys import Namespace

log = logging.getLogger(__name__)

DEFAULT_PORT = 11211
MAX_KEY_BYTES = 250  # memcached's limit; a key holds no whitespace or control characters
# Beyond 30 days memcached reads an expiry as a Unix time, not a number of seconds.
RELATIVE_EXPIRY_LIMIT = 30 * 24 * 3600
DELETE_BATCH = 512
_NO_VALUES = ReceiveBuffers(0)  # replies to add carry no values


@dataclass(frozen=True)
class MemcachedURL:
    servers: tuple[tuple[str, int], ...]


def parse_url(url: str) -> MemcachedURL:
    """``memcached://host[:port][,host[:port]...]`` (port 11211 by default). Raises ConfigError."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ConfigError(f"remote_url {url!r}: {exc}") from None
    if parts.scheme != "memcached" or parts.query or parts.path.strip("/") or "@" in parts.netloc:
        raise ConfigError(f"remote_url {url!r}: expected memcached://host[:port][,host[:port]...]")
    servers = tuple(host_port(item, DEFAULT_PORT, url) for item in parts.netloc.split(","))
    if len(set(servers)) != len(servers):
        raise ConfigError(f"remote_url {url!r}: a server is listed twice")
    return MemcachedURL(servers)


def check_prefix(prefix: str) -> None:
    """A prefix memcached keys can carry: printable ASCII without spaces, short enough for the 250-byte limit."""
    if not prefix.isascii() or not prefix.isprintable() or " " in prefix or len(prefix) > 100:
        raise ConfigError(f"remote_prefix {prefix!r}: memcached needs printable ASCII without spaces, <= 100 bytes")


class _Server:
    """One memcached server: its connection pool, its circuit breaker and its item size limit."""

    def __init__(self, address: tuple[str, int], timeout: float | None, max_connections: int, breaker: CircuitBreaker):
        self.address = address
        self.label = f"{address[0]}:{address[1]}"
        self._timeout = timeout
        self._max_connections = max_connections
        self.client = self._connect()
        self.breaker = breaker
        self.weight_seed = self.label.encode()
        self._item_limit: int | None = None
        self._too_large_warned = False

    def _connect(self) -> PooledClient:
        return PooledClient(
            self.address,
            connect_timeout=self._timeout,
            timeout=self._timeout,
            no_delay=True,
            default_noreply=False,  # a refused write must be seen
            max_pool_size=self._max_connections,
        )

    def reconnect(self) -> None:
        """Drop every pooled connection: after one failed, the others are suspect too (a restarted server
        closed them all), and each would otherwise fail once more before the server is used again."""
        old, self.client = self.client, self._connect()
        old.close()
        self._item_limit = None  # a restarted server may have another -I

    def item_limit(self) -> int:
        """The largest value this server accepts: its ``item_size_max`` less the item's own overhead."""
        if self._item_limit is None:
            settings = self.client.stats("settings")
            self._item_limit = int(settings[b"item_size_max"]) - 1024  # key, flags and item header
        return self._item_limit

    def warn_too_large(self, nbytes: int) -> None:
        if not self._too_large_warned:
            self._too_large_warned = True
            log.warning(
                "memcached %s holds items up to %d bytes: chunks of %d bytes are not stored there "
                "(start it with -I above the chunk size, e.g. -I 64m, or lower chunk_size)",
                self.label,
                self.item_limit(),
                nbytes,
            )


class MemcachedStore(RemoteStore):
    """Chunks on one or more memcached servers (see the module docstring)."""

    write_batch_bytes = 8 << 20  # writes batched up to this many bytes (see put_many)

    def __init__(
        self,
        url: MemcachedURL,
        *,
        timeout: float | None,
        max_connections: int,
        metrics: CacheMetrics,
        breaker_failures: int = 3,
        breaker_cooldown_sec: float = 5.0,
    ) -> None:
        self.servers = [
            _Server(address, timeout, max_connections, CircuitBreaker(breaker_failures, breaker_cooldown_sec))
            for address in url.servers
        ]
        self.metrics = metrics
        self._buffers = ReceiveBuffers()

    # -- routing ------------------------------------------------------------------------------------------------
    def server_for(self, name: str) -> _Server:
        """The server that scores highest for ``name`` (rendezvous hashing). BLAKE2b in C: pymemcache's own
        RendezvousHash hashes in pure Python, ~50x slower per key, which a 512-chunk prompt would feel."""
        if len(self.servers) == 1:
            return self.servers[0]
        key = name.encode()
        return max(self.servers, key=lambda s: hashlib.blake2b(key, digest_size=8, key=s.weight_seed).digest())

    def _by_server(self, names: Sequence[str]) -> dict[int, tuple[_Server, list[int]]]:
        groups: dict[int, tuple[_Server, list[int]]] = {}
        for i, name in enumerate(names):
            server = self.server_for(name)
            groups.setdefault(id(server), (server, []))[1].append(i)
        return groups

    def _each_server(self, names: Sequence[str], op: str, call, fallback) -> list:  # type: ignore[no-untyped-def]
        """``call(server, names_there)`` for each server holding some of ``names``; results back in order. A
        server that is down yields ``fallback`` for its names; if every server asked failed, the error is raised."""
        results = [fallback] * len(names)
        failures: list[Exception] = []
        groups = self._by_server(names)
        for server, indices in groups.values():
            if not server.breaker.allow():
                self.metrics.errors.inc(tier="memcached", kind="server_circuit_open")
                failures.append(ConnectionError(f"memcached {server.label}: circuit open"))
                continue
            try:
                answers = call(server, [names[i] for i in indices])
            except Exception as exc:  # any socket or protocol error is this server's failure
                failures.append(exc)
                self._server_failed(server, op, exc)
                continue
            if server.breaker.success():
                log.warning("memcached %s recovered", server.label)
            for i, answer in zip(indices, answers, strict=True):
                results[i] = answer
        if failures and len(failures) == len(groups):
            raise failures[0]
        return results

    def _server_failed(self, server: _Server, op: str, exc: Exception) -> None:
        self.metrics.errors.inc(tier="memcached", kind=f"server_{op}_failed")
        server.reconnect()
        if server.breaker.failure():
            log.warning(
                "memcached %s unavailable (%s failed: %s); its keys are misses, retrying in %.0f s",
                server.label,
                op,
                exc,
                server.breaker.cooldown_sec,
            )

    # -- RemoteStore --------------------------------------------------------------------------------------------
    def get_many(self, names: Sequence[str]) -> list[Value | None]:
        def get(server: _Server, there: list[str]) -> list[Value | None]:
            found = _get_values(server.client, there, self._buffers)
            return [found.get(name) for name in there]

        return self._each_server(names, "get", get, None)

    def exists_many(self, names: Sequence[str]) -> list[bool]:
        def exists(server: _Server, there: list[str]) -> list[bool]:
            # mg without flags answers HD (held) or, with q, nothing for a miss; k echoes the key.
            commands = "".join(f"mg {name} k q\r\n" for name in there) + "mn"
            reply = server.client.raw_command(commands, b"MN\r\n")
            held = {line[4:].decode() for line in reply.split(b"\r\n") if line.startswith(b"HD k")}
            return [name in held for name in there]

        return self._each_server(names, "exists", exists, False)

    def put(self, name: str, parts: Sequence[Value], ttl_sec: float | None, namespace: Namespace | None = None) -> bool:
        return self.put_many([(name, parts, namespace)], ttl_sec)[0]

    def put_many(self, items: Sequence[PutItem], ttl_sec: float | None) -> list[bool]:
        """One pipeline of ``add`` per server (one round trip); a value above the server's item limit is not
        sent (counted, warned about once)."""
        by_name = {name: parts for name, parts, _ in items}
        expire = _expiry(ttl_sec)

        def add(server: _Server, there: list[str]) -> list[bool]:
            sizes = {name: value_size(by_name[name]) for name in there}
            fitting = [name for name in there if sizes[name] <= server.item_limit()]
            if len(fitting) < len(there):
                server.warn_too_large(max(sizes.values()))
                self.metrics.errors.inc(len(there) - len(fitting), tier="memcached", kind="too_large")
            replies = _add_many(server.client, [(n, by_name[n], sizes[n]) for n in fitting], expire)
            refused = [reply for reply in replies.values() if reply is None]
            if refused:  # e.g. out of memory with eviction off: answered, not stored
                self.metrics.errors.inc(len(refused), tier="memcached", kind="refused")
            return [bool(replies.get(name)) for name in there]

        return self._each_server([name for name, _, _ in items], "put", add, False)

    def delete_many(self, names: Sequence[str]) -> int:
        def delete(server: _Server, there: list[str]) -> list[bool]:
            # md with q answers only what is not HD: NF for a key that was absent.
            commands = "".join(f"md {name} k q\r\n" for name in there) + "mn"
            reply = server.client.raw_command(commands, b"MN\r\n")
            absent = {line[4:].decode() for line in reply.split(b"\r\n") if line.startswith(b"NF k")}
            return [name not in absent for name in there]

        deleted = 0
        for start in range(0, len(names), DELETE_BATCH):
            deleted += sum(self._each_server(names[start : start + DELETE_BATCH], "delete", delete, False))
        return deleted

    def clear(self, prefix: str) -> int:
        """Delete every item under ``prefix`` on every server, listed by ``lru_crawler metadump all``."""
        names: list[str] = []
        for server in self.servers:
            dump = server.client.raw_command("lru_crawler metadump all", b"END\r\n")
            for line in dump.split(b"\n"):
                if line.startswith(b"key="):
                    name = unquote(line[4:].split(b" ", 1)[0].decode())
                    if name.startswith(prefix):
                        names.append(name)
        return self.delete_many(names)

    def close(self) -> None:
        for server in self.servers:
            server.client.close()


def _get_values(client: PooledClient, names: Sequence[str], buffers: ReceiveBuffers) -> dict[str, memoryview]:
    """One multi-key ``get`` on one of the pool's connections, each value received into a buffer of its own
    (``kvtier.storage.receive``: pymemcache's reader copies each value several times, 5-6x slower for 32 MiB
    values than the same reply received over a plain socket). The values found, by name."""
    with client.client_pool.get_and_release(destroy_on_fail=True) as conn:
        try:
            if conn.sock is None:
                conn._connect()
            conn.sock.sendall(b"get " + " ".join(names).encode() + b"\r\n")
            reader = SocketReader(conn.sock, buffers)
            found: dict[str, memoryview] = {}
            while (line := reader.line()) != b"END":
                fields = line.split()
                if len(fields) != 4 or fields[0] != b"VALUE" or not fields[3].isdigit():
                    raise MemcacheUnknownError(f"unexpected reply to get: {line[:80]!r}")
                found[fields[1].decode(errors="replace")] = reader.value(int(fields[3]))
            return found
        except Exception:
            conn.close()
            raise


def _add_many(
    client: PooledClient, values: Sequence[tuple[str, Sequence[Value], int]], expire: int
) -> dict[str, bool | None]:
    """``add`` (store if absent) of each ``(name, parts, size)``, pipelined on one of the pool's connections, the
    parts sent as they are. pymemcache's own ``add`` takes one bytes object and joins it with the command line:
    with the chunk's parts joined first, two fresh copies of every chunk (measured: 0.69 of pymemcache's ``set``
    of ready-made bytes for 32 MiB chunks, most of it page faults of the new buffers). Per name: stored (True),
    already there (False), refused by the server (None)."""
    if not values:
        return {}
    with client.client_pool.get_and_release(destroy_on_fail=True) as conn:
        try:
            if conn.sock is None:
                conn._connect()  # pymemcache's own connect (timeouts, TCP_NODELAY)
            sock = conn.sock
            for name, parts, size in values:
                sock.sendall(b"add %s 0 %d %d\r\n" % (name.encode(), expire, size))
                for part in parts:
                    sock.sendall(part)
                sock.sendall(b"\r\n")
            reader = SocketReader(sock, _NO_VALUES)
            return {name: _stored(reader.line()) for name, _, _ in values}
        except Exception:
            conn.close()
            raise


def _stored(reply: bytes) -> bool | None:
    if reply in (b"STORED", b"NOT_STORED"):
        return reply == b"STORED"
    if reply.startswith(b"SERVER_ERROR"):
        return None
    raise MemcacheUnknownError(f"unexpected reply to add: {reply[:80]!r}")


def _expiry(ttl_sec: float | None) -> int:
    """memcached's expiry for a TTL: whole seconds (at least 1), as a Unix time past 30 days; 0 = never."""
    if not ttl_sec:
        return 0
    seconds = max(1, math.ceil(ttl_sec))
    return seconds if seconds <= RELATIVE_EXPIRY_LIMIT else int(time.time()) + seconds


def create_memcached_tier(url: str, config: KVTierConfig, metrics: CacheMetrics) -> RemoteTier:
    """The remote tier for a ``memcached://`` ``remote_url`` (registered in ``kvtier.storage.registry``)."""
    check_prefix(config.remote_prefix)
    store = MemcachedStore(
        parse_url(url),
        timeout=config.remote_timeout_sec or None,
        max_connections=config.remote_max_connections,
        metrics=metrics,
        breaker_failures=config.remote_circuit_failures,
        breaker_cooldown_sec=config.remote_circuit_cooldown_sec,
    )
    return RemoteTier.from_config("memcached", store, config, metrics)
