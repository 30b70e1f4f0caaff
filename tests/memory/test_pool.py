"""MemoryPool and MemoryObj: reference counts, zero-copy views, raw-byte dtypes and page release."""

from __future__ import annotations

import mmap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from kvtier.memory.layout import KVLayout
from kvtier.memory.pool import MemoryPool

PAGE = 4096


def test_allocate_and_refcounts(pool: MemoryPool, layout: KVLayout) -> None:
    """A new object has one reference; the range is freed only when the last reference is dropped."""
    obj = pool.allocate(layout, 32)
    assert obj is not None
    assert (obj.refcount, pool.live_objects, pool.used_bytes) == (1, 1, PAGE)
    assert obj.ref() is obj and obj.refcount == 2
    obj.unref()
    assert (obj.refcount, pool.live_objects, pool.used_bytes) == (1, 1, PAGE)
    obj.unref()
    assert (obj.refcount, pool.live_objects, pool.used_bytes) == (0, 0, 0)


def test_unref_or_ref_of_a_freed_object_raises(pool: MemoryPool, layout: KVLayout) -> None:
    """Using an object after its last unref is an error, not silent corruption of someone else's chunk."""
    obj = pool.allocate(layout, 32)
    assert obj is not None
    obj.unref()
    other = pool.allocate(layout, 32)  # reuses the range
    with pytest.raises(RuntimeError, match="freed"):
        obj.unref()
    with pytest.raises(RuntimeError, match="freed"):
        obj.ref()
    assert other is not None and other.refcount == 1 and pool.live_objects == 1


def test_allocate_returns_none_when_full(layout: KVLayout) -> None:
    pool = MemoryPool(2 * PAGE)
    objs = [pool.allocate(layout, 32) for _ in range(2)]
    assert None not in objs
    assert pool.allocate(layout, 1) is None
    assert pool.fits(2 * PAGE) and not pool.fits(2 * PAGE + 1)
    objs[0].unref()  # type: ignore[union-attr]
    assert pool.allocate(layout, 1) is not None


def test_objects_do_not_overlap(pool: MemoryPool, layout: KVLayout) -> None:
    """Writing one object never changes another."""
    objs = [pool.allocate(layout, n) for n in (1, 32, 33, 7, 64)]
    for i, obj in enumerate(objs):
        obj.data[:] = i + 1  # type: ignore[union-attr]
    for i, obj in enumerate(objs):
        assert np.all(obj.data == i + 1)  # type: ignore[union-attr]
        assert obj.data.nbytes == layout.chunk_bytes(obj.num_tokens)  # type: ignore[union-attr]


def test_views_share_memory(pool: MemoryPool, layout: KVLayout) -> None:
    """data, array() and tensor() are views of the same pool bytes: a write through one shows in the others."""
    obj = pool.allocate(layout, 5)
    assert obj is not None
    arr, ten = obj.array(), obj.tensor()
    assert arr.shape == tuple(ten.shape) == layout.chunk_shape(5) == obj.shape
    assert arr.dtype == np.float16 and ten.dtype == torch.float16
    assert np.shares_memory(arr, obj.data)
    assert ten.data_ptr() == arr.ctypes.data == obj.data.ctypes.data
    values = np.arange(arr.size, dtype=np.float16).reshape(arr.shape)
    arr[...] = values
    assert torch.equal(ten, torch.from_numpy(values))
    ten[1, 0] = -1.5
    assert np.all(arr[1, 0] == np.float16(-1.5))
    assert obj.data.tobytes() == arr.tobytes()
    offset_view = pool.view(obj.offset, obj.nbytes)
    assert offset_view.tobytes() == obj.data.tobytes()


@pytest.mark.parametrize(
    ("dtype", "numpy_name", "torch_dtype"),
    [
        ("bfloat16", "uint16", torch.bfloat16),
        ("float8_e4m3fn", "uint8", torch.float8_e4m3fn),
        ("float8_e5m2", "uint8", torch.float8_e5m2),
        ("float32", "float32", torch.float32),
    ],
)
def test_narrow_dtypes_round_trip_raw_bytes(pool: MemoryPool, dtype: str, numpy_name: str, torch_dtype) -> None:
    """bf16 and fp8 (no numpy equivalent) are carried as same-width ints; torch sees the real dtype, same bits."""
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype=dtype)
    obj = pool.allocate(layout, 9)
    assert obj is not None
    source = torch.randn(layout.chunk_shape(9)).to(torch_dtype)
    obj.tensor().copy_(source)
    assert obj.tensor().dtype == torch_dtype
    assert obj.array().dtype == np.dtype(numpy_name)
    raw = source.contiguous().view(torch.uint8).numpy().tobytes()
    assert obj.data.tobytes() == raw
    assert obj.array().tobytes() == raw
    # And back: bytes written raw read as the same values through torch.
    other = pool.allocate(layout, 9)
    assert other is not None
    other.data[:] = obj.data
    assert torch.equal(other.tensor().view(torch.uint8), source.view(torch.uint8))


def test_release_free_pages_keeps_live_objects(layout: KVLayout) -> None:
    """Handing free pages back to the OS leaves live objects' bytes intact, and freed space reusable."""
    pool = MemoryPool(16 * PAGE)
    keep = [pool.allocate(layout, 32) for _ in range(3)]
    drop = [pool.allocate(layout, 64) for _ in range(4)]
    for i, obj in enumerate(keep + drop):
        obj.data[:] = 0xA0 + i  # type: ignore[union-attr]
    for obj in drop:
        obj.unref()  # type: ignore[union-attr]
    pool.release_free_pages()
    for i, obj in enumerate(keep):
        assert np.all(obj.data == 0xA0 + i)  # type: ignore[union-attr]
    fresh = pool.allocate(layout, 64)
    assert fresh is not None
    if hasattr(mmap, "MADV_DONTNEED"):
        assert not fresh.data.any()  # released anonymous pages come back zeroed
    fresh.data[:] = 7
    assert np.all(fresh.data == 7)
    pool.allocator.check_integrity()
    pool.close()


def test_backing_file_shares_bytes_between_mappings(tmp_path: Path, layout: KVLayout) -> None:
    """Two pools on one backing file see each other's writes (the shared-memory transport relies on it)."""
    path = str(tmp_path / "arena")
    a, b = MemoryPool(4 * PAGE, backing_file=path), MemoryPool(4 * PAGE, backing_file=path)
    obj = a.allocate(layout, 32)
    assert obj is not None
    obj.data[:] = np.arange(obj.nbytes, dtype=np.uint64).astype(np.uint8)
    assert b.view(obj.offset, obj.nbytes).tobytes() == obj.data.tobytes()
    a.release_free_pages()  # a no-op for shared mappings; must not drop the shared bytes
    assert b.view(obj.offset, obj.nbytes).tobytes() == obj.data.tobytes()
    obj.unref()
    a.close()
    b.close()


def test_concurrent_allocate_and_unref(layout: KVLayout) -> None:
    """Threads allocating, sharing and releasing objects leave an empty, consistent pool."""
    pool = MemoryPool(64 * PAGE)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        held = []
        try:
            for _ in range(500):
                if held and rng.random() < 0.5:
                    held.pop(int(rng.integers(len(held)))).unref()
                else:
                    obj = pool.allocate(layout, int(rng.integers(1, 65)))
                    if obj is not None:
                        held.append(obj.ref())
                        obj.unref()
            for obj in held:
                obj.unref()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert (pool.live_objects, pool.used_bytes) == (0, 0)
    pool.allocator.check_integrity()


@pytest.mark.parametrize("address", [0, 16, 64, 2048, 4095, 123457])
def test_align_like_places_large_chunks_at_the_buffers_page_offset(address: int) -> None:
    """A chunk allocated with ``align_like`` starts at the same offset within a 4 KiB page as that address
    (copies between buffers a few bytes apart modulo 4 KiB run at half speed), and frees cleanly."""
    layout = KVLayout(2, 2, 256)  # 2 KiB per token: 512 tokens = 1 MiB, large enough to be aligned
    pool = MemoryPool(8 * 2**20)
    objs = [pool.allocate(layout, 512, align_like=address) for _ in range(3)]
    for obj in objs:
        assert obj is not None
        assert obj.data.ctypes.data % 4096 == address % 4096
        assert obj.nbytes == layout.chunk_bytes(512)
    for obj in objs:
        obj.unref()
    assert pool.used_bytes == 0 and pool.live_objects == 0
    pool.allocator.check_integrity()


def test_align_like_is_ignored_for_small_chunks() -> None:
    """Small chunks are not worth an extra page: they stay packed at page boundaries."""
    layout = KVLayout(2, 2, 8)
    pool = MemoryPool(2**20)
    obj = pool.allocate(layout, 4, align_like=16)
    assert obj is not None and obj.offset == obj.block and pool.used_bytes == 4096
    obj.unref()


@pytest.mark.parametrize("shared", [False, True])
def test_prefault_keeps_contents_and_makes_memory_resident(tmp_path: Path, shared: bool) -> None:
    """Prefaulting runs beside live chunks without changing a byte of them."""
    layout = KVLayout(2, 2, 256)
    pool = MemoryPool(8 * 2**20, backing_file=str(tmp_path / "arena") if shared else None)
    obj = pool.allocate(layout, 512)
    assert obj is not None
    obj.data[:] = np.arange(obj.nbytes, dtype=np.uint64).astype(np.uint8)
    before = obj.data.copy()
    thread = pool.prefault()
    assert thread is not None
    thread.join(30)
    assert np.array_equal(obj.data, before)
    obj.unref()
    pool.close()


def test_populate_in_background_makes_foreign_buffers_resident_without_changing_them() -> None:
    from kvtier.memory.pool import populate_in_background

    buffer = np.full(8 << 20, 7, dtype=np.uint8)  # allocated by someone else (numpy), partly written
    fresh = np.empty(8 << 20, dtype=np.uint8)
    populate_in_background([(buffer.ctypes.data + 5, buffer.nbytes - 5), (fresh.ctypes.data, fresh.nbytes)]).join(10)
    assert (buffer == 7).all()
