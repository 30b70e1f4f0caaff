"""Raw loopback transport limits: one KV request (4096 llama8b tokens = 512 MiB) sent one way as 16 x 32 MiB messages.

A sender process streams the messages to this process (the receiver) over 127.0.0.1:
- ``zmq``: pyzmq PUSH -> PULL on tcp://, ``send(copy=False)`` and ``recv(copy=False)`` (zmq allocates each frame);
- ``zmq_recv_into``: the same, but each frame is copied into a preallocated, pre-faulted buffer;
- ``tcp``: plain sockets, ``sendall`` -> ``recv_into`` a preallocated, pre-faulted buffer.
A rep is timed in the receiver from sending "go" over a control pipe to having the last byte. The received bytes
are compared with the sent ones after the timed reps. ``memcpy`` (np.copyto of the same bytes) is the reference.

    .venv/bin/python benchmarks/bench_transport.py --reps 9 > benchmarks/results/transport.jsonl
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
from collections.abc import Callable

import numpy as np
import zmq

from common import SHAPES, cpu_pressure, emit, summary, timed

HOST = "127.0.0.1"
CHUNK_TOKENS = 256


def request_sizes(shape: str, tokens: int) -> tuple[int, int]:
    layers, kv_heads, head_dim, dtype = SHAPES[shape]
    per_token = 2 * layers * kv_heads * head_dim * np.dtype(dtype).itemsize
    return tokens * per_token, CHUNK_TOKENS * per_token


def payload(nbytes: int) -> np.ndarray:
    return np.frombuffer(np.random.default_rng(0).bytes(nbytes), np.uint8)


def sender(kind: str, port: int, ctl, nbytes: int, chunk: int) -> None:
    data = payload(nbytes)
    chunks = [data[i : i + chunk] for i in range(0, nbytes, chunk)]
    if kind == "tcp":
        sock = socket.create_connection((HOST, port))
        send: Callable[[np.ndarray], object] = sock.sendall
    else:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PUSH)
        sock.connect(f"tcp://{HOST}:{port}")
        send = lambda c: sock.send(c, copy=False)  # noqa: E731
    ctl.send("ready")
    while ctl.recv() == "go":
        for c in chunks:
            send(c)
    sock.close()


def bench(kind: str, nbytes: int, chunk: int, reps: int) -> dict:
    dst = np.ones(nbytes, np.uint8)  # pre-faulted
    view = memoryview(dst)
    nmsg = nbytes // chunk
    frames: list = []
    if kind == "tcp":
        listener = socket.create_server((HOST, 0))
        port = listener.getsockname()[1]
    else:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PULL)
        port = sock.bind_to_random_port(f"tcp://{HOST}")
    ctl, child_ctl = mp.Pipe()
    child = mp.get_context("spawn").Process(target=sender, args=(kind, port, child_ctl, nbytes, chunk))
    child.start()
    if kind == "tcp":
        sock, _ = listener.accept()
        listener.close()
    assert ctl.recv() == "ready"

    def once() -> None:
        ctl.send("go")
        if kind == "tcp":
            got = 0
            while got < nbytes:
                got += sock.recv_into(view[got:])
        elif kind == "zmq":
            frames[:] = [sock.recv(copy=False) for _ in range(nmsg)]
        else:
            for i in range(nmsg):
                sock.recv_into(view[i * chunk : (i + 1) * chunk])

    try:
        times = timed(once, reps)
    finally:
        ctl.send("stop")
        child.join(30)
        sock.close()
    got = np.concatenate([np.frombuffer(f.buffer, np.uint8) for f in frames]) if kind == "zmq" else dst
    return {**summary(times, nbytes), "verified": bool(np.array_equal(got, payload(nbytes)))}


def memcpy(nbytes: int, reps: int) -> dict:
    src, dst = payload(nbytes), np.ones(nbytes, np.uint8)
    return summary(timed(lambda: np.copyto(dst, src), reps), nbytes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama8b", choices=sorted(SHAPES))
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--kinds", default="zmq,zmq_recv_into,tcp")
    args = parser.parse_args()
    nbytes, chunk = request_sizes(args.shape, args.tokens)
    base = {
        "bench": "transport",
        "shape": args.shape,
        "tokens": args.tokens,
        "bytes": nbytes,
        "messages": nbytes // chunk,
        "message_bytes": chunk,
    }
    emit(
        {
            **base,
            "op": "meta",
            "psi_cpu_avg10_before": cpu_pressure(),
            "loadavg": os.getloadavg(),
            "cpus": os.cpu_count(),
            "zmq": zmq.zmq_version(),
            "pyzmq": zmq.__version__,
            "numpy": np.__version__,
        }
    )
    emit({**base, "op": "memcpy", **memcpy(nbytes, args.reps)})
    for kind in args.kinds.split(","):
        emit({**base, "op": kind, "endpoint": f"tcp://{HOST}", **bench(kind, nbytes, chunk, args.reps)})
    emit({**base, "op": "end", "psi_cpu_avg10_after": cpu_pressure()})


if __name__ == "__main__":
    main()
