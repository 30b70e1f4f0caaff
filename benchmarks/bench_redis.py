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

import argparse
import hashlib
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import redis

from kvtier import CacheEngine, KVLayout, load_config
from kvtier.codecs.chunk_format import CHUNK_HEADER_SIZE
from kvtier.memory.memory_obj import MemoryObj
from kvtier.memory.pool import MemoryPool
from kvtier.metrics import CacheMetrics
from kvtier.storage.redis import create_redis_tier
from kvtier.tokens.keys import Namespace

from common import SHAPES, cpu_pressure, emit, prompt, random_kv, summary

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "storage"))
from redis_servers import RedisServer  # the test suite's server helper


@dataclass
class Case:
    level: str
    op: str
    run: Callable[[], object]
    setup: Callable[[], object] | None = None

    @property
    def writes(self) -> bool:
        return self.op.startswith(("set", "put", "store"))


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
def kvtier_tier(url: str, layout: KVLayout, tokens: int, chunk: int) -> Iterator[list[Case]]:
    """``put`` of each chunk and one ``get_many`` of the prompt, straight on the tier."""
    count, nbytes = tokens // chunk, layout.chunk_bytes(chunk)
    config = load_config(env={}, overrides={"remote_url": url, "remote_prefix": "bench-tier"})
    tier = create_redis_tier(url, config, CacheMetrics())
    pool = MemoryPool(2 * count * nbytes + (8 << 20))
    namespace = Namespace("bench", layout.descriptor())
    keys = [namespace.key(hashlib.blake2b(b"%d" % i, digest_size=32).digest()) for i in range(count)]
    objs: list[MemoryObj] = [pool.allocate(layout, chunk) for _ in keys]  # type: ignore[misc]
    for i, obj in enumerate(objs):
        obj.data[:] = np.random.default_rng(i).integers(0, 256, nbytes, dtype=np.uint8)
    got: list[MemoryObj] = []

    def release() -> None:
        for obj in got:
            obj.unref()
        got.clear()

    def get_many() -> None:
        release()
        got.extend(tier.get_many(keys, pool.allocate))  # type: ignore[arg-type]

    try:
        yield [
            Case("tier", "put", lambda: [tier.put(k, o) for k, o in zip(keys, objs, strict=True)], tier.clear),
            Case("tier", "get_many", get_many, release),
        ]
        get_many()
        assert all(np.array_equal(g.data, o.data) for g, o in zip(got, objs, strict=True))
    finally:
        release()
        tier.clear()
        tier.close()


@contextmanager
def kvtier_engine(url: str, layout: KVLayout, tokens: int, chunk: int) -> Iterator[list[Case]]:
    """Store a fresh prompt until written, then retrieve it from Redis (memory only stages chunks)."""
    nbytes = layout.chunk_bytes(tokens)
    overrides = {
        "remote_url": url,
        "remote_prefix": "bench-engine",
        "chunk_size": chunk,
        "local_cpu": False,
        "max_local_cpu_size": 2.5 * nbytes / 2**30,
        "max_background_write_size": 2 * nbytes / 2**30,
    }
    kv = random_kv(layout, tokens, 0)
    out = np.zeros_like(kv)
    seeds = iter(range(1, 1_000_000))
    last: list[list[int]] = []
    with CacheEngine(load_config(env={}, overrides=overrides), layout, model_name="bench") as engine:
        tier = engine.storage.lower[0]

        def store_until_written() -> None:
            last[:] = [prompt(tokens, next(seeds))]
            engine.store(last[0], kv)
            engine.flush()

        def retrieve() -> None:
            result = engine.retrieve(last[0], out=out)
            assert result.tier_tokens == {"redis": tokens}

        try:
            yield [
                Case("engine", "store_until_written", store_until_written, tier.clear),
                Case("engine", "retrieve", retrieve, lambda: out.fill(0)),
            ]
            assert np.array_equal(out.view(np.uint16), kv.view(np.uint16))
        finally:
            tier.clear()


def interleaved(cases: list[Case], reps: int) -> dict[tuple[str, str], list[float]]:
    """Seconds of each case per rep, the cases taking turns; the first rep is an untimed warm-up."""
    times: dict[tuple[str, str], list[float]] = {(c.level, c.op): [] for c in cases}
    for rep in range(1 + reps):
        for case in cases:
            if case.setup is not None:
                case.setup()
            started = time.perf_counter()
            case.run()
            if rep:
                times[case.level, case.op].append(time.perf_counter() - started)
    return times


def bench_shape(url: str, shape: str, tokens: int, chunk: int, reps: int) -> None:
    layout = KVLayout(*SHAPES[shape])
    count, chunk_bytes = tokens // chunk, layout.chunk_bytes(chunk)
    nbytes = count * (CHUNK_HEADER_SIZE + chunk_bytes)
    values = [
        np.random.default_rng(i).integers(0, 256, CHUNK_HEADER_SIZE + chunk_bytes, dtype=np.uint8) for i in range(count)
    ]
    psi_start = cpu_pressure()
    with ExitStack() as stack:
        cases = [
            *stack.enter_context(raw_client(url, values)),
            *stack.enter_context(plain_socket(url, values)),
            *stack.enter_context(kvtier_tier(url, layout, tokens, chunk)),
            *stack.enter_context(kvtier_engine(url, layout, tokens, chunk)),
        ]
        times = interleaved(sorted(cases, key=lambda c: not c.writes), reps)  # each read follows its writes
    gbps = {key: summary(t, nbytes)["gbps"] for key, t in times.items()}
    limit = {
        True: max(gbps["raw_client", "set"], gbps["raw_client", "set_pipelined"]),
        False: max(gbps["raw_client", "get"], gbps["raw_client", "get_pipelined"]),
    }
    base = {"bench": "redis", "shape": shape, "tokens": tokens, "chunks": count, "chunk_bytes": chunk_bytes}
    base["psi_cpu_avg10_start"] = psi_start  # psi_cpu_avg10 (added by emit) is at the end of the shape's reps
    for case in cases:
        key = (case.level, case.op)
        record = {**base, "level": case.level, "op": case.op, "bytes": nbytes, **summary(times[key], nbytes)}
        emit(record | {"raw_client_gbps": limit[case.writes], "ratio_to_raw": gbps[key] / limit[case.writes]})


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


def cpu_seconds(pids: list[int | None]) -> tuple[float, float]:
    """(CPU seconds used by the whole machine, by these processes) so far, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    own = 0
    for pid in pids:
        if pid is not None:
            with open(f"/proc/{pid}/stat") as f:
                own += sum(int(x) for x in f.read().rpartition(")")[2].split()[11:13])  # utime, stime
    return busy / tick, own / tick


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["llama8b", "small"], choices=sorted(SHAPES))
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--url", default=None, help="a standalone redis:// server to use (default: start one)")
    args = parser.parse_args()
    with redis_url(args.url) as (url, server_pid):
        with redis.Redis(*address(url), protocol=2) as client:
            info = client.info("server")
        emit({"bench": "redis", "op": "meta", "redis_version": info["redis_version"], "redis_py": redis.__version__})
        started, busy, own = time.monotonic(), *cpu_seconds([os.getpid(), server_pid])
        for shape in args.shapes:
            bench_shape(url, shape, args.tokens, args.chunk_size, args.reps)
        wall, (busy_end, own_end) = time.monotonic() - started, cpu_seconds([os.getpid(), server_pid])
        # What else ran meanwhile, in cores (with --url the server counts as "else"): the noise in these numbers.
        emit(
            {"bench": "redis", "op": "end", "wall_s": wall, "other_cpu_cores": (busy_end - busy - own_end + own) / wall}
        )


if __name__ == "__main__":
    main()
