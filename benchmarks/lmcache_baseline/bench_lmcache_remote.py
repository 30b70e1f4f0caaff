"""LMCache 0.5.6's remote backends on the workloads of ``benchmarks/bench_redis.py`` and ``bench_mooncake.py``.

The in-process engine of ``bench_lmcache_engine.py`` (same "contig" connector shim, same shapes and reps) with
``local_cpu: false``, so every retrieve reads from the remote store: ``remote_store`` (the store call,
asynchronous), ``remote_store_visible`` (until ``lookup`` sees every token: written) and ``remote_retrieve``,
medians with the memcpy of the same bytes in the same reps. Backends:

- ``redis``: ``remote_url: redis://``, its own redis-server on a free port unless given ``--url``;
- ``mooncake``: ``remote_url: mooncakestore://``, a Mooncake Store started as ``bench_mooncake.py`` starts it
  (master + a provider client holding the pool, TCP), in LMCache's two modes: its default
  (``save_chunk_meta: true``, metadata with each chunk: ``put_parts`` / ``batch_get_buffer``) and
  ``save_chunk_meta: false`` (zero-copy ``batch_put_from`` / ``batch_get_into`` on its registered CPU buffer).

Ends with ``os._exit``: destroying an engine with a remote backend deadlocks in 0.5.6. Run with the venv made by
``setup.sh``::

    ~/.cache/kvtier/lmcache-venv/bin/python benchmarks/lmcache_baseline/bench_lmcache_remote.py --backend redis --reps 7
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench_lmcache_engine import SHAPES, emit, make_engine, psi_avg10, report_throughput, run_reps, setup_env

TEST_SERVERS = Path(__file__).resolve().parents[2] / "tests" / "storage"  # the test suite's server helpers


@contextmanager
def redis_server(root: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """The redis-server of ``bench_redis.py`` (no persistence), on a free port."""
    sys.path.insert(0, str(TEST_SERVERS))
    from redis_servers import RedisServer

    server = RedisServer(Path(root)).start()
    try:
        yield server.url, {}
    finally:
        server.stop()


@contextmanager
def mooncake_store(root: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """The store of ``bench_mooncake.py`` (8 GiB pool, 10 s lease); LMCache's client adds no memory to it."""
    sys.path.insert(0, str(TEST_SERVERS))
    from mooncake_servers import MooncakeStore

    store = MooncakeStore(Path(root), pool_mb=8192, lease_ms=10_000, client_buffer_mb=512).start()
    master = f"127.0.0.1:{store.rpc_port}"
    # Mooncake 0.3.13's dict set-up, which LMCache calls, names the master "master_server_addr"; LMCache forwards
    # "master_server_address" and the client then retries the default master for a minute and fails (unchecked:
    # every later call segfaults). A "mooncake_" key is forwarded without its prefix.
    extra = {
        "local_hostname": "127.0.0.1",
        "metadata_server": store.metadata,
        "mooncake_master_server_addr": master,
        "global_segment_size": 0,
        "local_buffer_size": 512 << 20,
        "protocol": "tcp",
        "transfer_timeout": 60,
    }
    try:
        yield f"mooncakestore://{master}/", extra
    finally:
        store.stop()


BACKENDS: dict[str, Callable[[str], Any]] = {"redis": redis_server, "mooncake": mooncake_store}
# Each backend's modes: a label and the extra_config it adds.
MODES: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "redis": [("", {})],
    "mooncake": [("", {}), ("zero_copy", {"save_chunk_meta": False})],
}


def bench_remote(
    backend: str, url: str, extra: dict[str, Any], mode: str, shape_name: str, ntok: int, reps: int
) -> None:
    shape = SHAPES[shape_name]
    nbytes = ntok * shape.bytes_per_token
    name = "-".join(filter(None, [backend, mode, shape.name]))
    cpu_gib = max(1.0, 2 * nbytes / 2**30)
    eng, kv = make_engine(name, shape, ntok, cpu_gib, local_cpu=False, remote_url=url, extra_config=extra)
    times = run_reps(eng, kv, ntok, reps, nbytes)
    ops = {"store": "remote_store", "visible": "remote_store_visible", "retrieve": "remote_retrieve"}
    scheme = url.split("://")[0] + "://"
    common = {"shape": shape.name, "backend": "RemoteBackend", "remote_url": scheme, "mode": mode or "default",
              "tokens": ntok, "reps": reps}  # fmt: skip
    report_throughput(times, ops, nbytes, **common)
    # No destroy: it deadlocks with remote backends; the process ends with os._exit.


def main() -> None:
    setup_env()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=sorted(BACKENDS), default="redis")
    ap.add_argument("--reps", type=int, default=7, help="timed reps (the small shape gets at least 30)")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--shapes", default="llama8b,small")
    ap.add_argument("--url", default=None, help="a redis:// server to use (default: start one)")
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix=f"lmc-{args.backend}-")
    status = 1
    try:
        with BACKENDS[args.backend](root) if args.url is None else _given(args.url) as (url, extra):
            emit(op="meta", psi_cpu_avg10_before=psi_avg10(), loadavg=os.getloadavg(), argv=sys.argv[1:])
            for mode, mode_extra in MODES[args.backend]:
                for shape in args.shapes.split(","):
                    reps = max(args.reps, SHAPES[shape].min_reps)
                    try:
                        bench_remote(args.backend, url, {**extra, **mode_extra}, mode, shape, args.tokens, reps)
                    except RuntimeError as exc:  # a case that loses chunks is reported, and the others still run
                        emit(op="failed", shape=shape, mode=mode or "default", error=str(exc))
            emit(op="end", psi_cpu_avg10_after=psi_avg10(), loadavg=os.getloadavg())
        status = 0
    except Exception:
        traceback.print_exc()
    finally:
        shutil.rmtree(root, ignore_errors=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)  # LMCache's threads would keep the interpreter from exiting


@contextmanager
def _given(url: str) -> Iterator[tuple[str, dict[str, Any]]]:
    yield url, {}


if __name__ == "__main__":
    main()
