"""``kvtier bench``: a quick store / retrieve / lookup benchmark against a running server, next to the physical
limit measured in the same run (a copy of the same bytes in this process).

Each rep stores a fresh random prompt of ``--tokens`` tokens (so every store writes), retrieves it into a ready
buffer, checks every byte, and looks it up; medians are reported. The prompts are deleted afterwards. The client
takes the server's shared memory when it is on this host (``--tcp`` forces the socket path).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from kvtier.client import KVTierClient
from kvtier.config import KVTierConfig
from kvtier.errors import KVTierError
from kvtier.memory.layout import KVLayout

MODEL = "kvtier-bench"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="the server's data plane (default: server_url, else tcp://<host>:<port>)")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--layout", default="32,8,128", metavar="L,H,D", help="KV layout, fp16 (default Llama-8B's)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tcp", action="store_true", help="never use shared memory")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of lines of text")


def run(args: argparse.Namespace, config: KVTierConfig) -> int:
    url = args.url or config.server_url or f"tcp://{config.host}:{config.port}"
    try:
        layout = KVLayout(*(int(x) for x in args.layout.split(",")), dtype="float16")  # type: ignore[misc]
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"kvtier bench: --layout {args.layout!r}: expected LAYERS,KV_HEADS,HEAD_DIM ({exc})") from None
    try:
        results = bench(url, layout, args.tokens, args.reps, config.auth_token(), not args.tcp)
    except KVTierError as exc:
        print(f"kvtier bench: {url}: {exc}")
        return 1
    if args.json:
        print(json.dumps(results))
        return 0
    print(f"{args.tokens} tokens, {results['bytes'] / 2**20:.1f} MiB, {results['path']} path; "
          f"memcpy here {results['memcpy_gbps']:.2f} GB/s")  # fmt: skip
    for op in ("store", "retrieve", "lookup"):
        r = results[op]
        rate = f", {r['gbps']:.2f} GB/s ({r['gbps'] / results['memcpy_gbps']:.2f} of memcpy)" if "gbps" in r else ""
        print(f"  {op:8s} {r['median_ms']:8.2f} ms{rate}")
    return 0


def bench(url: str, layout: KVLayout, tokens: int, reps: int, token: str | None, shared: bool) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    kv = rng.standard_normal(layout.chunk_shape(tokens)).astype(np.float16)
    out = np.ones_like(kv)  # faulted in before the timing
    copy_target = np.ones_like(kv)
    times: dict[str, list[float]] = {"store": [], "retrieve": [], "lookup": [], "memcpy": []}
    prompts = [rng.integers(0, 50_000, tokens).tolist() for _ in range(reps + 1)]  # one untimed warm-up rep
    with KVTierClient(url, model=MODEL, layout=layout, auth_token=token, shared_memory=None if shared else False,
                      timeout=60.0) as client:  # fmt: skip
        try:
            for rep, ids in enumerate(prompts):
                timed = _timer(times, rep > 0)
                timed("memcpy", lambda: np.copyto(copy_target, kv))
                stored = timed("store", lambda ids=ids: client.store(ids, kv))
                got = timed("retrieve", lambda ids=ids: client.retrieve(ids, out=out))
                timed("lookup", lambda ids=ids: client.lookup(ids))
                cached = stored.stored_tokens + stored.skipped_tokens
                if got.hit_tokens != cached or not np.array_equal(out[:, :, :cached], kv[:, :, :cached]):
                    raise KVTierError(f"rep {rep}: retrieved KV differs from what was stored")
        finally:
            for ids in prompts:
                client.delete(ids)
        path = "shared-memory" if client.shared_memory is not False else "TCP"
    nbytes = layout.chunk_bytes(tokens)
    medians = {op: statistics.median(t) for op, t in times.items()}
    result: dict[str, Any] = {"tokens": tokens, "bytes": nbytes, "path": path, "reps": reps,
                              "memcpy_gbps": nbytes / medians["memcpy"] / 1e9}  # fmt: skip
    for op in ("store", "retrieve", "lookup"):
        result[op] = {"median_ms": medians[op] * 1e3}
        if op != "lookup":
            result[op]["gbps"] = nbytes / medians[op] / 1e9
    return result


def _timer(times: dict[str, list[float]], keep: bool) -> Callable[[str, Callable[[], Any]], Any]:
    def timed(op: str, fn: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        value = fn()
        if keep:
            times[op].append(time.perf_counter() - started)
        return value

    return timed
