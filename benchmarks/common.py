"""Shared benchmark helpers: timing with medians, CPU pressure readings, JSON-line output, dropping page cache."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kvtier import KVLayout

SHAPES = {
    # name: (layers, kv_heads, head_dim, dtype); 256-token chunks of "llama8b" are 32 MiB
    "llama8b": (32, 8, 128, "float16"),
    "small": (2, 2, 64, "float16"),
}


def cpu_pressure() -> float | None:
    """``some avg10`` from /proc/pressure/cpu: how contended the shared CPU was (percent)."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except OSError:
        return None
    return float(dict(part.split("=") for part in line.split()[1:])["avg10"])


def timed(fn: Callable[[], Any], reps: int, warmup: int = 1, setup: Callable[[], Any] | None = None) -> list[float]:
    """Seconds of ``reps`` calls of ``fn`` after ``warmup`` untimed calls; ``setup`` runs untimed before each."""
    times = []
    for i in range(warmup + reps):
        if setup is not None:
            setup()
        started = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - started
        if i >= warmup:
            times.append(elapsed)
    return times


def summary(times: list[float], nbytes: int | None = None) -> dict[str, float]:
    med = statistics.median(times)
    out = {"median_s": med, "min_s": min(times), "max_s": max(times), "reps": len(times)}
    if nbytes:
        out["gbps"] = nbytes / med / 1e9
    return out


def emit(record: dict[str, Any]) -> None:
    record.setdefault("psi_cpu_avg10", cpu_pressure())
    print(json.dumps(record), flush=True)
    sys.stdout.flush()


def drop_file_cache(paths: list[Path]) -> None:
    """Evict files from the page cache so the next read comes from the device."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def random_kv(layout: KVLayout, tokens: int, seed: int) -> np.ndarray:
    """KV of ``tokens`` tokens with arbitrary bit patterns (every value, NaNs included, round-trips bit-exact)."""
    raw = np.random.default_rng(seed).integers(0, 2**16, layout.chunk_shape(tokens), dtype=np.uint16)
    return raw.view(layout.element.numpy_name)


def prompt(tokens: int, seed: int) -> list[int]:
    """Token ids of a random prompt; different seeds give different prefixes."""
    return np.random.default_rng(seed).integers(0, 32000, tokens).tolist()
