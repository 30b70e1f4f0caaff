"""Redis tier throughput next to the raw client limit, both measured in the same reps.

For each shape, one prompt of ``--tokens`` tokens is ``tokens / chunk_size`` values of one chunk each (payload +
the 128-byte header, the size kvtier stores), moved in four ways:

- ``raw_client``: redis-py itself, SET and GET one value at a time and pipelined. Its best is the raw client limit,
  and ``ratio_to_raw`` is kvtier's GB/s over it;
- ``socket``: pre-packed pipelined commands over a plain socket, replies received into pre-faulted buffers: what
  one connection to this server carries at all (for scale);
- ``tier``: kvtier's redis tier, ``put`` chunk by chunk and one ``get_many`` for the prompt (header, checksums,
  verification and the copy into pool memory included);
- ``engine``: a CacheEngine with memory only staging (``local_cpu: false``): ``store`` + ``flush`` (until written)
  and ``retrieve`` of that prompt (every chunk read from Redis).

The cases run interleaved, one rep of each in turn (after one untimed warm-up rep), so that another process
slowing the machine slows them alike; medians are reported. Writes always go to absent keys (deleted, untimed,
before each write). Prints JSON lines. Starts its own redis-server on a free port unless given ``--url``::

    python benchmarks/bench_redis.py --shapes llama8b small --reps 7 > benchmarks/results/redis.jsonl
"""

from __future__ import annotations

import socket
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import redis

from kvtier.storage.redis import create_redis_tier
from remote_cases import Backend, Case, bench_shapes

from common import emit, shape_parser

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "storage"))
from redis_servers import RedisServer  # the test suite's server helper


def address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 6379


@contextmanager
def raw_client(url: str, values: list[np.ndarray]) -> Iterator[list[Case]]:
    names = [f"bench/raw/{i}" for i in range(len(values))]
    views = [memoryview(v) for v in values]
    client = redis.Redis(*address(url), protocol=2, socket_timeout=60)

    def set_each() -> None:
        for name, view in zip(names, views, strict=True):
            client.set(name, view)

    def set_pipelined() -> None:
        pipe = client.pipeline(transaction=False)
        for name, view in zip(names, views, strict=True):
            pipe.set(name, view)
        pipe.execute()

    def get_pipelined() -> list[bytes]:
        pipe = client.pipeline(transaction=False)
        for name in names:
            pipe.get(name)
        return pipe.execute()  # type: ignore[no-any-return]

    def clear() -> None:
        client.delete(*names)

    try:
        yield [
            Case("raw_client", "set", set_each, clear),
            Case("raw_client", "set_pipelined", set_pipelined, clear),
            Case("raw_client", "get", lambda: [client.get(n) for n in names]),
            Case("raw_client", "get_pipelined", get_pipelined),
        ]
        assert all(bytes(got) == bytes(v) for got, v in zip(get_pipelined(), views, strict=True))
    finally:
        clear()
        client.close()


@contextmanager
def plain_socket(url: str, values: list[np.ndarray]) -> Iterator[list[Case]]:
    """Pipelined SET / GET of the values over one socket, without a client library."""
    names = [f"bench/socket/{i}".encode() for i in range(len(values))]
    sets = [
        piece
        for n, v in zip(names, values, strict=True)
        for piece in (b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (len(n), n, v.nbytes), memoryview(v), b"\r\n")
    ]
    gets = b"".join(b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(n), n) for n in names)
    deletes = b"*%d\r\n$3\r\nDEL\r\n" % (len(names) + 1) + b"".join(b"$%d\r\n%s\r\n" % (len(n), n) for n in names)
    received = [np.ones(v.nbytes + 2, np.uint8) for v in values]  # pre-faulted
    with socket.create_connection(address(url)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = sock.makefile("rb", buffering=1 << 16)

        def set_all() -> None:
            for piece in sets:
                sock.sendall(piece)
            for _ in names:
                assert reader.readline() == b"+OK\r\n"

        def get_all() -> None:
            sock.sendall(gets)
            for buffer in received:
                assert int(reader.readline()[1:]) == buffer.nbytes - 2
                assert reader.readinto(memoryview(buffer)) == buffer.nbytes

        def clear() -> None:
            sock.sendall(deletes)
            reader.readline()

        try:
            yield [Case("socket", "set_pipelined", set_all, clear), Case("socket", "get_pipelined", get_all)]
            assert all(np.array_equal(r[:-2], v) for r, v in zip(received, values, strict=True))
        finally:
            clear()


@contextmanager
def redis_url(url: str | None) -> Iterator[tuple[str, int | None]]:
    """The server's URL and, when started here, its pid."""
    if url:
        yield url, None
        return
    with tempfile.TemporaryDirectory(prefix="kvtier-bench-redis-") as root:
        server = RedisServer(Path(root))
        try:
            yield server.start().url, server.pid
        finally:
            server.stop()


def main() -> None:
    parser = shape_parser(__doc__)
    parser.add_argument("--url", default=None, help="a standalone redis:// server to use (default: start one)")
    args = parser.parse_args()
    with redis_url(args.url) as (url, server_pid):
        with redis.Redis(*address(url), protocol=2) as client:
            info = client.info("server")
        emit({"bench": "redis", "op": "meta", "redis_version": info["redis_version"], "redis_py": redis.__version__})
        raw = [partial(raw_client, url), partial(plain_socket, url)]
        limits = ("set", "set_pipelined"), ("get", "get_pipelined")
        backend = Backend("redis", url, create_redis_tier, "redis", raw, *limits)
        bench_shapes(backend, args, [server_pid])


if __name__ == "__main__":
    main()
