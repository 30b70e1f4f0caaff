"""DiskTier: the storage contract, restarts, the size budget, corruption handling and crash safety."""

from __future__ import annotations

import inspect
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from contract import Content, StorageTierContract, read, store

import kvtier.storage.disk as disk_module
from kvtier.codecs.chunk_format import CHUNK_HEADER_SIZE
from kvtier.codecs.registry import codec_named
from kvtier.memory.layout import KVLayout
from kvtier.memory.pool import MemoryPool
from kvtier.metrics import CacheMetrics
from kvtier.storage.disk import DiskTier
from kvtier.storage.eviction import EVICTION_POLICIES, LRUPolicy, make_policy
from kvtier.tokens.keys import CacheKey

FILE_BYTES = CHUNK_HEADER_SIZE + 4096  # one full test chunk on disk


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "disk"


def open_tier(root: Path, capacity: int = 64 << 20, metrics: CacheMetrics | None = None, **kw) -> DiskTier:
    return DiskTier(root, capacity, LRUPolicy(), metrics, **kw)


def chunk_files(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("*/*/*") if p.name.endswith(".kvt"))


class TestDiskTierContract(StorageTierContract):
    @pytest.fixture(params=sorted(EVICTION_POLICIES))
    def tier(self, root: Path, request: pytest.FixtureRequest, metrics: CacheMetrics) -> Iterator[DiskTier]:
        t = DiskTier(root, 64 << 20, make_policy(request.param), metrics)
        yield t
        t.close()


class TestLosslessDiskTierContract(StorageTierContract):
    """The whole contract with every payload compressed (the contract's chunks are random bytes: exact or nothing)."""

    @pytest.fixture
    def tier(self, root: Path, metrics: CacheMetrics) -> Iterator[DiskTier]:
        pytest.importorskip("blosc2")
        t = DiskTier(root, 64 << 20, LRUPolicy(), metrics, codec=codec_named("lossless"))
        yield t
        t.close()


@pytest.fixture
def disk(root: Path, metrics: CacheMetrics) -> DiskTier:
    return open_tier(root, metrics=metrics)


# -- files and restarts -----------------------------------------------------------------------------------------


def test_one_checksummed_file_per_chunk(disk: DiskTier, make_obj, make_keys, namespace, root: Path) -> None:
    """Each chunk is one header+payload file under its namespace dir, with a namespace.json beside it."""
    keys = make_keys(3)
    store(disk, make_obj, keys, 32)
    assert chunk_files(root) == sorted(disk.path_for(k.id) for k in keys)
    assert all(p.stat().st_size == FILE_BYTES for p in chunk_files(root))
    assert disk.usage().used_bytes == 3 * FILE_BYTES
    meta = json.loads((root / namespace.digest.hex() / "namespace.json").read_text())
    assert meta == namespace.describe()
    assert not list(root.rglob("*.tmp.*"))


def test_restart_recovers_every_chunk(root: Path, make_obj, make_keys, pool: MemoryPool, content: Content) -> None:
    """A new DiskTier on the same directory finds every chunk, with identical usage and bytes."""
    keys = make_keys(12)
    first = open_tier(root)
    for i, key in enumerate(keys):
        store(first, make_obj, [key], 1 + 5 * i)
    before = first.usage()
    first.close()
    second = open_tier(root)
    assert second.usage() == before
    for i, key in enumerate(keys):
        got = read(second, key, pool.allocate)
        assert got is not None
        assert got == (1 + 5 * i, content(key.id, len(got[1])).tobytes())


def test_restart_with_a_smaller_budget_evicts_the_oldest(root: Path, make_obj, make_keys, pool, content) -> None:
    """Restarting with less capacity evicts (oldest modification first) down to the new budget."""
    keys = make_keys(10)
    store(open_tier(root), make_obj, keys, 32)
    disk = open_tier(root)
    for i, key in enumerate(keys):  # make the age order explicit
        os.utime(disk.path_for(key.id), (1_000_000 + i, 1_000_000 + i))
    metrics = CacheMetrics()
    smaller = open_tier(root, capacity=4 * FILE_BYTES + 100, metrics=metrics)
    usage = smaller.usage()
    assert (usage.chunks, usage.used_bytes) == (4, 4 * FILE_BYTES)
    assert [smaller.contains(k) for k in keys] == [False] * 6 + [True] * 4
    assert len(chunk_files(root)) == 4
    assert metrics.evictions.value(tier="disk") == 6
    assert all(read(smaller, k, pool.allocate) is not None for k in keys[6:])


def test_leftover_temporary_files_are_removed_at_start(disk: DiskTier, root: Path, make_obj, make_keys) -> None:
    """Temp files of a writer that died mid-write are deleted on start; stray files are never indexed."""
    keys = make_keys(3)
    store(disk, make_obj, keys[:2], 32)
    final = disk.path_for(keys[0].id)
    leftovers = [
        final.with_name(final.name + ".tmp.4242.0"),
        disk.path_for(keys[2].id).with_name(disk.path_for(keys[2].id).name + ".tmp.1.7"),
    ]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half a chunk")
    stray = final.with_name("not-a-key.kvt")
    stray.write_bytes(b"junk")
    reopened = open_tier(root)
    assert not any(p.exists() for p in leftovers)
    assert reopened.usage().chunks == 2
    assert reopened.contains(keys[0]) and not reopened.contains(keys[2])
    assert stray.exists()  # not ours to delete, and not a chunk


def test_fsync_mode_round_trips(root: Path, make_obj, make_keys, pool, content) -> None:
    """With fsync on, chunks are written and read back the same."""
    disk = open_tier(root, fsync=True)
    keys = make_keys(2)
    store(disk, make_obj, keys, 32)
    for key in keys:
        got = read(disk, key, pool.allocate)
        assert got is not None and got[1] == content(key.id, len(got[1])).tobytes()


# -- budget and pins ---------------------------------------------------------------------------------------------


def test_size_budget_is_respected(root: Path, make_obj, make_keys, metrics) -> None:
    """Writing 4x the budget keeps the files on disk within it; eviction removes the files."""
    disk = open_tier(root, capacity=5 * FILE_BYTES, metrics=metrics)
    for key in make_keys(20):
        store(disk, make_obj, [key], 32)
        assert disk.usage().used_bytes <= 5 * FILE_BYTES
        assert sum(p.stat().st_size for p in chunk_files(root)) <= 5 * FILE_BYTES
    assert disk.usage().chunks == len(chunk_files(root)) == 5
    assert metrics.evictions.value(tier="disk") == 15


def test_chunk_larger_than_the_budget_is_refused(root: Path, make_obj, make_keys, metrics) -> None:
    """A chunk that can never fit is refused (counted as full) without evicting anything."""
    disk = open_tier(root, capacity=2 * FILE_BYTES, metrics=metrics)
    small, big = make_keys(2)
    store(disk, make_obj, [small], 32)
    obj = make_obj(big, 96)
    assert disk.put(big, obj) is False
    obj.unref()
    assert metrics.errors.value(tier="disk", kind="full") == 1
    assert disk.contains(small) and not disk.contains(big)


def test_pinned_chunks_are_not_evicted(root: Path, make_obj, make_keys, metrics) -> None:
    """With every chunk pinned a full tier refuses new chunks; after unpinning it evicts again."""
    disk = open_tier(root, capacity=3 * FILE_BYTES, metrics=metrics)
    keys = make_keys(4)
    store(disk, make_obj, keys[:3], 32)
    assert disk.pin(keys) == keys[:3]
    obj = make_obj(keys[3])
    assert disk.put(keys[3], obj) is False
    assert metrics.errors.value(tier="disk", kind="full") == 1
    assert all(disk.contains(k) for k in keys[:3])
    disk.unpin(keys[1:2])
    assert disk.put(keys[3], obj) is True
    obj.unref()
    assert not disk.contains(keys[1])
    disk.unpin([keys[0], keys[2]])
    assert disk.usage().pinned_chunks == 0


def test_concurrent_puts_of_one_key_store_it_once(disk: DiskTier, make_obj, make_keys, monkeypatch, pool) -> None:
    """Two writers racing on one key (slow disk): one wins, the other gets False; usage counts it once."""
    (key,) = make_keys(1)
    write_file = disk._write_file

    def slow_write(*args) -> None:
        time.sleep(0.1)
        write_file(*args)

    monkeypatch.setattr(disk, "_write_file", slow_write)
    objs = [make_obj(key) for _ in range(2)]
    results: list[bool] = []
    threads = [threading.Thread(target=lambda o=o: results.append(disk.put(key, o))) for o in objs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    for obj in objs:
        obj.unref()
    assert sorted(results) == [False, True]
    assert disk.usage().used_bytes == FILE_BYTES
    assert disk.delete(key)
    assert disk.usage().used_bytes == 0


def test_failed_write_leaves_no_trace(disk: DiskTier, make_obj, make_keys, monkeypatch, metrics, root) -> None:
    """A write that fails mid-file (disk full) is an io error: no chunk, no temp file, no space held."""
    keys = make_keys(2)

    def disk_full(fd: int, data) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(disk_module, "_write_all", disk_full)
    obj = make_obj(keys[0])
    assert disk.put(keys[0], obj) is False
    assert metrics.errors.value(tier="disk", kind="io") == 1
    assert not disk.contains(keys[0])
    assert disk.usage().used_bytes == 0 and disk._reserved == 0
    assert not list(root.rglob("*.tmp.*"))
    monkeypatch.undo()
    assert disk.put(keys[0], obj) is True  # the key is not stuck as "being written"
    obj.unref()


# -- damaged files ---------------------------------------------------------------------------------------------


def _damage_and_read(disk: DiskTier, key: CacheKey, pool: MemoryPool, damage) -> None:
    """Apply ``damage(path)`` to the stored file; the read must miss, forget the chunk and free its buffer."""
    path = disk.path_for(key.id)
    damage(path)
    used = disk.usage().used_bytes
    assert disk.get(key, pool.allocate) is None
    assert not path.exists()
    assert not disk.contains(key)
    assert disk.usage().used_bytes < used
    assert pool.live_objects == 0
    assert disk.get(key, pool.allocate) is None  # and stays a plain miss


def _flip(offset: int):
    def damage(path: Path) -> None:
        raw = bytearray(path.read_bytes())
        raw[offset] ^= 0x40
        path.write_bytes(bytes(raw))

    return damage


def _reseal(raw: bytearray) -> None:
    raw[CHUNK_HEADER_SIZE - 4 : CHUNK_HEADER_SIZE] = zlib.crc32(bytes(raw[: CHUNK_HEADER_SIZE - 4])).to_bytes(
        4, "little"
    )


def _set_tokens(path: Path) -> None:
    """Change the token count (offset 24) and fix the header checksum, as a careless hand edit would."""
    raw = bytearray(path.read_bytes())
    struct.pack_into("<I", raw, 24, 5)
    _reseal(raw)
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    ("damage", "kind"),
    [
        (_flip(CHUNK_HEADER_SIZE + 100), "corrupt"),  # one payload bit
        (_flip(CHUNK_HEADER_SIZE + 4095), "corrupt"),  # the last payload byte
        (_flip(0), "corrupt"),  # magic
        (_flip(30), "corrupt"),  # a header field, checksum not updated
        (_set_tokens, "corrupt"),  # a header field, checksum updated
        (lambda p: os.truncate(p, CHUNK_HEADER_SIZE + 2000), "truncated"),  # torn payload
        (lambda p: os.truncate(p, 60), "truncated"),  # torn header
        (lambda p: os.truncate(p, 0), "truncated"),
    ],
    ids=[
        "payload-bit",
        "last-byte",
        "magic",
        "header-field",
        "header-resealed",
        "torn-payload",
        "torn-header",
        "empty",
    ],
)
def test_damaged_chunk_is_a_counted_miss(disk: DiskTier, make_obj, make_keys, pool, metrics, damage, kind) -> None:
    """Every kind of damage gives None, one errors{tier=disk,kind} count, and the file removed."""
    keys = make_keys(2)
    store(disk, make_obj, keys, 32)
    _damage_and_read(disk, keys[0], pool, damage)
    assert metrics.errors.value(tier="disk", kind=kind) == 1
    assert metrics.errors.total() == 1
    assert read(disk, keys[1], pool.allocate) is not None  # its neighbour is unaffected


def test_chunk_copied_under_another_keys_name_is_rejected(disk, make_obj, make_keys, pool, metrics, content) -> None:
    """A valid file renamed or copied to another key's path never serves that key."""
    a, b = make_keys(2)
    store(disk, make_obj, [a, b], 32)
    shutil.copyfile(disk.path_for(a.id), disk.path_for(b.id))
    _damage_and_read(disk, b, pool, lambda p: None)
    assert metrics.errors.value(tier="disk", kind="corrupt") == 1
    got = read(disk, a, pool.allocate)
    assert got is not None and got[1] == content(a.id, len(got[1])).tobytes()


def test_file_removed_behind_the_tiers_back(disk: DiskTier, make_obj, make_keys, pool, metrics) -> None:
    """A chunk whose file vanished is an io miss and is forgotten."""
    (key,) = make_keys(1)
    store(disk, make_obj, [key], 32)
    _damage_and_read(disk, key, pool, lambda p: p.unlink())
    assert metrics.errors.value(tier="disk", kind="io") == 1


def test_read_without_memory_keeps_the_chunk(disk: DiskTier, make_obj, make_keys, pool, metrics) -> None:
    """If the allocator has no memory the read misses (no_memory) but the chunk stays on disk."""
    (key,) = make_keys(1)
    store(disk, make_obj, [key], 32)
    assert disk.get(key, lambda layout, n: None) is None
    assert metrics.errors.value(tier="disk", kind="no_memory") == 1
    assert disk.contains(key)
    assert read(disk, key, pool.allocate) is not None
    assert disk.usage().pinned_chunks == 0


# -- crash safety --------------------------------------------------------------------------------------------------

CRASH_KEYS = 100


def crash_tokens(i: int) -> int:
    """Token count of crash-test chunk ``i``: 64 to 511 tokens (8 to 64 KiB), so kills often land mid-write."""
    return 64 + (i * 37) % 448


_WRITER = """
import hashlib, random, sys
import numpy as np
from kvtier.memory.layout import KVLayout
from kvtier.memory.pool import MemoryPool
from kvtier.storage.disk import DiskTier
from kvtier.storage.eviction import LRUPolicy
from kvtier.tokens.keys import Namespace

{helpers}

layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16")
namespace = Namespace("test-model", layout.descriptor())
tier = DiskTier(sys.argv[1], 40 * 40_000, LRUPolicy())
pool = MemoryPool(8 << 20)
rng = random.Random(int(sys.argv[2]))
print("ready", flush=True)
while True:
    i = rng.randrange({n})
    key = namespace.key(hashlib.blake2b(f"chunk-{{i}}".encode(), digest_size=32).digest())
    if rng.random() < 0.2:
        tier.delete(key)
        continue
    obj = pool.allocate(layout, crash_tokens(i))
    obj.data[:] = chunk_content(key.id, obj.nbytes)
    tier.put(key, obj)
    obj.unref()
"""


@pytest.mark.slow
def test_sigkill_mid_write_never_leaves_wrong_bytes(root: Path, make_keys, pool, content, layout: KVLayout) -> None:
    """A writer killed with SIGKILL at random moments leaves, for every key, either nothing or the exact chunk."""
    helpers = "\n\n".join(textwrap.dedent(inspect.getsource(f)) for f in (content, crash_tokens))
    script = _WRITER.format(helpers=helpers, n=CRASH_KEYS)
    keys = make_keys(CRASH_KEYS)
    rng = random.Random(20240601)
    seen: set[CacheKey] = set()
    for round_ in range(5):
        proc = subprocess.Popen(
            [sys.executable, "-c", script, str(root), str(round_)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            ready = proc.stdout.readline()  # type: ignore[union-attr]
            assert ready.strip() == "ready", proc.stderr.read()  # type: ignore[union-attr]
            time.sleep(rng.uniform(0.05, 0.3))
            assert proc.poll() is None, proc.stderr.read()  # type: ignore[union-attr]
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL

        metrics = CacheMetrics()
        disk = open_tier(root, capacity=1 << 30, metrics=metrics)
        assert not list(root.rglob("*.tmp.*"))
        for i, key in enumerate(keys):
            got = disk.get(key, pool.allocate)
            if got is None:
                continue
            seen.add(key)
            try:
                assert got.layout == layout
                assert got.num_tokens == crash_tokens(i)
                np.testing.assert_array_equal(got.data, content(key.id, got.nbytes))
            finally:
                got.unref()
        assert metrics.errors.total() == 0, "a chunk file under its final name was incomplete"
        assert pool.live_objects == 0
    assert len(seen) >= 10, "the writer barely wrote anything; the test proved little"


# -- codecs ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lossless", "int8", "int4", "cachegen"])
def test_encoded_chunks_are_smaller_files_and_read_back(root: Path, make_kv_obj, make_keys, pool, name: str) -> None:
    """Encoded on the way to disk (the file is what the index counts), decoded on the way back; a reader of
    another lossy codec, or of exact KV, misses a lossy chunk (counted) and leaves the file for those who read it."""
    pytest.importorskip("torch")
    pytest.importorskip("blosc2")
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, dtype="bfloat16")
    metrics = CacheMetrics()
    codec = codec_named(name)
    tier = open_tier(root, metrics=metrics, codec=codec)
    key = make_keys(1)[0]
    obj = make_kv_obj(layout, 64)
    assert tier.put(key, obj)
    (path,) = chunk_files(root)
    assert path.stat().st_size == tier.usage().used_bytes < CHUNK_HEADER_SIZE + 0.9 * obj.nbytes
    got = tier.get(key, pool.allocate)
    assert got is not None
    error = (got.tensor().float() - obj.tensor().float()).norm() / obj.tensor().float().norm()
    assert error == 0 if not codec.lossy else error < 0.2
    got.unref()
    exact = open_tier(root, metrics=metrics)
    assert (exact.get(key, pool.allocate) is None) == codec.lossy
    assert metrics.errors.value(tier="disk", kind="codec_mismatch") == int(codec.lossy)
    assert path.exists()
    obj.unref()
