"""LMCache 0.5.6's CacheGen (``remote_serde: cachegen``; its CPU path: a numba range coder per (layer, channel)) on
the KV ``bench_codecs.py --save-kv`` wrote: ratio, encode / decode time, relative L2 error, and what the decoded
KV does to the model's next-token distributions (``kv_quality``, the same measurement as kvtier's codecs get).

Chunks of 256 tokens, as in ``bench_codecs.py``; its bins for this 30-layer model come from the model's
``config.json`` (keys 32 for layers 0-9 and 16 after, values 32 for layers 0-1 and 16 after). Run with the venv
made by ``setup.sh``, after ``bench_codecs.py``::

    .venv/bin/python benchmarks/bench_codecs.py --reps 7 --save-kv /tmp/smollm2-kv.npz > benchmarks/results/codecs.jsonl
    ~/.cache/kvtier/lmcache-venv/bin/python benchmarks/lmcache_baseline/bench_lmcache_cachegen.py \\
        --kv /tmp/smollm2-kv.npz --reps 7 > benchmarks/results/lmcache_cachegen.jsonl
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from bench_lmcache_engine import emit, setup_env

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
CHUNK = 256


def main() -> None:
    setup_env()
    import numpy as np
    import torch
    from lmcache.storage_backend.serde.cachegen_decoder import CacheGenDeserializer
    from lmcache.storage_backend.serde.cachegen_encoder import CacheGenSerializer
    from lmcache.v1.config import LMCacheEngineConfig
    from lmcache.v1.metadata import LMCacheMetadata
    from transformers import AutoModelForCausalLM

    from kv_quality import compare, continuation_logits

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kv", required=True, help="the .npz bench_codecs.py --save-kv wrote")
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    saved = np.load(args.kv)
    model_dir = str(saved["model_dir"])
    kv = torch.from_numpy(saved["kv"]).to(torch.bfloat16)  # (layers, 2, tokens, heads, head_dim)
    continuation = [int(t) for t in saved["continuation"]]
    layers, _, tokens, heads, head_dim = kv.shape
    config = LMCacheEngineConfig.from_defaults(chunk_size=CHUNK)
    metadata = LMCacheMetadata(model_name=model_dir, world_size=1, local_world_size=1, worker_id=0,
                               local_worker_id=0, kv_dtype=torch.bfloat16,
                               kv_shape=(layers, 2, CHUNK, heads, head_dim))  # fmt: skip
    encoder = CacheGenSerializer(config, metadata)
    decoder = CacheGenDeserializer(config, metadata, torch.bfloat16)
    chunks = [kv[:, :, i : i + CHUNK].contiguous() for i in range(0, tokens, CHUNK)]

    def timed(fn):  # type: ignore[no-untyped-def]
        fn()  # warm-up (numba compiles on first use)
        times = []
        for _ in range(args.reps):
            started = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - started)
        return statistics.median(times), out

    encode_s, encoded = timed(lambda: [encoder.to_bytes(c) for c in chunks])
    decode_s, decoded = timed(lambda: [decoder.from_bytes(b) for b in encoded])
    restored = torch.cat(decoded, dim=2).to(torch.bfloat16)  # from_bytes: (layers, 2, tokens, heads, head_dim)
    nbytes = sum(c.numel() * c.element_size() for c in chunks)
    error = float((restored.float() - kv.float()).norm() / kv.float().norm())
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    reference = continuation_logits(model, kv, continuation)
    quality = compare(reference, continuation_logits(model, restored, continuation))
    emit(op="cachegen", codec="lmcache-cachegen", chunks=len(chunks), bytes=nbytes,
         ratio=nbytes / sum(len(b) for b in encoded), encode_gbps=nbytes / encode_s / 1e9,
         decode_gbps=nbytes / decode_s / 1e9, relative_l2_error=error, **quality)  # fmt: skip
    sys.stdout.flush()
    os._exit(0)  # LMCache's threads would keep the interpreter from exiting


if __name__ == "__main__":
    main()
