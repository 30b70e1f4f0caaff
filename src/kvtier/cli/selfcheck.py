"""``kvtier selfcheck``: prove the configured tiers round-trip KV bit-exactly, and time them.

Runs on the embedded default (memory + local disk under the user cache dir) unless configured otherwise:
stores synthetic prompts and retrieves each from memory (the first round also faults in fresh cache memory), then
retrieves the last from disk alone (memory cleared), checks every byte, and prints one JSON line of results.
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
    parser.add_argument("--rounds", type=int, default=3, help="prompts stored and retrieved from memory")


def run(args: argparse.Namespace) -> int:
    from kvtier.cli.main import config_from_args

    layout = KVLayout(args.layers, args.kv_heads, args.head_dim, args.dtype)
    nbytes = layout.chunk_bytes(args.tokens)
    with tempfile.TemporaryDirectory(prefix="kvtier-selfcheck-") as scratch:
        budget = max((args.rounds + 1) * nbytes / 2**30, 0.01)
        defaults = {"local_disk": scratch, "max_local_disk_size": budget, "max_local_cpu_size": budget}
        config = config_from_args(args, defaults)
        rng = np.random.default_rng(0)
        raw = rng.integers(0, 256, nbytes, dtype=np.uint8)  # any bit pattern: the check is byte-exact
        kv = raw.view(layout.element.numpy_name).reshape(layout.chunk_shape(args.tokens))
        out = np.zeros_like(kv)  # written once here, so retrieves do not time page faults of a new array
        report: dict[str, object] = {"tokens": args.tokens, "bytes": nbytes, "layout": layout.descriptor()}
        ok = True
        with CacheEngine(config, layout, model_name="kvtier-selfcheck") as engine:
            # Round 1 faults in fresh cache memory; later rounds show the steady state.
            for round_ in range(1, args.rounds + 1):
                tokens = rng.integers(0, 32000, args.tokens).tolist()
                stored = engine.store(tokens, kv)
                exact = _retrieve_exact(engine, tokens, kv, out, report, f"round{round_}_retrieve_memory")
                report[f"round{round_}_store_gbps"] = nbytes / stored.seconds / 1e9
                ok &= exact
            engine.flush()
            if engine.storage.memory is not None and engine.storage.lower:
                engine.storage.memory.clear()
                ok &= _retrieve_exact(engine, tokens, kv, out, report, "retrieve_disk")
            report["lookup_ms"] = _lookup_ms(engine, tokens)
        report["ok"] = ok
    print(json.dumps(report))
    return 0 if ok else 1


def _retrieve_exact(
    engine: CacheEngine, tokens: list[int], kv: np.ndarray, out: np.ndarray, report: dict[str, object], name: str
) -> bool:
    out.fill(0)
    result = engine.retrieve(tokens, out=out)
    exact = result.hit_tokens == len(tokens) and bool(np.array_equal(out.view(np.uint8), kv.view(np.uint8)))
    report[name] = {
        "hit_tokens": result.hit_tokens,
        "tiers": result.tier_tokens,
        "gbps": kv.nbytes / result.seconds / 1e9,
        "bit_exact": exact,
    }
    return exact


def _lookup_ms(engine: CacheEngine, tokens: list[int]) -> float:
    import time

    times = []
    for _ in range(20):
        started = time.perf_counter()
        engine.lookup(tokens)
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2] * 1e3
