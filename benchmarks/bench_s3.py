"""S3 tier throughput next to the raw boto3 client limit, both measured in the same run.

For each workload, one prompt's chunks (payload + the 128-byte header, the objects kvtier stores) are moved in
four ways, always ``--connections`` requests in flight (kvtier's ``remote_max_connections``) and every client
configured alike (the tier's botocore Config: pool size, timeouts, retries, no payload signing or extra checksums):

- ``raw_put_get``: boto3 ``put_object`` / ``get_object().read()``, one object per request, from a thread pool;
- ``raw_transfer``: boto3's managed transfers (the machinery of ``upload_fileobj`` / ``download_fileobj``: 8 MiB
  multipart uploads and ranged downloads) through one TransferManager with ``max_concurrency=connections``;
- ``tier``: kvtier's S3 tier directly: ``put`` of every chunk (``connections`` at a time) and one ``get_many``
  for the prompt (header, checksums, verification and the copy into pool memory included);
- ``engine``: a CacheEngine with memory only staging (``local_cpu: false``): ``store`` + ``flush`` (until written)
  and ``retrieve`` (every chunk read from S3).

The raw client limit is the faster raw way; ``ratio_to_raw`` is kvtier's GB/s over it. The four ways take turns
within every rep (the machine is shared and its load changes), after one untimed round. Writes always go to
absent keys (what earlier stores wrote is deleted, untimed, before each). Starts its own SeaweedFS (``weed mini``
on free loopback ports) unless given ``--endpoint`` (credentials then from ``--access-key``/``--secret-key`` or
the AWS chain). Prints JSON lines::

    python benchmarks/bench_s3.py --reps 5 > benchmarks/results/s3.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from boto3.s3.transfer import TransferConfig, create_transfer_manager

from kvtier import CacheEngine, KVLayout, load_config
from kvtier.codecs.chunk_format import CHUNK_HEADER_SIZE
from kvtier.config import KVTierConfig
from kvtier.memory.pool import MemoryPool
from kvtier.metrics import CacheMetrics
from kvtier.storage.s3 import create_s3_tier, make_client
from kvtier.tokens.keys import CacheKey, Namespace

from common import SHAPES, emit, prompt, random_kv, summary

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "storage"))
from s3_server import seaweed_s3  # the test suite's server helper

BUCKET = "kvtier-bench"
#: name: (shape, tokens, chunk size). llama8b: 16 chunks of 32 MiB (512 MiB); small: 64 chunks of 256 KiB.
WORKLOADS = {"large": ("llama8b", 4096, 256), "small": ("small", 16384, 256)}


class Way:
    """One way of moving the prompt: ``store`` writes it under new names; ``load`` writes the copy ``retrieve``
    reads; ``reset`` (untimed, before every timed call) deletes what earlier stores wrote and waits for any
    background work; ``close`` deletes everything."""

    def store(self) -> None:
        raise NotImplementedError

    def load(self) -> None:
        raise NotImplementedError

    def retrieve(self) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class RawObjects(Way):
    """The prompt as plain objects ``<prefix>/<rep>/<i>``; rep ``read`` is the copy that is read."""

    def __init__(self, client: Any, values: list[bytes], threads: ThreadPoolExecutor) -> None:
        self.client, self.values, self.threads = client, values, threads
        self.prefix = f"raw/{uuid.uuid4().hex}"
        self.rep = 0

    def names(self, rep: int | str) -> list[str]:
        return [f"{self.prefix}/{rep}/{i}" for i in range(len(self.values))]

    def store(self) -> None:
        self.rep += 1
        self.put_all(self.names(self.rep))

    def load(self) -> None:
        self.put_all(self.names("read"))

    def retrieve(self) -> None:
        self.get_all(self.names("read"))

    def reset(self) -> None:
        self._delete(keep=f"{self.prefix}/read/")

    def close(self) -> None:
        self._delete(keep=None)

    def _delete(self, keep: str | None) -> None:
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=self.prefix + "/"):
            names = [{"Key": o["Key"]} for o in page.get("Contents", []) if not keep or not o["Key"].startswith(keep)]
            if names:
                self.client.delete_objects(Bucket=BUCKET, Delete={"Objects": names, "Quiet": True})

    def put_all(self, names: list[str]) -> None:
        raise NotImplementedError

    def get_all(self, names: list[str]) -> None:
        raise NotImplementedError


class RawPutGet(RawObjects):
    def put_all(self, names: list[str]) -> None:
        values = dict(zip(names, self.values, strict=True))
        list(self.threads.map(lambda n: self.client.put_object(Bucket=BUCKET, Key=n, Body=values[n]), names))

    def get_all(self, names: list[str]) -> None:
        list(self.threads.map(lambda n: self.client.get_object(Bucket=BUCKET, Key=n)["Body"].read(), names))


class RawTransfer(RawObjects):
    def __init__(self, client: Any, values: list[bytes], threads: ThreadPoolExecutor, connections: int) -> None:
        super().__init__(client, values, threads)
        self.config = TransferConfig(max_concurrency=connections)  # 8 MiB parts and ranges, boto3's defaults

    def put_all(self, names: list[str]) -> None:
        with create_transfer_manager(self.client, self.config) as manager:
            futures = [manager.upload(io.BytesIO(v), BUCKET, n) for n, v in zip(names, self.values, strict=True)]
            for future in futures:
                future.result()

    def get_all(self, names: list[str]) -> None:
        with create_transfer_manager(self.client, self.config) as manager:
            futures = [manager.download(BUCKET, n, io.BytesIO()) for n in names]
            for future in futures:
                future.result()


class TierWay(Way):
    """The S3 tier directly: chunks in pool memory, ``put`` each (``threads`` at a time), one ``get_many``."""

    def __init__(self, config: KVTierConfig, layout: KVLayout, chunk: int, kv: np.ndarray, threads: ThreadPoolExecutor):
        self.tier = create_s3_tier(f"s3://{BUCKET}/tier-{uuid.uuid4().hex[:8]}", config, CacheMetrics())
        self.threads = threads
        self.namespace = Namespace("bench", layout.descriptor())
        count = kv.shape[2] // chunk
        self.pool = MemoryPool(int(2.2 * count * layout.chunk_bytes(chunk)))
        self.objs = []
        for i in range(count):
            obj = self.pool.allocate(layout, chunk)
            assert obj is not None
            obj.data[:] = np.ascontiguousarray(kv[:, :, i * chunk : (i + 1) * chunk]).reshape(-1).view(np.uint8)
            self.objs.append(obj)
        self.rep = self.deleted = 0

    def keys(self, rep: int) -> list[CacheKey]:
        return [
            self.namespace.key(hashlib.blake2b(f"{rep}/{i}".encode(), digest_size=32).digest())
            for i in range(len(self.objs))
        ]

    def put_all(self, keys: list[CacheKey]) -> None:
        assert all(self.threads.map(lambda i: self.tier.put(keys[i], self.objs[i]), range(len(keys))))

    def store(self) -> None:
        self.rep += 1
        self.put_all(self.keys(self.rep))

    def load(self) -> None:
        self.put_all(self.keys(0))

    def retrieve(self) -> None:
        got = self.tier.get_many(self.keys(0), self.pool.allocate)
        assert all(o is not None for o in got)
        for obj in got:
            obj.unref()  # type: ignore[union-attr]

    def reset(self) -> None:
        for rep in range(self.deleted + 1, self.rep + 1):
            for key in self.keys(rep):
                self.tier.delete(key)
        self.deleted = self.rep

    def close(self) -> None:
        self.tier.clear()
        self.tier.close()
        for obj in self.objs:
            obj.unref()
        self.pool.close()


class EngineWay(Way):
    """A CacheEngine whose memory only stages chunks: every retrieve reads S3; ``store`` includes ``flush``."""

    def __init__(self, config: KVTierConfig, layout: KVLayout, kv: np.ndarray) -> None:
        self.engine = CacheEngine(config, layout, model_name="bench")
        self.kv = kv
        self.out = np.zeros_like(kv)
        self.tokens = kv.shape[2]
        self.seed = self.deleted = 0

    def store(self) -> None:
        self.seed += 1
        self.engine.store(prompt(self.tokens, self.seed), self.kv)
        assert self.engine.flush(600)

    def load(self) -> None:
        self.engine.store(prompt(self.tokens, 0), self.kv)
        assert self.engine.flush(600)

    def retrieve(self) -> None:
        assert self.engine.retrieve(prompt(self.tokens, 0), out=self.out).loaded_tokens == self.tokens

    def check(self) -> None:
        assert np.array_equal(self.out.view(np.uint16), self.kv.view(np.uint16))

    def reset(self) -> None:
        assert self.engine.flush(600)  # a retrieve's promotion offers its chunks back to S3 in the background
        for seed in range(self.deleted + 1, self.seed + 1):
            self.engine.delete(prompt(self.tokens, seed))
        self.deleted = self.seed

    def close(self) -> None:
        self.engine.clear()
        self.engine.close()


def take_turns(ways: dict[str, Way], reps: int) -> dict[str, dict[str, list[float]]]:
    """Seconds of every way's store, then retrieve: ways take turns within each rep; round 0 is untimed."""
    times: dict[str, dict[str, list[float]]] = {name: {"store": [], "retrieve": []} for name in ways}
    for op in ("store", "retrieve"):
        for rep in range(reps + 1):
            for name, way in ways.items():
                if op == "retrieve" and rep == 0:
                    way.load()
                way.reset()
                started = time.perf_counter()
                getattr(way, op)()
                if rep:
                    times[name][op].append(time.perf_counter() - started)
    return times


def bench_workload(name: str, settings: dict[str, Any], connections: int, timeout: float, reps: int) -> None:
    shape, tokens, chunk = WORKLOADS[name]
    layout = KVLayout(*SHAPES[shape])
    count = tokens // chunk
    nbytes = layout.chunk_bytes(tokens)
    config = load_config(
        env={},
        overrides={
            **settings,
            "chunk_size": chunk,
            "local_cpu": False,
            "max_local_cpu_size": 2.5 * nbytes / 2**30,
            "max_background_write_size": 1.5 * nbytes / 2**30,
            "remote_max_connections": connections,
            "remote_timeout_sec": timeout,
            "remote_url": f"s3://{BUCKET}/engine-{uuid.uuid4().hex[:8]}",
        },
    )
    client = make_client(config)  # the raw client: the same Config as the tier's
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=BUCKET)
    kv = random_kv(layout, tokens, 0)
    value = memoryview(random_kv(layout, chunk, 1)).cast("B")
    values = [bytes(value) + bytes(CHUNK_HEADER_SIZE) for _ in range(count)]  # the size of a stored chunk
    with ThreadPoolExecutor(connections) as threads:
        engine = EngineWay(config, layout, kv)
        ways: dict[str, Way] = {
            "raw_put_get": RawPutGet(client, values, threads),
            "raw_transfer": RawTransfer(client, values, threads, connections),
            "tier": TierWay(config, layout, chunk, kv, threads),
            "engine": engine,
        }
        try:
            results = take_turns(ways, reps)
            engine.check()
        finally:
            for way in ways.values():
                way.close()
    base = {
        "bench": "s3",
        "workload": name,
        "shape": shape,
        "tokens": tokens,
        "chunk_bytes": layout.chunk_bytes(chunk),
        "chunks": count,
        "bytes": nbytes,
        "connections": connections,
    }
    for op in ("store", "retrieve"):
        raw = max(summary(results[w][op], nbytes)["gbps"] for w in ("raw_put_get", "raw_transfer"))
        for way, times in results.items():
            s = summary(times[op], nbytes)
            emit({**base, "op": op, "path": way, **s, "raw_gbps": raw, "ratio_to_raw": s["gbps"] / raw})


@contextlib.contextmanager
def s3_settings(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """Endpoint and credentials: the given server, or a SeaweedFS started for the run."""
    if args.endpoint:
        yield {
            "s3_endpoint_url": args.endpoint,
            "s3_region": args.region,
            "s3_access_key_id": args.access_key,
            "s3_secret_access_key": args.secret_key,
        }
        return
    with seaweed_s3() as server:
        yield {
            "s3_endpoint_url": server.endpoint,
            "s3_region": server.region,
            "s3_access_key_id": server.access_key,
            "s3_secret_access_key": server.secret_key,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=60.0, help="remote_timeout_sec (a busy server is slow)")
    parser.add_argument("--endpoint", help="an S3-compatible endpoint to use instead of starting SeaweedFS")
    parser.add_argument("--region", default=None)
    parser.add_argument("--access-key", default=None, help="default: the AWS credential chain")
    parser.add_argument("--secret-key", default=None)
    args = parser.parse_args()
    with s3_settings(args) as settings:
        for name in args.workloads:
            bench_workload(name, settings, args.connections, args.timeout, args.reps)


if __name__ == "__main__":
    main()
