"""LMCache 0.5.6's Redis backend (``remote_url: redis://``) on the workload of ``benchmarks/bench_redis.py``.

The in-process engine of ``bench_lmcache_engine.py`` (same "contig" connector shim, same shapes and reps) with
``local_cpu: false``, so every retrieve reads from Redis: ``remote_store`` (the store call, asynchronous),
``remote_store_visible`` (until ``lookup`` sees every token: written) and ``remote_retrieve``, medians with the
memcpy of the same bytes in the same reps. Starts its own redis-server on a free port (stopped at the end) unless
given ``--url``. Ends with ``os._exit``: destroying an engine with a remote backend deadlocks in 0.5.6. Run with
the venv made by ``setup.sh``::

    ~/.cache/kvtier/lmcache-venv/bin/python benchmarks/lmcache_baseline/bench_lmcache_redis.py --reps 7
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback

from bench_lmcache_engine import SHAPES, emit, make_engine, psi_avg10, report_throughput, run_reps, setup_env


def start_redis(root: str) -> tuple[subprocess.Popen[bytes], str]:
    import redis

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen([*command, "--dir", root], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1)
    for _ in range(500):
        try:
            client.ping()
            return proc, f"redis://127.0.0.1:{port}"
        except redis.ConnectionError:
            time.sleep(0.02)
    proc.kill()
    raise RuntimeError("redis-server did not start")


def bench_remote(url: str, shape_name: str, ntok: int, reps: int) -> None:
    shape = SHAPES[shape_name]
    nbytes = ntok * shape.bytes_per_token
    name = f"redis-{shape.name}"
    eng, kv = make_engine(name, shape, ntok, max(1.0, 2 * nbytes / 2**30), local_cpu=False, remote_url=url)
    times = run_reps(eng, kv, ntok, reps, nbytes)
    ops = {"store": "remote_store", "visible": "remote_store_visible", "retrieve": "remote_retrieve"}
    common = {"shape": shape.name, "backend": "RemoteBackend", "remote_url": "redis://", "tokens": ntok, "reps": reps}
    report_throughput(times, ops, nbytes, **common)
    # No destroy: it deadlocks with remote backends; the process ends with os._exit.


def main() -> None:
    setup_env()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7, help="timed reps (the small shape gets at least 30)")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--shapes", default="llama8b,small")
    ap.add_argument("--url", default=None, help="a redis:// server to use (default: start one)")
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="lmc-redis-")
    proc, url = (None, args.url) if args.url else start_redis(root)
    status = 1
    try:
        emit(op="meta", psi_cpu_avg10_before=psi_avg10(), loadavg=os.getloadavg(), argv=sys.argv[1:])
        for shape in args.shapes.split(","):
            bench_remote(url, shape, args.tokens, max(args.reps, SHAPES[shape].min_reps))
        emit(op="end", psi_cpu_avg10_after=psi_avg10(), loadavg=os.getloadavg())
        status = 0
    except Exception:
        traceback.print_exc()
    finally:
        if proc is not None:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(root, ignore_errors=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)  # LMCache's threads would keep the interpreter from exiting


if __name__ == "__main__":
    main()
