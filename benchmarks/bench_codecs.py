"""Payload codecs on real KV: compression ratio, encode / decode GB/s next to memcpy, what the decoded KV does to
the model's next-token distributions, and remote retrieves of compressed vs raw chunks from Redis and S3
(SeaweedFS) in the same run.

The KV is SmolLM2-135M-Instruct's own (30 layers x 3 KV heads x 64, bf16 as served), for a 2048-token prompt of
the seeded QA set, in chunks of 256 tokens (8 chunks of 5.6 MiB). For each codec the chunks are encoded and
decoded ``--reps`` times (medians; the memcpy of the same bytes is timed in the same reps); the decoded KV is
compared with the original (relative L2 error; lossless: bit for bit) and the model reads the text's next 32
tokens over it (``kv_quality``: mean KL and top-1 agreement against exact KV). Then the chunks are stored through
a Redis tier and an S3 tier with ``remote_serde`` set to the codec and read back with one ``get_many`` per rep
(decoding included). ``--save-kv FILE`` writes the KV and the continuation for LMCache's CacheGen on the same
bytes (``lmcache_baseline/bench_lmcache_cachegen.py``)::

    python benchmarks/bench_codecs.py --reps 7 --save-kv /tmp/smollm2-kv.npz > benchmarks/results/codecs.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvtier import load_config
from kvtier.codecs.registry import codec_named
from kvtier.integrations.models import prepare_model
from kvtier.integrations.transformers.cached_model import kv_layout_of
from kvtier.memory.layout import KVLayout
from kvtier.memory.pool import MemoryPool
from kvtier.metrics import CacheMetrics
from kvtier.quality.qa import make_qa_set
from kvtier.storage.registry import create_remote_tier
from kvtier.tokens.keys import Namespace

from common import emit, summary, timed
from kv_quality import compare, continuation_logits

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "storage"))
from redis_servers import RedisServer  # the test suite's server helpers
from s3_server import seaweed_s3

CODECS = ("naive", "lossless", "int8", "int4", "cachegen", "cachegen-hq")
CHUNK = 256
CONTINUATION = 32


class RealKV:
    """SmolLM2 (bf16), a QA-set text's first ``tokens`` tokens as the context (its KV, ``(layers, 2, tokens, heads,
    head_dim)``) and the next :data:`CONTINUATION` as the continuation the model reads over it."""

    def __init__(self, tokens: int) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_dir = prepare_model()
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.bfloat16).eval()
        tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        text = "\n\n".join(p for c in make_qa_set(seed=0).contexts[:8] for p in c.passages)
        ids = tokenizer(text).input_ids[: tokens + CONTINUATION]
        self.continuation = ids[tokens:]
        with torch.no_grad():
            cache = self.model(torch.tensor([ids[:tokens]]), use_cache=True).past_key_values
        layers = [torch.stack([layer.keys[0], layer.values[0]]).transpose(1, 2) for layer in cache.layers]
        self.layout = kv_layout_of(self.model)
        self.kv = torch.stack(layers).contiguous()
        self.reference = continuation_logits(self.model, self.kv, self.continuation)

    def quality(self, kv: torch.Tensor) -> dict[str, float]:
        return compare(self.reference, continuation_logits(self.model, kv, self.continuation))

    def save(self, path: str) -> None:
        kv = self.kv.float().numpy()
        np.savez(path, kv=kv, continuation=np.array(self.continuation), model_dir=str(self.model_dir))


def chunk_objs(pool: MemoryPool, layout: KVLayout, kv: torch.Tensor) -> list[Any]:
    objs = []
    for start in range(0, kv.shape[2], CHUNK):
        obj = pool.allocate(layout, CHUNK)
        obj.tensor().copy_(kv[:, :, start : start + CHUNK])
        objs.append(obj)
    return objs


def relative_error(objs: list[Any], got: list[Any]) -> float:
    num = sum(float((g.tensor().float() - o.tensor().float()).norm() ** 2) for o, g in zip(objs, got, strict=True))
    den = sum(float(o.tensor().float().norm() ** 2) for o in objs)
    return (num / den) ** 0.5


def bench_kernels(objs: list[Any], real: RealKV, reps: int) -> dict[str, float]:
    """Ratio, GB/s and quality of each codec on the chunks, with memcpy of the same bytes in the same reps."""
    layout = real.layout
    nbytes = sum(o.nbytes for o in objs)
    source = np.concatenate([o.data for o in objs])
    target = np.empty_like(source)
    memcpy = summary(timed(lambda: np.copyto(target, source), reps), nbytes)["gbps"]
    emit({"bench": "codecs", "op": "memcpy", "bytes": nbytes, "gbps": memcpy})
    ratios = {}
    for name in CODECS:
        codec = codec_named(name)
        payloads = [memoryview(o.data) for o in objs]
        encoded = [codec.encode(p, layout, CHUNK) for p in payloads]
        outs = [memoryview(bytearray(o.nbytes)) for o in objs]
        enc = summary(timed(lambda c=codec, ps=payloads: [c.encode(p, layout, CHUNK) for p in ps], reps), nbytes)

        def decode(c: Any = codec, es: list[Any] = encoded, os: list[Any] = outs) -> None:
            for e, out in zip(es, os, strict=True):
                c.decode(memoryview(e), layout, CHUNK, out)

        dec = summary(timed(decode, reps), nbytes)
        exact = all(bytes(out) == bytes(o.data) for out, o in zip(outs, objs, strict=True))
        ratios[name] = nbytes / sum(len(memoryview(e).cast("B")) for e in encoded)
        dtype = objs[0].tensor().dtype
        decoded = torch.cat([torch.frombuffer(out, dtype=dtype).view(layout.chunk_shape(CHUNK)) for out in outs], dim=2)
        error = float((decoded.float() - real.kv.float()).norm() / real.kv.float().norm())
        emit({"bench": "codecs", "op": "kernels", "codec": name, "ratio": ratios[name], "encode_gbps": enc["gbps"],
              "decode_gbps": dec["gbps"], "decode_to_memcpy": dec["gbps"] / memcpy, "bit_exact": exact,
              "relative_l2_error": error, **real.quality(decoded)})  # fmt: skip
    return ratios


def bench_remote(kind: str, settings: dict[str, Any], objs: list[Any], pool: MemoryPool, reps: int) -> None:
    layout = objs[0].layout
    namespace = Namespace("smollm2-bench", layout.descriptor())
    nbytes = sum(o.nbytes for o in objs)
    for name in CODECS:
        config = load_config(env={}, overrides={**settings, "remote_serde": name, "remote_timeout_sec": 60,
                                                "remote_prefix": f"bench-{uuid.uuid4().hex[:8]}"})  # fmt: skip
        tier = create_remote_tier(config.remote_url, config, CacheMetrics())
        keys = [namespace.key(uuid.uuid4().bytes * 2) for _ in objs]
        assert tier.put_many(keys, objs) == len(objs)

        def read(t: Any = tier, ks: list[Any] = keys) -> None:
            for got in t.get_many(ks, pool.allocate):
                got.unref()

        s = summary(timed(read, reps), nbytes)
        got = tier.get_many(keys, pool.allocate)
        error = relative_error(objs, got)
        for g in got:
            g.unref()
        tier.clear()
        tier.close()
        emit({"bench": "codecs", "op": "remote_retrieve", "store": kind, "codec": name, **s,
              "relative_l2_error": error})  # fmt: skip


@contextlib.contextmanager
def stores() -> Iterator[dict[str, dict[str, Any]]]:
    with tempfile.TemporaryDirectory(prefix="kvtier-bench-codecs-") as root, seaweed_s3() as s3:
        redis = RedisServer(Path(root)).start()
        try:
            yield {
                "redis": {"remote_url": redis.url},
                "s3": {"remote_url": "s3://kvtier-bench/codecs", "s3_endpoint_url": s3.endpoint, "s3_region": s3.region,
                       "s3_access_key_id": s3.access_key, "s3_secret_access_key": s3.secret_key},
            }  # fmt: skip
        finally:
            redis.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--save-kv", metavar="FILE", help="also write the KV and continuation (.npz) for LMCache")
    args = parser.parse_args()
    real = RealKV(args.tokens)
    if args.save_kv:
        real.save(args.save_kv)
    pool = MemoryPool(1 << 30)
    objs = chunk_objs(pool, real.layout, real.kv)
    emit({"bench": "codecs", "op": "meta", "layout": str(real.layout), "chunks": len(objs), "chunk_tokens": CHUNK})
    bench_kernels(objs, real, args.reps)
    with stores() as settings:
        for kind, store_settings in settings.items():
            bench_remote(kind, store_settings, objs, pool, args.reps)
    emit({"bench": "codecs", "op": "end"})


if __name__ == "__main__":
    main()
