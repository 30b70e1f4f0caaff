"""Bounded load test of `kvtier server`: many client processes on loopback for a fixed time.

Each client repeatedly stores and retrieves prompts that share a system prompt (so chunks are reused across
clients), checks every retrieved byte, and counts errors. The server's resident memory is sampled throughout.
The run must end with zero errors and memory bounded by the configured budget. Prints one JSON line.

    python benchmarks/load_server.py --clients 16 --seconds 20
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time
from pathlib import Path

import numpy as np

from bench_server import start_server
from kvtier import KVLayout
from kvtier.client import KVTierClient

from common import cpu_pressure

LAYOUT = KVLayout(4, 2, 64)  # 2 KiB per token
SYSTEM_PROMPT = list(range(10**6, 10**6 + 512))


def kv_for(tokens: list[int]) -> np.ndarray:
    """KV derived from the token ids, so any client can check what it reads back."""
    ids = np.asarray(tokens, dtype=np.float32) % 2048  # exact in fp16
    return np.broadcast_to(ids[None, None, :, None, None], LAYOUT.chunk_shape(len(tokens))).astype(np.float16)


def client_loop(port: int, client_id: int, seconds: float, shared_memory: bool, results: mp.Queue) -> None:
    rng = np.random.default_rng(client_id)
    client = KVTierClient(
        f"127.0.0.1:{port}", model="load", layout=LAYOUT, chunk_size=64, timeout=30, shared_memory=shared_memory
    )
    latencies, errors, ops = [], 0, 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        start = client_id * 10**5 + int(rng.integers(0, 50)) * 1000  # 50 conversations per client, revisited
        user = list(range(start, start + int(rng.integers(64, 1024))))
        tokens = SYSTEM_PROMPT + user
        started = time.perf_counter()
        try:
            client.store(tokens, kv_for(tokens))
            got = client.retrieve(tokens)
            expected = kv_for(tokens)[:, :, : got.hit_tokens]
            if got.hit_tokens < len(SYSTEM_PROMPT) or not np.array_equal(got.kv, expected):
                errors += 1
            client.lookup(tokens)
            ops += 3
        except Exception:  # every failure counts; the run must have none
            errors += 1
        latencies.append(time.perf_counter() - started)
    client.close()
    results.put({"ops": ops, "errors": errors, "latencies": latencies})


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--l1-gb", type=float, default=0.25)
    parser.add_argument("--tcp", action="store_true", help="clients use TCP even on this host")
    args = parser.parse_args()
    server, port = start_server(args.l1_gb, 64)
    ctx = mp.get_context("spawn")
    results: mp.Queue = ctx.Queue()
    procs = [
        ctx.Process(target=client_loop, args=(port, i, args.seconds, not args.tcp, results))
        for i in range(args.clients)
    ]
    rss = []
    try:
        for proc in procs:
            proc.start()
        end = time.monotonic() + args.seconds + 5
        while time.monotonic() < end and any(p.is_alive() for p in procs):
            rss.append(rss_bytes(server.pid))
            time.sleep(0.5)
        reports = [results.get(timeout=60) for _ in procs]
        for proc in procs:
            proc.join(30)
    finally:
        server.terminate()
        server.wait(30)
    latencies = sorted(x for r in reports for x in r["latencies"])
    ops = sum(r["ops"] for r in reports)
    print(
        json.dumps(
            {
                "bench": "server_load",
                "clients": args.clients,
                "seconds": args.seconds,
                "transport": "tcp" if args.tcp else "shared_memory",
                "ops": ops,
                "ops_per_sec": ops / args.seconds,
                "errors": sum(r["errors"] for r in reports),
                "round_p50_ms": statistics.median(latencies) * 1e3,
                "round_p99_ms": latencies[int(0.99 * (len(latencies) - 1))] * 1e3,
                "server_rss_max_mb": max(rss) / 2**20,
                "server_rss_last_mb": rss[-1] / 2**20,
                "l1_budget_mb": args.l1_gb * 1024,
                "psi_cpu_avg10": cpu_pressure(),
            }
        )
    )


if __name__ == "__main__":
    main()
