"""What the remote-tier benchmarks (Redis, memcached) share: timed cases taking turns, kvtier's tier and engine on
a prompt, the report next to the raw client's limit, and the CPU others used meanwhile."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvtier import CacheEngine, KVLayout, load_config
from kvtier.codecs.chunk_format import CHUNK_HEADER_SIZE
from kvtier.config import KVTierConfig
from kvtier.memory.memory_obj import MemoryObj
from kvtier.memory.pool import MemoryPool
from kvtier.metrics import CacheMetrics
from kvtier.storage.remote import RemoteTier
from kvtier.tokens.keys import Namespace

from common import SHAPES, cpu_pressure, emit, prompt, random_kv, summary

TierFactory = Callable[[str, KVTierConfig, CacheMetrics], RemoteTier]


@dataclass
class Case:
    level: str
    op: str
    run: Callable[[], object]
    setup: Callable[[], object] | None = None

    @property
    def writes(self) -> bool:
        return self.op.startswith(("set", "put", "store"))


@contextmanager
def kvtier_tier(url: str, factory: TierFactory, layout: KVLayout, tokens: int, chunk: int) -> Iterator[list[Case]]:
    """``put`` of each chunk and one ``get_many`` of the prompt, straight on the tier."""
    count, nbytes = tokens // chunk, layout.chunk_bytes(chunk)
    config = load_config(env={}, overrides={"remote_url": url, "remote_prefix": "bench-tier"})
    tier = factory(url, config, CacheMetrics())
    pool = MemoryPool(2 * count * nbytes + (8 << 20))
    namespace = Namespace("bench", layout.descriptor())
    keys = [namespace.key(hashlib.blake2b(b"%d" % i, digest_size=32).digest()) for i in range(count)]
    objs: list[MemoryObj] = [pool.allocate(layout, chunk) for _ in keys]  # type: ignore[misc]
    for i, obj in enumerate(objs):
        obj.data[:] = np.random.default_rng(i).integers(0, 256, nbytes, dtype=np.uint8)
    got: list[MemoryObj] = []

    def release() -> None:
        for obj in got:
            if obj is not None:  # a miss (e.g. evicted); the check after the reps reports it
                obj.unref()
        got.clear()

    def get_many() -> None:
        release()
        got.extend(tier.get_many(keys, pool.allocate))  # type: ignore[arg-type]

    try:
        yield [
            Case("tier", "put", lambda: [tier.put(k, o) for k, o in zip(keys, objs, strict=True)], tier.clear),
            Case("tier", "put_many", lambda: tier.put_many(keys, objs), tier.clear),  # as the writer hands them
            Case("tier", "get_many", get_many, release),
        ]
        get_many()
        assert all(np.array_equal(g.data, o.data) for g, o in zip(got, objs, strict=True))
    finally:
        release()
        tier.clear()
        tier.close()


@contextmanager
def kvtier_engine(url: str, tier_name: str, layout: KVLayout, tokens: int, chunk: int) -> Iterator[list[Case]]:
    """Store a fresh prompt until written, then retrieve it from the remote tier (memory only stages chunks)."""
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
            assert result.tier_tokens == {tier_name: tokens}, (result.tier_tokens, engine.metrics.errors.samples())

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


@contextmanager
def accounted(bench: str, pids: list[int | None]) -> Iterator[None]:
    """Emits, at the end, the wall time and what else ran meanwhile, in cores (other than ``pids``: this process
    and a server it started): the noise in the numbers."""
    started, busy, own = time.monotonic(), *cpu_seconds(pids)
    yield
    wall, (busy_end, own_end) = time.monotonic() - started, cpu_seconds(pids)
    emit({"bench": bench, "op": "end", "wall_s": wall, "other_cpu_cores": (busy_end - busy - own_end + own) / wall})


def report(bench: str, base: dict, cases: list[Case], times: dict[tuple[str, str], list[float]], nbytes: int,
           limit: dict[bool, float]) -> None:  # fmt: skip
    """One JSON line per case: its GB/s, and its ratio to the raw client's best (``limit[writes]``)."""
    for case in cases:
        key = (case.level, case.op)
        record = {"bench": bench, **base, "level": case.level, "op": case.op, "bytes": nbytes}
        record |= summary(times[key], nbytes)
        emit(record | {"raw_client_gbps": limit[case.writes], "ratio_to_raw": record["gbps"] / limit[case.writes]})


RawCases = Callable[[list[np.ndarray]], AbstractContextManager[list[Case]]]


@dataclass
class Backend:
    """One remote store as a benchmark sees it: where it is, kvtier's factory and tier name, how its raw client
    moves the values (each a context giving cases), and which raw operations are the limit for writes and reads."""

    bench: str
    url: str
    factory: TierFactory
    tier_name: str
    raw: list[RawCases]
    write_limit: tuple[str, ...]
    read_limit: tuple[str, ...]


def bench_shape(backend: Backend, shape: str, tokens: int, chunk: int, reps: int) -> None:
    """One prompt of ``shape``: the raw cases, kvtier's tier and an engine, taking turns; a JSON line per case."""
    layout = KVLayout(*SHAPES[shape])
    count, chunk_bytes = tokens // chunk, layout.chunk_bytes(chunk)
    nbytes = count * (CHUNK_HEADER_SIZE + chunk_bytes)
    values = [
        np.random.default_rng(i).integers(0, 256, CHUNK_HEADER_SIZE + chunk_bytes, dtype=np.uint8) for i in range(count)
    ]
    psi_start = cpu_pressure()
    with ExitStack() as stack:
        cases = [case for raw in backend.raw for case in stack.enter_context(raw(values))]
        cases += stack.enter_context(kvtier_tier(backend.url, backend.factory, layout, tokens, chunk))
        cases += stack.enter_context(kvtier_engine(backend.url, backend.tier_name, layout, tokens, chunk))
        times = interleaved(sorted(cases, key=lambda c: not c.writes), reps)  # each read follows its writes
    gbps = {key: summary(t, nbytes)["gbps"] for key, t in times.items()}
    limit = {
        True: max(gbps["raw_client", op] for op in backend.write_limit),
        False: max(gbps["raw_client", op] for op in backend.read_limit),
    }
    base = {"shape": shape, "tokens": tokens, "chunks": count, "chunk_bytes": chunk_bytes}
    base["psi_cpu_avg10_start"] = psi_start  # psi_cpu_avg10 (added by emit) is at the end of the shape's reps
    report(backend.bench, base, cases, times, nbytes, limit)


def bench_shapes(backend: Backend, args: Any, pids: list[int | None]) -> None:
    """:func:`bench_shape` for each of ``args.shapes`` (``common.shape_parser``'s arguments), accounted as a whole."""
    with accounted(backend.bench, [os.getpid(), *pids]):
        for shape in args.shapes:
            bench_shape(backend, shape, args.tokens, args.chunk_size, args.reps)
