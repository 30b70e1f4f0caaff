"""Baseline benchmark of LMCache 0.5.6's in-process CPU engine, to compare kvtier with.

What it measures (CPU only, one process), with LMCache's ``LMCacheEngine`` +
``StorageManager`` + ``LocalCPUBackend`` and a memcpy-class "contig" connector shim
(ours, not LMCache code: the engine KV is one contiguous CPU tensor ``[2, L, T, H*D]``
and to/from "gpu" is a slice ``copy_``):

* ``store`` / ``retrieve`` of one request (default 4096 tokens), median over N reps,
  fresh tokens (new cache keys) every rep, round trip checked bit-exact;
* ``lookup`` latency of a fully stored 32768-token prompt (tokens as tensor and as
  list), on the small KV shape (lookup cost does not depend on KV bytes);
* optionally ``LocalDiskBackend`` (local_cpu=False), buffered and/or O_DIRECT:
  store call, store-until-visible (lookup sees all tokens), retrieve (buffered: with
  the files evicted from the page cache, and again from the page cache);
* in the same reps, the memcpy limit: torch ``copy_`` and ``numpy.copyto`` of the same
  byte count into a preallocated, pre-faulted buffer. Every GB/s number (1e9 B/s) is
  also reported as a ratio to it.

Output: one JSON object per line on stdout (LMCache logs go to stderr). CPU PSI
(``/proc/pressure/cpu`` some avg10) is recorded before, after and with every result.
Run with the venv made by ``setup.sh``::

    ~/.cache/kvtier/lmcache-venv/bin/python bench_lmcache_engine.py --reps 9
"""

from __future__ import annotations

import argparse
import importlib.metadata
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from lmcache.v1.cache_engine import LMCacheEngine
    from lmcache.v1.gpu_connector.gpu_connectors import GPUConnectorInterface

DTYPE = torch.float16


def setup_env() -> None:
    """Call before importing lmcache: no telemetry (it would try to reach
    stats.lmcache.ai), no banner, quiet logs (to stderr). PYTHONHASHSEED only takes
    effect at interpreter start, hence the re-exec."""
    os.environ.update(LMCACHE_TRACK_USAGE="false", DO_NOT_TRACK="1", LMCACHE_DISABLE_BANNER="1")
    os.environ.setdefault("LMCACHE_LOG_LEVEL", "WARNING")
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable, *sys.argv])


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    kv_heads: int
    head_dim: int
    chunk: int = 256
    min_reps: int = 7  # small requests are ms-scale: take more reps

    @property
    def hidden(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def bytes_per_token(self) -> int:
        return self.layers * 2 * self.hidden * DTYPE.itemsize


SHAPES = {
    "llama8b": Shape("llama8b", layers=32, kv_heads=8, head_dim=128),
    "small": Shape("small", layers=2, kv_heads=2, head_dim=64, min_reps=30),
}


def contig_connector(kv: torch.Tensor) -> GPUConnectorInterface:
    """Our shim (not LMCache code): the engine KV is one contiguous ``[2, L, T, H]``
    CPU tensor and moving a chunk to/from it is a plain slice copy (memcpy-class)."""
    from lmcache.v1.gpu_connector.gpu_connectors import GPUConnectorInterface

    class ContigConnector(GPUConnectorInterface):
        def to_gpu(self, memory_obj: Any, start: int, end: int, **kw: Any) -> None:
            kv[:, :, start:end].copy_(memory_obj.tensor)

        def from_gpu(self, memory_obj: Any, start: int, end: int, **kw: Any) -> None:
            memory_obj.tensor.copy_(kv[:, :, start:end])

        def batched_to_gpu(self, memory_objs: list[Any], starts: list[int], ends: list[int], **kw: Any) -> None:
            for obj, s, e in zip(memory_objs, starts, ends, strict=True):
                self.to_gpu(obj, s, e)

        def batched_from_gpu(self, memory_objs: list[Any], starts: list[int], ends: list[int], **kw: Any) -> None:
            for obj, s, e in zip(memory_objs, starts, ends, strict=True):
                self.from_gpu(obj, s, e)

        def get_shape(self, num_tokens: int) -> torch.Size:
            return torch.Size([2, kv.shape[1], num_tokens, kv.shape[3]])

    return ContigConnector()


def psi_avg10() -> float | None:
    """CPU pressure, 'some avg10' (percent of time some task waited for a CPU)."""
    try:
        with open("/proc/pressure/cpu") as f:
            return float(f.readline().split()[1].split("=")[1])
    except (OSError, IndexError, ValueError):
        return None


def cpu_jiffies() -> tuple[int, int]:
    """(busy, steal) jiffies summed over all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return user + nice + system + irq + softirq + steal, steal


def emit(op: str, **rec: Any) -> None:
    shape = {"shape": rec.pop("shape")} if "shape" in rec else {}
    print(json.dumps({"bench": "lmcache_engine", **shape, "op": op, **rec}), flush=True)


def make_engine(name: str, shape: Shape, ntok: int, cpu_gib: float, **extra: Any) -> tuple[LMCacheEngine, torch.Tensor]:
    from lmcache.v1.cache_engine import LMCacheEngineBuilder
    from lmcache.v1.config import LMCacheEngineConfig
    from lmcache.v1.metadata import LMCacheMetadata

    cfg = LMCacheEngineConfig.from_defaults(chunk_size=shape.chunk, max_local_cpu_size=cpu_gib, **extra)
    meta = LMCacheMetadata(
        model_name=f"fake-{shape.name}",
        world_size=1,
        local_world_size=1,
        worker_id=0,
        local_worker_id=0,
        kv_dtype=DTYPE,
        kv_shape=(shape.layers, 2, shape.chunk, shape.kv_heads, shape.head_dim),
    )
    kv = torch.randn(2, shape.layers, ntok, shape.hidden, dtype=DTYPE)
    eng = LMCacheEngineBuilder.get_or_create(name, cfg, meta, contig_connector(kv), lambda t, r: None, lambda o, r: o)
    eng.post_init()
    return eng, kv


def destroy(name: str, timeout_s: float = 60.0) -> None:
    """Destroy an engine; give up after timeout_s (destroy can deadlock in 0.5.6)."""
    from lmcache.v1.cache_engine import LMCacheEngineBuilder

    th = threading.Thread(target=LMCacheEngineBuilder.destroy, args=(name,), daemon=True)
    th.start()
    th.join(timeout_s)
    if th.is_alive():
        print(f"warning: destroy({name!r}) hung; skipped", file=sys.stderr)


_FIRST_TOKEN = itertools.count(100_000)  # outside the vocab: unique key prefixes


def fresh_tokens(ntok: int, gen: torch.Generator) -> torch.Tensor:
    """Random token ids with a unique first token, so every call gives new keys."""
    tokens = torch.randint(0, 32000, (ntok,), generator=gen, dtype=torch.long)
    tokens[0] = next(_FIRST_TOKEN)
    return tokens


def wait_visible(eng: LMCacheEngine, tokens: torch.Tensor, timeout_s: float = 120.0) -> int:
    deadline = time.monotonic() + timeout_s
    while (hit := eng.lookup(tokens)) < len(tokens) and time.monotonic() < deadline:
        time.sleep(0.002)
    return hit


def evict_page_cache(directory: str) -> None:
    """Write back and drop the page cache of every file in directory."""
    for entry in os.scandir(directory):
        fd = os.open(entry.path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_reps(
    eng: LMCacheEngine,
    kv: torch.Tensor,
    ntok: int,
    reps: int,
    nbytes: int,
    *,
    evict_dir: str | None = None,
) -> dict[str, list[float]]:
    """Per rep: memcpy (torch, numpy), store, wait until visible, zero KV, retrieve.

    With evict_dir (buffered disk backend), "retrieve" runs after evicting the files
    from the page cache and "retrieve_hot" repeats it from the page cache. One
    untimed warm-up rep first. The memcpy is timed inside the same reps so that
    machine noise hits it and the LMCache ops alike.
    """
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.zeros(nbytes, dtype=torch.uint8)  # pre-faulted by zeros()
    src_np, dst_np = src.numpy(), dst.numpy()
    ref = kv.clone()
    slot = torch.arange(ntok, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = defaultdict(list)

    def timed(key: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args, **kw)
        times[key].append(time.perf_counter() - t0)
        return out

    for rep in range(reps + 1):
        timed("memcpy_torch", dst.copy_, src)
        timed("memcpy_numpy", np.copyto, dst_np, src_np)
        tokens = fresh_tokens(ntok, gen)
        t0 = time.perf_counter()
        timed("store", eng.store, tokens, slot_mapping=slot)
        hit = wait_visible(eng, tokens)
        times["visible"].append(time.perf_counter() - t0)
        for key in ("retrieve", "retrieve_hot") if evict_dir else ("retrieve",):
            if evict_dir and key == "retrieve":
                evict_page_cache(evict_dir)
            kv.zero_()
            mask = timed(key, eng.retrieve, tokens, slot_mapping=slot, req_id=f"r{rep}")
            got = int(mask.sum())
            if hit != ntok or got != ntok or not torch.equal(kv, ref):
                raise RuntimeError(f"rep {rep}: visible={hit} got={got} of {ntok}")
    return {k: v[1:] for k, v in times.items()}  # drop the warm-up rep


def report_throughput(times: dict[str, list[float]], ops: dict[str, str], nbytes: int, **common: Any) -> None:
    """Emit memcpy lines, then each LMCache op (time key -> op name) with ratios."""
    psi = psi_avg10()
    memcpy_gbps, memcpy_op = 0.0, ""
    for key in ("memcpy_torch", "memcpy_numpy"):
        med = statistics.median(times[key])
        gbps = nbytes / med / 1e9
        if gbps > memcpy_gbps:
            memcpy_gbps, memcpy_op = gbps, key
        emit(
            **common,
            op=key,
            bytes=nbytes,
            median_s=med,
            min_s=min(times[key]),
            gbps=gbps,
            psi_cpu_avg10=psi,
        )
    for key, op in ops.items():
        if key not in times:
            continue
        med = statistics.median(times[key])
        gbps = nbytes / med / 1e9
        emit(
            **common,
            op=op,
            bytes=nbytes,
            median_s=med,
            min_s=min(times[key]),
            max_s=max(times[key]),
            gbps=gbps,
            memcpy_gbps=memcpy_gbps,
            memcpy_op=memcpy_op,
            ratio_to_memcpy=gbps / memcpy_gbps,
            psi_cpu_avg10=psi,
        )


def bench_cpu(shape: Shape, ntok: int, reps: int) -> None:
    nbytes = ntok * shape.bytes_per_token
    cpu_gib = (reps + 2) * nbytes / 2**30 + 0.25  # room for all reps: no eviction
    eng, kv = make_engine(f"cpu-{shape.name}", shape, ntok, cpu_gib)
    times = run_reps(eng, kv, ntok, reps, nbytes)
    common = {
        "shape": shape.name,
        "backend": "LocalCPUBackend",
        "connector": "contig",
        "tokens": ntok,
        "reps": reps,
    }
    report_throughput(times, {"store": "store", "retrieve": "retrieve"}, nbytes, **common)
    del eng, kv
    destroy(f"cpu-{shape.name}")


def bench_disk(shape: Shape, ntok: int, reps: int, mode: str, root: str) -> None:
    nbytes = ntok * shape.bytes_per_token
    path = tempfile.mkdtemp(prefix=f"lmc-disk-{shape.name}-", dir=root)
    name = f"disk-{mode}-{shape.name}"
    extra: dict[str, Any] = {
        "local_cpu": False,
        "local_disk": f"file://{path}/",
        "max_local_disk_size": (reps + 2) * nbytes / 2**30 + 0.5,
    }
    if mode == "odirect":
        extra["extra_config"] = {"use_odirect": True}
    try:
        eng, kv = make_engine(name, shape, ntok, max(1.0, 2 * nbytes / 2**30), **extra)
        evict_dir = path if mode == "buffered" else None
        times = run_reps(eng, kv, ntok, reps, nbytes, evict_dir=evict_dir)
        common = {
            "shape": shape.name,
            "backend": "LocalDiskBackend",
            "disk_mode": mode,
            "connector": "contig",
            "tokens": ntok,
            "reps": reps,
        }
        ops = {
            "store": "disk_store_call",
            "visible": "disk_store_visible",
            "retrieve": "disk_retrieve",  # buffered: page cache evicted first
            "retrieve_hot": "disk_retrieve_pagecache",
        }
        report_throughput(times, ops, nbytes, **common)
        del eng, kv
        destroy(name)
    finally:
        shutil.rmtree(path, ignore_errors=True)


def bench_lookup(shape: Shape, ntok: int, reps: int) -> None:
    nbytes = ntok * shape.bytes_per_token
    eng, _kv = make_engine("lookup", shape, ntok, 2 * nbytes / 2**30 + 0.25)
    tokens = fresh_tokens(ntok, torch.Generator().manual_seed(1))
    eng.store(tokens, slot_mapping=torch.arange(ntok, dtype=torch.long))
    if wait_visible(eng, tokens) != ntok:
        raise RuntimeError("lookup bench: prompt not fully stored")
    for kind, toks in (("tensor", tokens), ("list", tokens.tolist())):
        xs, hit = [], 0
        for _ in range(reps):
            t0 = time.perf_counter()
            hit = eng.lookup(toks)
            xs.append(time.perf_counter() - t0)
        emit(
            shape=shape.name,
            backend="LocalCPUBackend",
            op="lookup",
            input=kind,
            tokens=ntok,
            chunks=ntok // shape.chunk,
            hit_tokens=hit,
            reps=reps,
            median_ms=statistics.median(xs) * 1e3,
            min_ms=min(xs) * 1e3,
            max_ms=max(xs) * 1e3,
            psi_cpu_avg10=psi_avg10(),
        )
    del eng, _kv
    destroy("lookup")


def main() -> None:
    setup_env()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=9, help="timed reps (min 7; small: 30)")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per request")
    ap.add_argument("--shapes", default="llama8b,small", help="comma list of " + ",".join(SHAPES))
    ap.add_argument("--lookup-tokens", type=int, default=32768)
    ap.add_argument("--lookup-reps", type=int, default=30)
    ap.add_argument("--lookup-shape", default="small", choices=sorted(SHAPES))
    ap.add_argument("--disk", default="", help="comma list of buffered,odirect ('' = skip)")
    ap.add_argument("--disk-dir", default=tempfile.gettempdir())
    args = ap.parse_args()
    shapes = [SHAPES[s] for s in args.shapes.split(",") if s]
    disk_modes = [m for m in args.disk.split(",") if m]
    if not set(disk_modes) <= {"buffered", "odirect"}:
        ap.error("--disk takes buffered and/or odirect")

    t_start, busy0, steal0, own0 = time.time(), *cpu_jiffies(), os.times()
    emit(
        op="meta",
        psi_cpu_avg10_before=psi_avg10(),
        loadavg=os.getloadavg(),
        lmcache=importlib.metadata.version("lmcache"),
        torch=torch.__version__,
        numpy=np.__version__,
        torch_threads=torch.get_num_threads(),
        cpus=os.cpu_count(),
        python=sys.version.split()[0],
        argv=sys.argv[1:],
    )
    for shape in shapes:
        reps = max(args.reps, shape.min_reps)
        bench_cpu(shape, args.tokens, reps)
        for mode in disk_modes:
            bench_disk(shape, args.tokens, reps, mode, args.disk_dir)
    if args.lookup_tokens > 0:
        bench_lookup(SHAPES[args.lookup_shape], args.lookup_tokens, args.lookup_reps)
    wall, (busy1, steal1), own1 = time.time() - t_start, cpu_jiffies(), os.times()
    own_s = own1.user + own1.system - own0.user - own0.system
    hz = os.sysconf("SC_CLK_TCK")
    emit(
        op="end",
        other_procs_cpu_cores=round(((busy1 - busy0) / hz - own_s) / wall, 3),
        steal_cpu_cores=round((steal1 - steal0) / hz / wall, 3),
        psi_cpu_avg10_after=psi_avg10(),
        loadavg=os.getloadavg(),
        wall_s=round(wall, 1),
    )
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown (LMCache threads can hang at exit)


if __name__ == "__main__":
    main()
