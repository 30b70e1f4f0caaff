"""Shared benchmark helpers: timing with medians, CPU pressure readings, JSON-line output, dropping page cache,
a ``kvtier server`` child process."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from kvtier import KVLayout

SHAPES = {
    # name: (layers, kv_heads, head_dim, dtype); 256-token chunks of "llama8b" are 32 MiB
    "llama8b": (32, 8, 128, "float16"),
    "small": (2, 2, 64, "float16"),
}


def shape_parser(doc: str | None) -> argparse.ArgumentParser:
    """The arguments every prompt-shaped benchmark takes: shapes, prompt tokens, chunk size, repetitions."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["llama8b", "small"], choices=sorted(SHAPES))
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--reps", type=int, default=7)
    return parser


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


def emit(record: dict[str, Any], append_to: Path | None = None) -> None:
    """Print ``record`` as a JSON line (and append it to ``append_to``, when given)."""
    record.setdefault("psi_cpu_avg10", cpu_pressure())
    line = json.dumps(record)
    print(line, flush=True)
    sys.stdout.flush()
    if append_to is not None:
        with open(append_to, "a") as f:
            f.write(line + "\n")


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def kvtier_server(
    *, chunk_size: int, cpu_gb: float, disk: Path | None = None, disk_gb: float = 0.0, log: Path | None = None
) -> Iterator[str]:
    """A ``kvtier server`` child process on free loopback ports, healthy before this yields its data-plane URL
    (``tcp://127.0.0.1:PORT``); stopped with SIGTERM after, so it removes its shared-memory pool."""
    port, http_port = free_port(), free_port()
    args = [sys.executable, "-m", "kvtier.cli.main", "server", "--port", str(port), "--http-port", str(http_port)]
    args += ["--chunk-size", str(chunk_size), "--max-local-cpu-size", str(cpu_gb), "--log-level", "WARNING"]
    args += ["--local-disk", str(disk), "--max-local-disk-size", str(disk_gb)] if disk else ["--local-disk", ""]
    with open(log or os.devnull, "w") as out:  # its logs would interleave with the JSON lines on stdout
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"kvtier server exited with {proc.returncode} (log: {log})")
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthcheck", timeout=1)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError("kvtier server not healthy after 60 s") from None
                    time.sleep(0.2)
            yield f"tcp://127.0.0.1:{port}"
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
