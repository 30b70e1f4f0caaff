"""Store/retrieve throughput of the memory and disk tiers, and lookup latency, next to the physical limits.

Limits measured in the same run: memcpy of the same bytes into pre-faulted memory (memory tier), and raw
file writes / cold reads of the same bytes in the same chunk-sized files (disk tier). Prints JSON lines.

    python benchmarks/bench_tiers.py --shapes llama8b small --tokens 4096 --reps 7
"""

from __future__ import annotations

import itertools
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

try:
    import torch
except ImportError:  # torch is optional: the numpy path is measured either way
    torch = None

from kvtier import CacheEngine, KVLayout, load_config

from common import SHAPES, drop_file_cache, emit, prompt, random_kv, shape_parser, summary, timed


def memcpy_limit(nbytes: int, reps: int, threads: int) -> dict[str, float]:
    """Copy of ``nbytes`` into pre-faulted memory: numpy on one thread, numpy split over ``threads`` threads
    (numpy releases the GIL while copying), and torch's (multi-threaded) ``copy_`` if torch is installed.
    The limit is the fastest."""
    src = np.ones(nbytes, np.uint8)
    dst = np.zeros(nbytes, np.uint8)
    bounds = np.linspace(0, nbytes, threads + 1).astype(int)
    parts = [(dst[a:b], src[a:b]) for a, b in itertools.pairwise(bounds)]
    with ThreadPoolExecutor(threads) as pool:
        limits = {
            "memcpy_numpy_1thread_gbps": summary(timed(lambda: np.copyto(dst, src), reps), nbytes)["gbps"],
            f"memcpy_numpy_{threads}threads_gbps": summary(
                timed(lambda: list(pool.map(lambda p: np.copyto(*p), parts)), reps), nbytes
            )["gbps"],
        }
    if torch is not None:
        tsrc, tdst = torch.from_numpy(src), torch.from_numpy(dst)
        limits["memcpy_torch_gbps"] = summary(timed(lambda: tdst.copy_(tsrc), reps), nbytes)["gbps"]
    return {**limits, "gbps": max(limits.values())}


def bench_memory(shape: str, layout: KVLayout, tokens: int, chunk: int, reps: int) -> None:
    nbytes = layout.chunk_bytes(tokens)
    config = load_config(env={}, overrides={"chunk_size": chunk, "max_local_cpu_size": 3 * nbytes / 2**30})
    limit = memcpy_limit(nbytes, reps, config.copy_threads)
    base = {
        "bench": "tiers",
        "tier": "memory",
        "shape": shape,
        "tokens": tokens,
        "bytes": nbytes,
        "memcpy_gbps": limit.pop("gbps"),
        **limit,
    }
    for container in ["numpy"] + (["torch"] if torch is not None else []):
        store_times, retrieve_times = store_and_retrieve(config, layout, tokens, reps, container)
        for op, times in (("store", store_times), ("retrieve", retrieve_times)):
            s = summary(times, nbytes)
            emit({**base, "kv": container, "op": op, **s, "ratio_to_memcpy": s["gbps"] / base["memcpy_gbps"]})


def store_and_retrieve(config, layout: KVLayout, tokens: int, reps: int, container: str):  # type: ignore[no-untyped-def]
    """Timings of storing fresh prompts and of retrieving one cached prompt into a pre-allocated output."""
    kv = random_kv(layout, tokens, 0)
    out = np.zeros_like(kv)
    if container == "torch":
        kv, out = torch.from_numpy(kv), torch.from_numpy(out)
    prompts = iter([prompt(tokens, seed) for seed in range(1, reps + 4)])
    toks = prompt(tokens, 0)
    with CacheEngine(config, layout, model_name="bench") as engine:
        # 3 untimed stores fill the 3-prompt budget: the timed ones reuse warm memory and evict.
        store_times = timed(lambda: engine.store(next(prompts), kv), reps, warmup=3)
        engine.store(toks, kv)
        retrieve_times = timed(lambda: engine.retrieve(toks, out=out), reps)
        assert np.array_equal(np.asarray(out).view(np.uint16), np.asarray(kv).view(np.uint16))
    return store_times, retrieve_times


def raw_disk_limit(directory: Path, nbytes: int, files: int, reps: int, threads: int) -> tuple[float, float]:
    """Best GB/s of writing, then cold-reading, ``files`` files of ``nbytes / files`` bytes each (one chunk per
    file), by one thread and by ``threads`` threads (a device may need several requests in flight)."""
    size = nbytes // files
    data = np.ones(size, np.uint8)
    buffers = [np.empty(size, np.uint8) for _ in range(files)]
    paths = [directory / f"raw{i}" for i in range(files)]

    def write(i: int) -> None:
        with open(paths[i], "wb", buffering=0) as f:
            f.write(memoryview(data))

    def read(i: int) -> None:
        with open(paths[i], "rb", buffering=0) as f:
            f.readinto(memoryview(buffers[i]))

    best_write = best_read = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for run in (lambda fn: [fn(i) for i in range(files)], lambda fn: list(pool.map(fn, range(files)))):
            best_write = max(best_write, summary(timed(lambda r=run: r(write), reps), nbytes)["gbps"])
            cold = summary(timed(lambda r=run: r(read), reps, setup=lambda: drop_file_cache(paths)), nbytes)
            best_read = max(best_read, cold["gbps"])
    for path in paths:
        path.unlink()
    return best_write, best_read


def bench_disk(shape: str, layout: KVLayout, tokens: int, chunk: int, reps: int, root: Path) -> None:
    nbytes = layout.chunk_bytes(tokens)
    raw_write, raw_read = raw_disk_limit(root, nbytes, tokens // chunk, reps, threads=4)
    disk = root / "tier"
    config = load_config(
        env={},
        overrides={
            "chunk_size": chunk,
            "max_local_cpu_size": 2 * nbytes / 2**30,
            "local_disk": str(disk),
            "max_local_disk_size": 3 * nbytes / 2**30,
        },
    )
    kv = random_kv(layout, tokens, 0)
    out = np.zeros_like(kv)
    seeds = iter(range(1, 10_000))
    with CacheEngine(config, layout, model_name="bench") as engine:

        def store_until_written() -> None:
            engine.store(prompt(tokens, next(seeds)), kv)
            engine.flush()

        write_times = timed(store_until_written, reps)
        toks = prompt(tokens, 0)
        engine.store(toks, kv)
        engine.flush()

        def cold() -> None:
            engine.storage.memory.clear()
            drop_file_cache(list(disk.rglob("*.kvt")))

        read_times = timed(lambda: engine.retrieve(toks, out=out), reps, setup=cold)
        assert np.array_equal(out.view(np.uint16), kv.view(np.uint16))
    base = {"bench": "tiers", "tier": "disk", "shape": shape, "tokens": tokens, "bytes": nbytes}
    s = summary(write_times, nbytes)
    emit(
        {
            **base,
            "op": "store_until_written",
            **s,
            "raw_write_gbps": raw_write,
            "ratio_to_raw": s["gbps"] / raw_write,
        }
    )
    s = summary(read_times, nbytes)
    emit(
        {
            **base,
            "op": "retrieve_cold",
            **s,
            "raw_cold_read_gbps": raw_read,
            "ratio_to_raw": s["gbps"] / raw_read,
        }
    )


def bench_lookup(tokens: int, chunk: int, reps: int, miss_history_entries: int | None) -> None:
    """Lookups of a cached prompt, of one that misses every chunk (each miss gets a reason) and of the cached prompt
    with a partial chunk after it. ``miss_history_entries``: the setting (None: the default, not passed at all,
    so this runs against versions before the setting existed too)."""
    layout = KVLayout(*SHAPES["small"])
    budget = 2 * layout.chunk_bytes(tokens) / 2**30
    overrides = {"chunk_size": chunk, "max_local_cpu_size": budget, "miss_history_entries": miss_history_entries}
    config = load_config(env={}, overrides=overrides)
    toks = prompt(tokens, 0)
    with CacheEngine(config, layout, model_name="bench") as engine:
        engine.store(toks, random_kv(layout, tokens, 0))
        as_array = np.asarray(toks, dtype=np.int64)
        miss = [toks[0] + 1, *toks[1:]]
        tail = [*toks, *toks[: chunk // 2]]
        cases = (("full_hit_list", toks), ("full_hit_numpy", as_array), ("miss_list", miss), ("hit_partial_tail", tail))
        for name, query in cases:
            times = timed(lambda q=query: engine.lookup(q), reps * 5, warmup=3)
            s = summary(times)
            emit(
                {
                    "bench": "lookup",
                    "tokens": tokens,
                    "chunk_size": chunk,
                    "case": name,
                    "miss_history_entries": miss_history_entries,
                    "median_ms": s["median_s"] * 1e3,
                    "min_ms": s["min_s"] * 1e3,
                }
            )


def main() -> None:
    parser = shape_parser(__doc__)
    parser.add_argument("--lookup-tokens", type=int, default=32768)
    parser.add_argument("--lookup-only", action="store_true", help="only the lookup benchmark")
    parser.add_argument("--miss-history-entries", type=int, help="the setting for the lookups (default: its default)")
    parser.add_argument("--dir", default=None, help="scratch directory on the disk to measure (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="kvtier-bench-") as scratch:
        for shape in [] if args.lookup_only else args.shapes:
            layout = KVLayout(*SHAPES[shape])
            bench_memory(shape, layout, args.tokens, args.chunk_size, args.reps)
            bench_disk(shape, layout, args.tokens, args.chunk_size, args.reps, Path(scratch))
    bench_lookup(args.lookup_tokens, args.chunk_size, args.reps, args.miss_history_entries)
    os.sync()


if __name__ == "__main__":
    main()
