"""Memcached tier throughput next to the raw client limit, both measured in the same reps.

For each shape, one prompt of ``--tokens`` tokens is ``tokens / chunk_size`` values of one chunk each (payload +
the 128-byte header, the size kvtier stores), moved four ways:

- ``raw_client``: pymemcache itself (the client kvtier uses), ``set`` / ``get`` one value at a time and
  ``set_many`` / ``get_many`` for the prompt, replies awaited. Its best is the raw client limit, and
  ``ratio_to_raw`` is kvtier's GB/s over it;
- ``socket``: ``set`` / multi-key ``get`` over a plain socket, values received into pre-faulted buffers: what one
  connection to this server carries at all (for scale; pymemcache copies each value on the way in and out);
- ``tier``: kvtier's memcached tier, ``put`` chunk by chunk and one ``get_many`` for the prompt (header,
  checksums, verification and the copy into pool memory included);
- ``engine``: a CacheEngine with memory only staging (``local_cpu: false``): ``store`` + ``flush`` (until
  written) and ``retrieve`` of that prompt (every chunk read from memcached).

The cases take turns rep by rep (after one untimed warm-up rep); medians are reported. Writes go to absent keys.
Starts its own memcached (``-I 64m``, 8 GiB, 2 threads) on a free port unless given ``--url``::

    python benchmarks/bench_memcached.py --shapes llama8b small --reps 7 > benchmarks/results/memcached.jsonl
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pymemcache
from pymemcache.client.base import Client

from kvtier.storage.memcached import create_memcached_tier
from remote_cases import Backend, Case, bench_shapes

from common import emit, shape_parser

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "storage"))
from memcached_servers import MemcachedServer  # the test suite's server helper


@contextmanager
def raw_client(url: str, values: list[np.ndarray]) -> Iterator[list[Case]]:
    parts = urlsplit(url)
    client = Client((parts.hostname, parts.port), default_noreply=False, timeout=60, no_delay=True)
    names = [f"bench/raw/{i}" for i in range(len(values))]
    blobs = [v.tobytes() for v in values]  # pymemcache sends bytes; made once, outside the timing

    def set_each() -> None:
        for name, blob in zip(names, blobs, strict=True):
            assert client.set(name, blob)

    def set_many() -> None:
        assert client.set_many(dict(zip(names, blobs, strict=True))) == []

    def clear() -> None:
        client.delete_many(names)

    try:
        yield [
            Case("raw_client", "set", set_each, clear),
            Case("raw_client", "set_many", set_many, clear),
            Case("raw_client", "get", lambda: [client.get(n) for n in names]),
            Case("raw_client", "get_many", lambda: client.get_many(names)),
        ]
        got = client.get_many(names)
        assert all(got[n] == b for n, b in zip(names, blobs, strict=True))
    finally:
        clear()
        client.close()


@contextmanager
def plain_socket(url: str, values: list[np.ndarray]) -> Iterator[list[Case]]:
    """``set`` of each value and one multi-key ``get`` over one socket, values received into pre-faulted
    buffers, without a client library: what one connection to this server carries at all."""
    parts = urlsplit(url)
    names = [f"bench/socket/{i}".encode() for i in range(len(values))]
    gets = b"get " + b" ".join(names) + b"\r\n"
    received = [np.ones(v.nbytes + 2, np.uint8) for v in values]  # pre-faulted
    with socket.create_connection((parts.hostname, parts.port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = sock.makefile("rb", buffering=1 << 16)

        def set_all() -> None:
            for name, value in zip(names, values, strict=True):
                sock.sendall(b"set %s 0 0 %d\r\n" % (name, value.nbytes))
                sock.sendall(memoryview(value))
                sock.sendall(b"\r\n")
                assert reader.readline() == b"STORED\r\n"

        def get_all() -> None:
            sock.sendall(gets)
            for buffer in received:
                assert int(reader.readline().split()[3]) == buffer.nbytes - 2
                assert reader.readinto(memoryview(buffer)) == buffer.nbytes
            assert reader.readline() == b"END\r\n"

        yield [Case("socket", "set", set_all), Case("socket", "get", get_all)]
        assert all(np.array_equal(r[:-2], v) for r, v in zip(received, values, strict=True))


@contextmanager
def memcached_url(url: str | None) -> Iterator[tuple[str, int | None]]:
    """The server's URL and, when started here, its pid."""
    if url:
        yield url, None
        return
    server = MemcachedServer(None, 8192, "64m")  # room for every case's chunks: no evictions
    try:
        server.start()
        yield server.url, server.pid
    finally:
        server.stop()


def main() -> None:
    parser = shape_parser(__doc__)
    parser.add_argument("--url", default=None, help="a memcached:// server to use (default: start one)")
    args = parser.parse_args()
    with memcached_url(args.url) as (url, server_pid):
        emit({"bench": "memcached", "op": "meta", "pymemcache": pymemcache.__version__})
        raw = [partial(raw_client, url), partial(plain_socket, url)]
        limits = ("set", "set_many"), ("get", "get_many")
        backend = Backend("memcached", url, create_memcached_tier, "memcached", raw, *limits)
        bench_shapes(backend, args, [server_pid])


if __name__ == "__main__":
    main()
