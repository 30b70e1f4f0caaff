"""Store/retrieve throughput through `kvtier server`, over TCP and through shared memory, next to the limits.

Starts a real server process (memory tier only) on free loopback ports and drives it from this process. Limits
measured in the same run: a raw ZMQ transfer of the same bytes between two processes (for the TCP path) and a
memcpy of the same bytes (for the shared-memory path). Prints JSON lines.

    python benchmarks/bench_server.py --shape llama8b --tokens 4096 --reps 7
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import zmq

from kvtier import KVLayout
from kvtier.client import KVTierClient

from common import SHAPES, emit, summary, timed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(l1_gb: float, chunk: int) -> tuple[subprocess.Popen, int]:
    port, http_port = free_port(), free_port()
    args = [
        sys.executable,
        "-m",
        "kvtier.cli.main",
        "server",
        "--port",
        str(port),
        "--http-port",
        str(http_port),
        "--max-local-cpu-size",
        str(l1_gb),
        "--local-disk",
        "",
        "--chunk-size",
        str(chunk),
        "--log-level",
        "WARNING",
    ]
    proc = subprocess.Popen(args)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthcheck", timeout=1)
            return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


def _sink(port: int, nbytes: int, reps: int) -> None:
    """Receive ``reps`` transfers of ``nbytes`` (after one warm-up), acknowledging each."""
    ctx = zmq.Context.instance()
    pull, ack = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.bind(f"tcp://127.0.0.1:{port}")
    ack.connect(f"tcp://127.0.0.1:{port + 1}")
    for _ in range(reps + 1):
        got = 0
        while got < nbytes:
            got += len(pull.recv(copy=False))
        ack.send(b"ok")


def raw_zmq_limit(nbytes: int, chunk_bytes: int, reps: int) -> float:
    """Median one-way GB/s of PUSH -> PULL between two processes, ``nbytes`` as messages of ``chunk_bytes``,
    each transfer timed until the receiver acknowledges it."""
    port = free_port()
    while True:  # the sink acknowledges on port + 1, which must be free too
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
                break
            except OSError:
                port = free_port()
    payload = np.ones(chunk_bytes, np.uint8)
    ctx = zmq.Context.instance()
    push, ack = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    ack.bind(f"tcp://127.0.0.1:{port + 1}")
    proc = mp.get_context("spawn").Process(target=_sink, args=(port, nbytes, reps))
    proc.start()
    push.connect(f"tcp://127.0.0.1:{port}")

    def transfer() -> None:
        for _ in range(nbytes // chunk_bytes):
            push.send(payload, copy=False)
        ack.recv()

    times = timed(transfer, reps, warmup=1)
    proc.join()
    push.close()
    ack.close()
    return summary(times, nbytes)["gbps"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama8b", choices=sorted(SHAPES))
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--lookup-tokens", type=int, default=32768)
    args = parser.parse_args()
    layout = KVLayout(*SHAPES[args.shape])
    nbytes = layout.chunk_bytes(args.tokens)
    zmq_limit = raw_zmq_limit(nbytes, layout.chunk_bytes(args.chunk_size), args.reps)
    src, dst = np.ones(nbytes, np.uint8), np.zeros(nbytes, np.uint8)
    memcpy = summary(timed(lambda: np.copyto(dst, src), args.reps), nbytes)["gbps"]
    server, port = start_server(4 * nbytes / 2**30 + 0.5, args.chunk_size)
    try:
        kv = np.random.default_rng(0).standard_normal(layout.chunk_shape(args.tokens)).astype(layout.element.numpy_name)
        out = np.zeros_like(kv)
        base = {
            "bench": "server",
            "shape": args.shape,
            "tokens": args.tokens,
            "bytes": nbytes,
            "raw_zmq_gbps": zmq_limit,
            "memcpy_gbps": memcpy,
        }
        for transport, shared in (("tcp", False), ("shared_memory", True)):
            client = KVTierClient(f"127.0.0.1:{port}", model="bench", layout=layout, shared_memory=shared, timeout=60)
            prompts = iter([list(range(s * 10**6, s * 10**6 + args.tokens)) for s in range(args.reps + 2)])
            store = timed(lambda c=client, p=prompts: c.store(next(p), kv), args.reps)
            tokens = list(range(args.tokens))
            client.store(tokens, kv)
            retrieve = timed(lambda c=client, t=tokens: c.retrieve(t, out=out), args.reps)
            assert np.array_equal(out.view(np.uint8), kv.view(np.uint8))
            limit = zmq_limit if transport == "tcp" else memcpy
            for op, times in (("store", store), ("retrieve", retrieve)):
                s = summary(times, nbytes)
                emit({**base, "transport": transport, "op": op, **s, "ratio_to_limit": s["gbps"] / limit})
            client.clear()
            client.close()
        lookup_layout = KVLayout(*SHAPES["small"])
        client = KVTierClient(f"127.0.0.1:{port}", model="bench-lookup", layout=lookup_layout, timeout=60)
        tokens = list(range(args.lookup_tokens))
        client.store(tokens, np.zeros(lookup_layout.chunk_shape(args.lookup_tokens), np.float16))
        times = timed(lambda: client.lookup(tokens), args.reps * 5, warmup=3)
        emit(
            {
                "bench": "server",
                "op": "lookup",
                "tokens": args.lookup_tokens,
                "median_ms": summary(times)["median_s"] * 1e3,
            }
        )
        client.close()
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
