"""Redis and Valkey as the remote tier: ``redis://``, ``rediss://``, ``valkey://``, ``valkeys://``,
``redis-cluster://`` and ``redis-sentinel://`` URLs.

One key per chunk, ``<remote_prefix>/<key>``, holding the stored chunk format (header, then payload), written by
a single ``SET ... NX [PX ttl]``: a reader sees the whole chunk or nothing, and the first writer wins. Existence
checks, reads and deletes of a whole prompt are pipelined: one round trip (on a cluster, one per node holding
some of the keys, all nodes at once).

redis-py manages connections: pools, AUTH, TLS, database, Sentinel discovery and the cluster slot map. The
chunk bytes go around its command packer and reply parser, which join a chunk's header and payload into a new
object on the way out and copy each value three times on the way in (about 0.4 GB/s on 32 MiB values): a
chunk is sent as its parts, and values are received from the socket straight into buffers of their own size.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.connection import ConnectionPool
from redis.exceptions import InvalidResponse, ResponseError
from redis.retry import Retry
from redis.sentinel import Sentinel

from kvtier.config import KVTierConfig
from kvtier.errors import ConfigError
from kvtier.metrics import CacheMetrics
from kvtier.storage.receive import ReceiveBuffers, SocketReader
from kvtier.storage.remote import PutItem, RemoteStore, RemoteTier, Value, host_port, value_size
from kvtier.tokens.keys import Namespace

# scheme: (deployment, TLS). Cluster and Sentinel URLs turn TLS on with ``?ssl=true``.
SCHEMES = {
    "redis": ("standalone", False),
    "valkey": ("standalone", False),
    "rediss": ("standalone", True),
    "valkeys": ("standalone", True),
    "redis-cluster": ("cluster", False),
    "redis-sentinel": ("sentinel", False),
}
DEFAULT_PORTS = {"standalone": 6379, "cluster": 6379, "sentinel": 26379}
DEFAULT_SERVICE_NAME = "mymaster"
# Values at least this large are sent only after an EXISTS says the key is absent: the round trip costs far
# less than sending bytes that SET NX would discard.
ASK_FIRST_BYTES = 1 << 20
SCAN_BATCH = 1000
READ_SIZE = 1 << 16
# No retries inside redis-py: a failure is a miss at once, and the circuit breaker decides when to try again.
NO_RETRY = Retry(NoBackoff(), 0)


def _flag(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _cert_reqs(text: str) -> str:
    if text not in ("none", "optional", "required"):
        raise ValueError("expected none, optional or required")
    return text


# URL query parameters kvtier passes on to redis-py, with their types.
QUERY_OPTIONS: dict[str, Callable[[str], Any]] = {
    "db": int,
    "client_name": str,
    "ssl": _flag,
    "ssl_ca_certs": str,
    "ssl_ca_path": str,
    "ssl_certfile": str,
    "ssl_keyfile": str,
    "ssl_cert_reqs": _cert_reqs,
    "ssl_check_hostname": _flag,
}


@dataclass(frozen=True)
class RedisURL:
    """A parsed remote_url: which deployment, where, as whom."""

    mode: str  # "standalone", "cluster" or "sentinel"
    nodes: tuple[tuple[str, int], ...]  # the server, the cluster's startup nodes, or the sentinels
    username: str | None = None
    password: str | None = None
    db: int = 0
    service_name: str | None = None  # the Sentinel service (master group) name
    options: dict[str, Any] = field(default_factory=dict)  # TLS and client options for redis-py


def parse_url(url: str) -> RedisURL:
    """``redis://[user:password@]host[:port][/db][?options]`` and the other schemes in :data:`SCHEMES`;
    ``redis-cluster://host:port[,host:port...]``; ``redis-sentinel://host:port[,host:port...][/service]``
    (service from the path, else ``$REDIS_SERVICE_NAME``, else ``mymaster``). Raises ConfigError."""
    shown = _redact(url)
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ConfigError(f"remote_url {shown!r}: {exc}") from None
    if parts.scheme not in SCHEMES:
        raise ConfigError(f"remote_url {shown!r}: scheme must be one of {', '.join(SCHEMES)}")
    mode, tls = SCHEMES[parts.scheme]
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    nodes = tuple(host_port(item, DEFAULT_PORTS[mode], shown) for item in hosts.split(","))
    if mode == "standalone" and len(nodes) > 1:
        raise ConfigError(f"remote_url {shown!r}: one host only (use redis-cluster:// for a cluster)")
    options = _query_options(parts.query, shown)
    options["ssl"] = options.get("ssl", False) or tls
    if not options["ssl"] and any(name.startswith("ssl_") for name in options):
        raise ConfigError(f"remote_url {shown!r}: ssl_* options need TLS (rediss://, valkeys:// or ?ssl=true)")
    db = options.pop("db", 0)
    path = unquote(parts.path.strip("/"))
    service = None
    if mode == "sentinel":
        service = path or os.environ.get("REDIS_SERVICE_NAME") or DEFAULT_SERVICE_NAME
    elif path:
        if mode == "cluster" or not path.isdigit():
            raise ConfigError(f"remote_url {shown!r}: the path must be a database number (standalone only)")
        db = int(path)
    if mode == "cluster" and db:
        raise ConfigError(f"remote_url {shown!r}: a cluster has only database 0")
    return RedisURL(mode, nodes, unquote(username) or None, unquote(password) or None, db, service, options)


def _query_options(query: str, shown: str) -> dict[str, Any]:
    options = {}
    for name, text in parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)):
        if name not in QUERY_OPTIONS:
            raise ConfigError(f"remote_url {shown!r}: unknown option {name!r} (known: {', '.join(QUERY_OPTIONS)})")
        try:
            options[name] = QUERY_OPTIONS[name](text)
        except ValueError as exc:
            raise ConfigError(f"remote_url {shown!r}: option {name}={text!r}: {exc}") from None
    return options


def _redact(url: str) -> str:
    """``url`` with its password replaced, for messages."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, hosts = rest.partition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}{sep}{userinfo.partition(':')[0]}:***@{hosts}"


class RedisStore(RemoteStore):
    """Chunks in Redis or Valkey: standalone, Sentinel-managed or a cluster (see the module docstring)."""

    write_batch_bytes = 8 << 20  # writes batched up to this many bytes (see put_many)

    def __init__(self, url: RedisURL, *, timeout: float | None, max_connections: int) -> None:
        self.url = url
        self.timeout = timeout
        self.max_connections = max_connections
        # One operation holds at most one connection per node, so this keeps every node's pool within its size:
        # an operation waits for a free connection instead of failing (redis-py's pools raise when exhausted).
        self._slots = threading.BoundedSemaphore(max_connections)
        self._client: redis.Redis | RedisCluster | None = None
        self._sentinel: Sentinel | None = None
        self._lock = threading.Lock()
        self._buffers = ReceiveBuffers()

    @property
    def client(self) -> redis.Redis | RedisCluster:
        """Made on first use: a cluster client fetches the slot map when made, which must not fail (or wait) when
        the engine starts; this first call goes through the circuit breaker like any other."""
        with self._lock:
            if self._client is None:
                self._client = self._connect()
            return self._client

    def _connect(self) -> redis.Redis | RedisCluster:
        url = self.url
        options: dict[str, Any] = {
            "username": url.username,
            "password": url.password,
            "socket_timeout": self.timeout,
            "socket_connect_timeout": self.timeout,
            "max_connections": self.max_connections,
            "protocol": 2,  # the replies read off the socket here are RESP2 (redis-py 8 defaults to RESP3)
            **url.options,
        }
        if url.mode == "cluster":
            return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in url.nodes], retry=NO_RETRY, **options)
        options.update(db=url.db, retry=NO_RETRY)
        if url.mode == "sentinel":
            sentinel_options = {k: v for k, v in options.items() if k.startswith(("socket_", "ssl"))}
            self._sentinel = Sentinel(list(url.nodes), sentinel_kwargs={**sentinel_options, "retry": NO_RETRY})
            return self._sentinel.master_for(url.service_name, **options)
        host, port = url.nodes[0]
        return redis.Redis(host=host, port=port, **options)

    # -- RemoteStore -----------------------------------------------------------------------------------------
    def exists_many(self, names: Sequence[str]) -> list[bool]:
        return [bool(n) for n in self._pipelined(b"EXISTS", names, _simple_replies)]

    def get_many(self, names: Sequence[str]) -> list[Value | None]:
        return self._pipelined(b"GET", names, lambda conn, count: _ValueReader(conn, self._buffers).read(count))

    def delete_many(self, names: Sequence[str | bytes]) -> int:
        return sum(self._pipelined(b"UNLINK", names, _simple_replies))

    def put(self, name: str, parts: Sequence[Value], ttl_sec: float | None, namespace: Namespace | None = None) -> bool:
        return self.put_many([(name, parts, namespace)], ttl_sec)[0]

    def put_many(self, items: Sequence[PutItem], ttl_sec: float | None) -> list[bool]:
        """One pipeline of ``SET NX`` per node (one round trip), after one pipelined EXISTS for the values of
        :data:`ASK_FIRST_BYTES` or more (not sent at all when already held)."""
        sizes = [value_size(parts) for _, parts, _ in items]
        large = [i for i, size in enumerate(sizes) if size >= ASK_FIRST_BYTES]
        held = {i for i, found in zip(large, self.exists_many([items[i][0] for i in large]), strict=True) if found}
        send = [i for i in range(len(items)) if i not in held]
        stored = [False] * len(items)
        if not send:
            return stored
        names = [items[i][0] for i in send]
        with self._connections(names) as connections:
            for conn, positions in connections:
                pieces = [
                    piece
                    for n in positions
                    for piece in _set_if_absent(names[n].encode(), items[send[n]][1], sizes[send[n]], ttl_sec)
                ]
                conn.send_packed_command(pieces)
            for conn, positions in connections:
                for n in positions:
                    stored[send[n]] = conn.read_response() is not None  # OK, or nil when it existed
        return stored

    def clear(self, prefix: str) -> int:
        pattern = "".join("\\" + c if c in "*?[]\\" else c for c in prefix) + "*"
        removed = 0
        for node in self._node_clients():
            batch: list[bytes] = []
            for key in node.scan_iter(match=pattern, count=SCAN_BATCH):
                batch.append(key)
                if len(batch) == SCAN_BATCH:
                    removed += self.delete_many(batch)
                    batch = []
            removed += self.delete_many(batch)
        return removed

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()
        for sentinel in self._sentinel.sentinels if self._sentinel else []:
            sentinel.close()

    # -- connections and pipelines ---------------------------------------------------------------------------
    def _node_clients(self) -> list[redis.Redis]:
        client = self.client
        if isinstance(client, RedisCluster):
            return [client.get_redis_connection(node) for node in client.get_primaries()]
        return [client]

    def _route(self, names: Sequence[str | bytes]) -> list[tuple[ConnectionPool, list[int]]]:
        """The pool of each node holding some of ``names``, with the positions of the names it holds."""
        client = self.client
        if not isinstance(client, RedisCluster):
            return [(client.connection_pool, list(range(len(names))))]
        groups: dict[str, tuple[ConnectionPool, list[int]]] = {}
        for i, name in enumerate(names):
            node = client.get_node_from_key(name)
            groups.setdefault(node.name, (client.get_redis_connection(node).connection_pool, []))[1].append(i)
        return list(groups.values())

    @contextlib.contextmanager
    def _connections(self, names: Sequence[str | bytes]) -> Iterator[list[tuple[Any, list[int]]]]:
        """A connection to each node holding some of ``names``. After an error they are dropped, since replies
        may be left half read; on a cluster the slot map is refreshed too, as a node may have moved or died."""
        if not self._slots.acquire(timeout=self.timeout):
            raise redis.TimeoutError(f"no free connection within {self.timeout} s")
        held: list[tuple[ConnectionPool, Any, list[int]]] = []
        try:
            for pool, positions in self._route(names):
                held.append((pool, pool.get_connection(), positions))
            yield [(conn, positions) for _, conn, positions in held]
        except BaseException as exc:
            for _, conn, _ in held:
                conn.disconnect()
            if isinstance(self._client, RedisCluster) and _topology_changed(exc):
                with contextlib.suppress(Exception):  # the next failing call tries again
                    self._client.nodes_manager.initialize()
            raise
        finally:
            for pool, conn, _ in held:
                pool.release(conn)
            self._slots.release()

    def _pipelined(
        self, command: bytes, names: Sequence[str | bytes], read: Callable[[Any, int], list[Any]]
    ) -> list[Any]:
        """``command name`` for each of ``names``: sent to every node first, then each node's replies read."""
        if not names:
            return []
        results: list[Any] = [None] * len(names)
        with self._connections(names) as connections:
            for conn, positions in connections:
                conn.send_packed_command(conn.pack_commands([(command, names[i]) for i in positions]))
            for conn, positions in connections:
                for i, reply in zip(positions, read(conn, len(positions)), strict=True):
                    results[i] = reply
        return results


def _simple_replies(conn: Any, count: int) -> list[Any]:
    return [conn.read_response() for _ in range(count)]


def _topology_changed(exc: BaseException) -> bool:
    if isinstance(exc, ResponseError):
        return str(exc).startswith(("MOVED", "ASK"))
    return isinstance(exc, redis.ConnectionError)


def _set_if_absent(name: bytes, parts: Sequence[Value], size: int, ttl_sec: float | None) -> list[Value]:
    """``SET name <parts joined> NX [PX ms]`` in RESP, the value's parts sent as they are (large ones uncopied)."""
    options = [b"NX"] + ([b"PX", b"%d" % max(1, round(ttl_sec * 1000))] if ttl_sec else [])
    head = b"*%d\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (3 + len(options), len(name), name, size)
    tail = b"\r\n" + b"".join(b"$%d\r\n%s\r\n" % (len(o), o) for o in options)
    pieces: list[Value] = [head]
    for part in parts:  # small parts (the header) ride in the same send as the command
        if len(pieces[-1]) + memoryview(part).nbytes <= READ_SIZE:
            pieces[-1] = bytes(pieces[-1]) + bytes(part)
        else:
            pieces.append(part)
    return [*pieces, tail]


class _ValueReader:
    """Bulk-string replies read from a connection's socket (``kvtier.storage.receive``). The pool hands out
    connections with nothing left to read, so the replies to the commands just sent are the next bytes on the
    socket; redis-py has no public accessor for it."""

    def __init__(self, conn: Any, buffers: ReceiveBuffers) -> None:
        self._reader = SocketReader(conn._sock, buffers)

    def read(self, count: int) -> list[memoryview | None]:
        try:
            return [self._value() for _ in range(count)]
        except TimeoutError as exc:  # socket.timeout
            raise redis.TimeoutError("timeout reading from the socket") from exc
        except (OSError, ValueError) as exc:
            raise redis.ConnectionError(f"error reading from the socket: {exc}") from exc

    def _value(self) -> memoryview | None:
        line = self._reader.line()
        if line.startswith(b"-"):
            raise ResponseError(line[1:].decode(errors="replace"))
        if not line.startswith(b"$"):
            raise InvalidResponse(f"expected a bulk string, got {line[:40]!r}")
        size = int(line[1:])
        return None if size < 0 else self._reader.value(size)


def create_redis_tier(url: str, config: KVTierConfig, metrics: CacheMetrics) -> RemoteTier:
    """The remote tier for a Redis/Valkey ``remote_url`` (registered in ``kvtier.storage.registry``)."""
    store = RedisStore(
        parse_url(url),
        timeout=config.remote_timeout_sec or None,  # 0: no timeout (redis-py would read it as non-blocking)
        max_connections=config.remote_max_connections,
    )
    return RemoteTier.from_config("redis", store, config, metrics)
