"""GPU <-> kvtier transfer throughput next to raw pinned cudaMemcpy measured in the same run.

Store = device-to-host copy of a prompt's KV from a CUDA tensor into kvtier chunks; retrieve = host-to-device
copy of the cached chunks into a CUDA tensor. Both with the arena page-locked (``pin_local_cpu``) and not.
Needs torch with CUDA. Prints JSON lines.

    python benchmarks/bench_cuda.py --tokens 4096 --reps 10
"""

from __future__ import annotations

import argparse

import torch

from kvtier import CacheEngine, KVLayout, load_config

from common import SHAPES, emit, summary, timed


def cuda_timed(fn, reps: int) -> list[float]:  # type: ignore[no-untyped-def]
    def synced() -> None:
        fn()
        torch.cuda.synchronize()

    return timed(synced, reps, warmup=2)


def raw_limits(nbytes: int, reps: int) -> dict[str, float]:
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    pageable = torch.empty(nbytes, dtype=torch.uint8)
    pageable.fill_(1)
    return {
        "raw_h2d_pinned_gbps": summary(cuda_timed(lambda: dev.copy_(pinned, non_blocking=True), reps), nbytes)["gbps"],
        "raw_d2h_pinned_gbps": summary(cuda_timed(lambda: pinned.copy_(dev, non_blocking=True), reps), nbytes)["gbps"],
        "raw_h2d_pageable_gbps": summary(cuda_timed(lambda: dev.copy_(pageable), reps), nbytes)["gbps"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama8b", choices=sorted(SHAPES))
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    layout = KVLayout(*SHAPES[args.shape])
    nbytes = layout.chunk_bytes(args.tokens)
    limits = raw_limits(nbytes, args.reps)
    base = {
        "bench": "cuda",
        "device": torch.cuda.get_device_name(),
        "shape": args.shape,
        "tokens": args.tokens,
        "bytes": nbytes,
        **limits,
    }
    for pinned in (False, True):
        store, retrieve = bench_engine(layout, args.tokens, pinned, args.reps)
        s = summary(store, nbytes)
        emit(
            {
                **base,
                "pinned_arena": pinned,
                "op": "store_d2h",
                **s,
                "ratio_to_raw": s["gbps"] / limits["raw_d2h_pinned_gbps"],
            }
        )
        s = summary(retrieve, nbytes)
        emit(
            {
                **base,
                "pinned_arena": pinned,
                "op": "retrieve_h2d",
                **s,
                "ratio_to_raw": s["gbps"] / limits["raw_h2d_pinned_gbps"],
            }
        )


def bench_engine(layout: KVLayout, num_tokens: int, pinned: bool, reps: int) -> tuple[list[float], list[float]]:
    """Store (fresh prompts) and retrieve (one cached prompt) timings between a CUDA tensor and the engine."""
    kv = torch.randn(layout.chunk_shape(num_tokens), device="cuda").to(torch.float16)
    out = torch.empty_like(kv)
    budget = 3 * layout.chunk_bytes(num_tokens) / 2**30
    config = load_config(env={}, overrides={"max_local_cpu_size": budget, "pin_local_cpu": pinned})
    seeds = iter(range(10**6))
    tokens = list(range(num_tokens))
    with CacheEngine(config, layout, model_name="bench") as engine:
        store = cuda_timed(lambda: engine.store([next(seeds), *range(num_tokens - 1)], kv), reps)
        engine.store(tokens, kv)
        retrieve = cuda_timed(lambda: engine.retrieve(tokens, out=out), reps)
        assert torch.equal(out.view(torch.int16), kv.view(torch.int16))
    return store, retrieve


if __name__ == "__main__":
    main()
