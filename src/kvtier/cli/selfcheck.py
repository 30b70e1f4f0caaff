"""``kvtier selfcheck``: prove the configured tiers round-trip KV bit-exactly, and time them.

Runs on the embedded default (memory + local disk under the user cache dir) unless configured otherwise:
stores a synthetic prompt, retrieves it from memory, then from disk alone (memory cleared), checks every byte,
and prints one JSON line of results.
"""

from __future__ import annotations

import argparse
import json
import tempfile

import numpy as np

from kvtier.engine.cache_engine import CacheEngine
from kvtier.memory.layout import KVLayout


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=4096, help="prompt length (default 4096)")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="float16")


def run(args: argparse.Namespace) -> int:
    from kvtier.cli.main import config_from_args

    layout = KVLayout(args.layers, args.kv_heads, args.head_dim, args.dtype)
    with tempfile.TemporaryDirectory(prefix="kvtier-selfcheck-") as scratch:
        nbytes = layout.chunk_bytes(args.tokens)
        budget = max(2 * nbytes / 2**30, 0.01)
        defaults = {"local_disk": scratch, "max_local_disk_size": budget, "max_local_cpu_size": budget}
        config = config_from_args(args, defaults)
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, 32000, args.tokens).tolist()
        raw = rng.integers(0, 256, nbytes, dtype=np.uint8)  # any bit pattern: the check is byte-exact
        kv = raw.view(layout.element.numpy_name).reshape(layout.chunk_shape(args.tokens))
        report: dict[str, object] = {"tokens": args.tokens, "bytes": nbytes, "layout": layout.descriptor()}
        with CacheEngine(config, layout, model_name="kvtier-selfcheck") as engine:
            stored = engine.store(tokens, kv)
            engine.flush()
            report["store_s"] = stored.seconds
            ok = True
            for phase in ("memory", "disk"):
                if phase == "disk":
                    if engine.storage.memory is None or not engine.storage.lower:
                        continue
                    engine.storage.memory.clear()
                result = engine.retrieve(tokens)
                got, expected = result.kv.view(np.uint8), kv[:, :, : result.hit_tokens].view(np.uint8)
                exact = result.hit_tokens > 0 and bool(np.array_equal(got, expected))
                ok &= exact
                report[f"retrieve_{phase}"] = {
                    "hit_tokens": result.hit_tokens,
                    "tiers": result.tier_tokens,
                    "seconds": result.seconds,
                    "bit_exact": exact,
                }
            report["lookup_ms"] = _lookup_ms(engine, tokens)
        report["ok"] = ok
    print(json.dumps(report))
    return 0 if ok else 1


def _lookup_ms(engine: CacheEngine, tokens: list[int]) -> float:
    import time

    times = []
    for _ in range(20):
        started = time.perf_counter()
        engine.lookup(tokens)
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2] * 1e3
