"""L2: one file per chunk on local disk, size-budgeted, surviving restarts.

Layout: ``<root>/<namespace digest>/<first 2 hex of hash>/<chunk hash>.kvt``; each file is the versioned,
checksummed chunk format (``kvtier.codecs.chunk_format``). Writes go to a temporary name and are renamed into
place, so a crash mid-write never leaves a chunk under its final name; a torn or corrupted file (power loss,
bit rot, a hand edit) fails its checksum on read and becomes a miss that is counted and removed. On start the
index is rebuilt from the file names (oldest modification first), without reading any data.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import threading
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import BinaryIO

from kvtier.codecs.base import Codec
from kvtier.codecs.chunk_format import (
    CHUNK_HEADER_SIZE,
    CODEC_RAW,
    ChunkHeader,
    decode_header,
    decode_payload,
    encode_chunk,
    readable_codec,
    verify_payload,
)
from kvtier.codecs.registry import NAIVE
from kvtier.diagnosis.history import Event
from kvtier.errors import CorruptChunkError
from kvtier.memory.memory_obj import MemoryObj
from kvtier.metrics import CacheMetrics
from kvtier.storage.base import Allocate, PinTable, StorageTier, TierUsage, discard_bad_chunk
from kvtier.storage.eviction import EvictionPolicy
from kvtier.storage.receive import ReceiveBuffers
from kvtier.tokens.keys import NAMESPACE_DIGEST_SIZE, CacheKey, key_id_from_str

log = logging.getLogger(__name__)
SUFFIX = ".kvt"
# KV can be inverted back into prompt text: chunks are for the server's user only (as its shared memory is).
PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
TMP_MARK = ".tmp."
_counter = itertools.count()


class DiskTier(StorageTier):
    name = "disk"

    def __init__(
        self,
        root: str | os.PathLike[str],
        capacity_bytes: int,
        policy: EvictionPolicy,
        metrics: CacheMetrics | None = None,
        *,
        fsync: bool = False,
        codec: Codec = NAIVE,
    ) -> None:
        self.root = Path(root)
        self.capacity_bytes = capacity_bytes
        self.policy = policy
        self.metrics = metrics or CacheMetrics()
        self.fsync = fsync
        self.codec = codec  # payloads are encoded by the writer thread that calls put
        self._buffers = ReceiveBuffers()  # encoded payloads read back
        self._sizes: dict[bytes, int] = {}
        self._used = 0
        self._reserved = 0
        self._writing: set[bytes] = set()  # keys being written now: a second put of one is a duplicate
        self._pins = PinTable()
        self._lock = threading.RLock()
        self._known_namespaces: set[bytes] = set()
        self.root.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
        self._rebuild_index()

    # -- paths and index ------------------------------------------------------------------------
    def path_for(self, key_id: bytes) -> Path:
        ns, h = key_id[:NAMESPACE_DIGEST_SIZE].hex(), key_id[NAMESPACE_DIGEST_SIZE:].hex()
        return self.root / ns / h[:2] / f"{h}{SUFFIX}"

    def _rebuild_index(self) -> None:
        found: list[tuple[float, bytes, int]] = []
        for path in self.root.glob(f"*/*/*{SUFFIX}*"):
            if TMP_MARK in path.name:
                path.unlink(missing_ok=True)  # left by a writer that died mid-write
                continue
            try:
                key_id = key_id_from_str(f"{path.parent.parent.name}/{path.name.removesuffix(SUFFIX)}")
                stat = path.stat()
            except (ValueError, OSError):
                continue
            found.append((stat.st_mtime, key_id, stat.st_size))
        for _, key_id, size in sorted(found):
            self._sizes[key_id] = size
            self._used += size
            self.policy.insert(key_id)
            self._known_namespaces.add(key_id[:NAMESPACE_DIGEST_SIZE])
        with self._lock:
            self._make_room(0)
        if found:
            log.info("disk tier %s: recovered %d chunks (%.1f MiB)", self.root, len(self._sizes), self._used / 2**20)

    def _make_room(self, size: int) -> bool:
        while self._used + self._reserved + size > self.capacity_bytes:
            victim = self.policy.victim(lambda k: not self._pins.is_pinned(k))
            if victim is None:
                return False
            self._forget(victim)  # type: ignore[arg-type]
            self.metrics.evictions.inc(tier=self.name)
            self.history.note(victim, Event.EVICTED, self.name)  # type: ignore[arg-type]
        return True

    def _forget(self, key_id: bytes) -> None:
        self._used -= self._sizes.pop(key_id)
        self.path_for(key_id).unlink(missing_ok=True)

    # -- StorageTier ---------------------------------------------------------------------------
    def contains(self, key: CacheKey) -> bool:
        return key.id in self._sizes

    def put(self, key: CacheKey, obj: MemoryObj) -> bool:
        if key.id in self._sizes or key.id in self._writing:  # checked again below; here to skip the encoding
            return False
        header, payload = encode_chunk(key.id, obj, self.codec)
        size = len(header) + memoryview(payload).nbytes
        with self._lock:
            if key.id in self._sizes or key.id in self._writing:
                return False
            if size > self.capacity_bytes or not self._make_room(size):
                self.metrics.errors.inc(tier=self.name, kind="full")
                self.history.note(key.id, Event.REFUSED, self.name, "disk tier full (all of it pinned)")
                return False
            self._reserved += size
            self._writing.add(key.id)
        started = time.perf_counter()
        written = False
        try:
            self._write_file(key, header, payload)
            written = True
        except OSError as exc:
            log.warning("disk tier: write of %s failed: %s", key.to_str(), exc)
            self.metrics.errors.inc(tier=self.name, kind="io")
            return False
        finally:
            with self._lock:  # one step, so a racing put of this key sees it either being written or stored
                self._reserved -= size
                self._writing.discard(key.id)
                if written:
                    self._sizes[key.id] = size
                    self._used += size
                    self.policy.insert(key.id)
        self.metrics.write_bytes.inc(size, tier=self.name)
        self.metrics.write_seconds.observe(time.perf_counter() - started, tier=self.name)
        return True

    def _write_file(self, key: CacheKey, header: bytes, payload: memoryview | bytes) -> None:
        final = self.path_for(key.id)
        self._note_namespace(key)
        final.parent.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
        tmp = final.with_name(f"{final.name}{TMP_MARK}{os.getpid()}.{next(_counter)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
        try:
            _write_all(fd, header)
            _write_all(fd, payload)
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(tmp, final)

    def _note_namespace(self, key: CacheKey) -> None:
        """Write ``namespace.json`` once per namespace so people and admin tools can tell what a dir holds."""
        if key.namespace is None:  # known by id only: nothing to describe
            return
        digest = key.namespace.digest
        if digest in self._known_namespaces:
            return
        directory = self.root / digest.hex()
        directory.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
        _write_private(directory / "namespace.json", json.dumps(key.namespace.describe(), indent=1).encode())
        self._known_namespaces.add(digest)

    def get(self, key: CacheKey, allocate: Allocate) -> MemoryObj | None:
        with self._lock:
            if key.id not in self._sizes:
                return None
            self._pins.pin(key.id)  # not evicted while we read it
            self.policy.touch(key.id)
        started = time.perf_counter()
        try:
            obj = self._read_file(key, allocate)
        finally:
            with self._lock:
                self._pins.unpin(key.id)
        if obj is not None:
            self.metrics.read_bytes.inc(self._sizes.get(key.id, CHUNK_HEADER_SIZE + obj.nbytes), tier=self.name)
            self.metrics.read_seconds.observe(time.perf_counter() - started, tier=self.name)
        return obj

    def _read_file(self, key: CacheKey, allocate: Allocate) -> MemoryObj | None:
        obj = None
        try:
            with open(self.path_for(key.id), "rb", buffering=0) as f:
                header = decode_header(f.read(CHUNK_HEADER_SIZE), key.id)
                # An encoded payload is read and checked before any memory is taken for the KV.
                encoded = self._read_encoded(f, header) if header.codec != CODEC_RAW else None
                obj = allocate(header.layout, header.num_tokens)
                if obj is None:
                    self.metrics.errors.inc(tier=self.name, kind="no_memory")
                    return None
                if encoded is not None:
                    codec, payload = encoded
                    decode_payload(header, payload, obj, codec)
                    return obj
                view = memoryview(obj.data)
                got = _read_into(f, view)
                verify_payload(header, view[:got])
                return obj
        except CorruptChunkError as exc:
            discard_bad_chunk(self, self.metrics, key, exc, delete=True)
        except OSError as exc:
            log.warning("disk tier: read of %s failed: %s", key.to_str(), exc)
            self.metrics.errors.inc(tier=self.name, kind="io")
            self.delete(key)
        if obj is not None:
            obj.unref()
        return None

    def _read_encoded(self, f: BinaryIO, header: ChunkHeader) -> tuple[Codec, memoryview]:
        """The codec to decode ``header``'s payload with and the payload, read from ``f`` and verified."""
        codec = readable_codec(header, self.codec)
        payload = self._buffers.take(header.payload_size)
        verify_payload(header, payload[: _read_into(f, payload)])
        return codec, payload

    def delete(self, key: CacheKey) -> bool:
        with self._lock:
            if key.id not in self._sizes:
                return False
            self.policy.remove(key.id)
            self._forget(key.id)
            return True

    def clear(self) -> int:
        with self._lock:
            key_ids = list(self._sizes)
            for key_id in key_ids:
                self.policy.remove(key_id)
                self._forget(key_id)
            return len(key_ids)

    def delete_namespaces(self, digests: Collection[bytes]) -> int:
        with self._lock:
            doomed = [i for i in self._sizes if i[:NAMESPACE_DIGEST_SIZE] in digests]
            for key_id in doomed:
                self.policy.remove(key_id)
                self._forget(key_id)
            return len(doomed)

    def namespaces(self) -> dict[bytes, dict[str, object]]:
        """What ``namespace.json`` says of each namespace directory (written on first store)."""
        found = {}
        for path in self.root.glob("*/namespace.json"):
            try:
                found[bytes.fromhex(path.parent.name)] = json.loads(path.read_text())
            except (ValueError, OSError):
                continue
        return found

    def pin(self, keys: Sequence[CacheKey]) -> list[CacheKey]:
        with self._lock:
            pinned = [k for k in keys if k.id in self._sizes]
            for key in pinned:
                self._pins.pin(key.id)
            return pinned

    def unpin(self, keys: Sequence[CacheKey]) -> None:
        with self._lock:
            for key in keys:
                self._pins.unpin(key.id)

    def touch_prefix(self, keys: Sequence[CacheKey]) -> None:
        with self._lock:
            for key in reversed(keys):
                if key.id in self._sizes:
                    self.policy.touch(key.id)

    def usage(self) -> TierUsage:
        return TierUsage(self._used, self.capacity_bytes, len(self._sizes), len(self._pins))


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE)
    try:
        _write_all(fd, data)
    finally:
        os.close(fd)


def _write_all(fd: int, data: memoryview | bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_into(f, view: memoryview) -> int:  # type: ignore[no-untyped-def]
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got
