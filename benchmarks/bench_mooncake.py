"""Mooncake Store tier throughput next to the raw client limit, both measured in the same reps.

A real Mooncake Store on loopback (``mooncake_master`` + a standalone ``mooncake_client`` holding the pool, TCP
transport), started here. For each shape, one prompt of ``--tokens`` tokens is ``tokens / chunk_size`` values of
one chunk each (payload + the 128-byte header), moved three ways:

- ``raw_client``: Mooncake's own Python client on buffers registered with it: ``batch_put_from`` /
  ``batch_get_into`` (zero-copy, the transfer engine's best: the limit) and ``put_batch`` / ``get_batch`` of bytes;
- ``tier``: kvtier's Mooncake tier: ``put`` chunk by chunk, ``put_many`` as the background writer hands chunks
  over, one ``get_many`` (header, checksums, verification and the copy into pool memory included);
- ``engine``: a CacheEngine with memory only staging: ``store`` + ``flush`` and ``retrieve`` of a prompt.

The cases take turns rep by rep (after one untimed warm-up rep); medians are reported. Writes go to absent names::

    python benchmarks/bench_mooncake.py --shapes llama8b small --reps 7 > benchmarks/results/mooncake.jsonl
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
from mooncake.store import MooncakeDistributedStore

from kvtier.storage.mooncake import create_mooncake_tier, regex_prefix
from remote_cases import Backend, Case, bench_shapes

from common import emit, shape_parser

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "storage"))
from mooncake_servers import MooncakeStore  # the test suite's store helper


@contextmanager
def raw_client(store: MooncakeStore, values: list[np.ndarray]) -> Iterator[list[Case]]:
    client = MooncakeDistributedStore()
    buffer = sum(v.nbytes for v in values) + (64 << 20)
    assert client.setup("127.0.0.1", store.metadata, 0, buffer, "tcp", "", f"127.0.0.1:{store.rpc_port}") == 0
    names = [f"bench/raw/{i}" for i in range(len(values))]
    received = [np.ones_like(v) for v in values]  # pre-faulted
    blobs = [v.tobytes() for v in values]
    for array in (*values, *received):
        assert client.register_buffer(array.ctypes.data, array.nbytes) == 0
    sizes = [v.nbytes for v in values]

    def clear() -> None:
        client.remove_by_regex(regex_prefix("bench/raw/"), True)

    def put_from() -> None:
        assert client.batch_put_from(names, [v.ctypes.data for v in values], sizes) == [0] * len(names)

    def get_into() -> None:
        got = client.batch_get_into(names, [r.ctypes.data for r in received], sizes)
        assert got == sizes, got

    try:
        yield [
            Case("raw_client", "put_from", put_from, clear),
            Case("raw_client", "put_batch", lambda: client.put_batch(names, blobs), clear),
            Case("raw_client", "get_into", get_into),
            Case("raw_client", "get_batch", lambda: client.get_batch(names)),
        ]
        get_into()
        assert all(np.array_equal(r, v) for r, v in zip(received, values, strict=True))
    finally:
        clear()
        for array in (*values, *received):
            client.unregister_buffer(array.ctypes.data)
        client.close()


def main() -> None:
    parser = shape_parser(__doc__)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kvtier-bench-mooncake-") as root:
        # The pool holds every case's prompt; kvtier's transfer buffer is the default (512 MiB); reads of a
        # 512 MiB prompt outlast a short lease (a get whose lease expires mid-transfer fails: LEASE_EXPIRED).
        store = MooncakeStore(Path(root), pool_mb=8192, lease_ms=10_000, client_buffer_mb=512).start()
        try:
            emit({"bench": "mooncake", "op": "meta"})
            limits = ("put_from", "put_batch"), ("get_into", "get_batch")
            backend = Backend(
                "mooncake", store.url, create_mooncake_tier, "mooncake", [partial(raw_client, store)], *limits
            )
            bench_shapes(backend, args, store.pids)
        finally:
            store.stop()


if __name__ == "__main__":
    main()
