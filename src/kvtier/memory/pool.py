"""The host memory pool: one arena mapping plus an allocator, handing out reference-counted chunks.

The arena is reserved up front with ``mmap`` but pages only become resident when first written, so a large
budget costs nothing at start-up, and freed ranges stay resident for the next chunk (no page faults on the
store path). The arena may be backed by a file (e.g. in ``/dev/shm``) so another process can map the same
bytes: that is what the server's shared-memory transport builds on; registering it with CUDA as pinned
memory fits the same way.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import threading
import weakref

import numpy as np

from kvtier.memory.allocator import ArenaAllocator
from kvtier.memory.layout import KVLayout
from kvtier.memory.memory_obj import MemoryObj

PAGE = 4096
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux >= 5.14; Python 3.11 lacks the name
# Chunks smaller than this are not worth an extra page to match a buffer's alignment.
ALIGN_HINT_MIN_BYTES = 1 << 20


class MemoryPool:
    """A byte-budgeted pool of chunk buffers. Thread-safe."""

    def __init__(self, capacity_bytes: int, *, backing_file: str | None = None, alignment: int = 4096):
        self.allocator = ArenaAllocator(capacity_bytes, alignment)
        self.capacity_bytes = self.allocator.capacity
        self.backing_file = backing_file
        self._lock = threading.Lock()
        self._mmap = self._map(self.capacity_bytes, backing_file)
        self._array = np.frombuffer(self._mmap, dtype=np.uint8) if self.capacity_bytes else np.empty(0, np.uint8)
        self.live_objects = 0
        self._cuda_unregister: weakref.finalize | None = None

    @staticmethod
    def _map(size: int, backing_file: str | None) -> mmap.mmap:
        length = max(size, mmap.PAGESIZE)
        if backing_file is None:
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
            arena = mmap.mmap(-1, length, flags=flags)
            if hasattr(mmap, "MADV_HUGEPAGE"):
                # Transparent huge pages, as numpy does for its large arrays: chunk copies out of 4 KiB pages
                # ran at ~60% of the speed (TLB misses). The price is an erratic first touch of fresh pages
                # (0.3-5.6 GB/s measured vs 1.3-2.2 with 4 KiB pages); the arena is reused after that.
                arena.madvise(mmap.MADV_HUGEPAGE)
            return arena
        fd = os.open(backing_file, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, length)
            return mmap.mmap(fd, length, flags=mmap.MAP_SHARED)
        finally:
            os.close(fd)

    def pin_for_cuda(self) -> None:  # pragma: no cover - needs a GPU (tests/engine/test_cuda.py)
        """Page-lock the whole arena with CUDA (``cudaHostRegister``) so that copies between chunks and GPU
        tensors are asynchronous DMA at full link speed. Makes the whole budget resident. Needs torch+CUDA."""
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("pin_local_cpu needs a CUDA device, and torch sees none")
        pointer, size = self._array.ctypes.data, self._array.nbytes
        error = torch.cuda.cudart().cudaHostRegister(pointer, size, 0)
        if int(error) != 0:
            raise RuntimeError(f"cudaHostRegister of {size} bytes failed with CUDA error {int(error)}")
        # Unregister before the mapping goes away, also if the pool is dropped without close(): a stale
        # registration would make CUDA copy from the old physical pages of a new mapping at this address.
        self._cuda_unregister = weakref.finalize(self, _cuda_host_unregister, pointer)

    @property
    def cuda_pinned(self) -> bool:
        return self._cuda_unregister is not None and self._cuda_unregister.alive

    def prefault(self) -> threading.Thread | None:
        """Make the whole arena resident in the background, so first stores do not pay page faults
        (1-2 GB/s here, against 10+ GB/s into resident memory). Uses MADV_POPULATE_WRITE (Linux >= 5.14),
        which allocates pages without touching their contents, so it is safe while chunks are in use; on
        other systems it does nothing. Returns the thread (for tests), or None."""
        if not self.capacity_bytes or not hasattr(self._mmap, "madvise"):
            return None
        thread = threading.Thread(target=self._populate, name="kvtier-prefault", daemon=True)
        thread.start()
        return thread

    def _populate(self) -> None:
        step = 64 << 20
        for start in range(0, self.capacity_bytes, step):
            try:
                self._mmap.madvise(MADV_POPULATE_WRITE, start, min(step, self.capacity_bytes - start))
            except (OSError, ValueError):  # an older kernel, or the pool was closed meanwhile
                return

    def view(self, offset: int, nbytes: int) -> np.ndarray:
        return self._array[offset : offset + nbytes]

    def allocate(self, layout: KVLayout, num_tokens: int, align_like: int | None = None) -> MemoryObj | None:
        """A new object with one reference held by the caller, or None when no free range fits.

        ``align_like``: the address of the buffer this chunk will be copied from or to. The chunk is then
        placed at the same offset within a 4 KiB page: copies between buffers whose addresses differ by a
        few bytes modulo 4 KiB run at half speed (the CPU mistakes loads for aliases of earlier stores).
        """
        nbytes = layout.chunk_bytes(num_tokens)
        skew_room = PAGE if align_like is not None and nbytes >= ALIGN_HINT_MIN_BYTES else 0
        with self._lock:
            block = self.allocator.allocate(nbytes + skew_room)
            if block is None:
                return None
            self.live_objects += 1
        offset = block + (align_like - block) % PAGE if skew_room else block
        return MemoryObj(self, block, offset, layout, num_tokens)

    def ref(self, obj: MemoryObj) -> None:
        with self._lock:
            if obj.refcount <= 0:
                raise RuntimeError(f"ref of a freed {obj!r}")
            obj.refcount += 1

    def unref(self, obj: MemoryObj) -> None:
        with self._lock:
            if obj.refcount <= 0:
                raise RuntimeError(f"unref of a freed {obj!r}")
            obj.refcount -= 1
            if obj.refcount == 0:
                self.allocator.free(obj.block)
                self.live_objects -= 1

    @property
    def used_bytes(self) -> int:
        return self.allocator.used_bytes

    def fits(self, nbytes: int) -> bool:
        """Whether ``nbytes`` could ever be allocated (ignoring what is in use now)."""
        return self.allocator.round_up(nbytes) <= self.capacity_bytes

    def release_free_pages(self) -> None:
        """Hand resident pages of wholly free ranges back to the OS (after a clear)."""
        # Never for page-locked memory: CUDA keeps DMA-ing to the old physical pages after MADV_DONTNEED.
        if self.cuda_pinned or self.backing_file is not None or not hasattr(self._mmap, "madvise"):
            return
        with self._lock:
            page = mmap.PAGESIZE
            for start, size in self.allocator.free_ranges():
                first = -(-start // page) * page
                last = (start + size) // page * page
                if last > first:
                    self._mmap.madvise(mmap.MADV_DONTNEED, first, last - first)

    def close(self) -> None:
        """Unmap the arena (idempotent). Objects still referenced must not be used afterwards."""
        if self._mmap.closed:
            return
        if self._cuda_unregister is not None:
            self._cuda_unregister()
        self._array = np.empty(0, np.uint8)
        # A caller may still hold a view; the mapping then goes away with the last view.
        with contextlib.suppress(BufferError):
            self._mmap.close()


def _cuda_host_unregister(pointer: int) -> None:  # pragma: no cover - needs a GPU
    import torch

    torch.cuda.cudart().cudaHostUnregister(pointer)


def populate_in_background(regions: list[tuple[int, int]], name: str = "kvtier-populate") -> threading.Thread:
    """Make the pages of ``(address, nbytes)`` regions of this process resident in a background thread, with
    MADV_POPULATE_WRITE (Linux >= 5.14): pages are allocated, contents untouched, so it is safe on memory in use.
    For buffers another library allocated and kvtier writes into (vLLM's CPU KV cache): a first write into a
    fresh page costs a page fault, which would otherwise land on the load path of the first hits."""
    thread = threading.Thread(target=_populate_regions, args=(regions,), name=name, daemon=True)
    thread.start()
    return thread


def _populate_regions(regions: list[tuple[int, int]]) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    step = 64 << 20
    for address, nbytes in regions:
        start = address - address % PAGE  # madvise wants a page-aligned start; the page is the buffer's own
        end = address + nbytes
        for offset in range(start, end, step):
            if libc.madvise(offset, min(step, end - offset), MADV_POPULATE_WRITE) != 0:
                return  # an older kernel: nothing to gain
