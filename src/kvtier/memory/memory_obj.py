"""A memory object: one chunk's KV in a pool-owned buffer, shared by reference instead of copied."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from kvtier.memory.layout import KVLayout

if TYPE_CHECKING:
    from kvtier.memory.pool import MemoryPool


class MemoryObj:
    """``num_tokens`` tokens of KV in ``layout``'s chunk shape, living at ``offset`` in a pool's arena.

    Reference counted: the pool frees the range when the last holder calls :meth:`unref`. Tiers that cache
    the object hold one reference; every reader or in-flight write holds its own, so an object evicted
    while being read stays valid until the reader is done.
    """

    __slots__ = ("_array", "_tensor", "block", "data", "layout", "nbytes", "num_tokens", "offset", "pool", "refcount")

    def __init__(self, pool: MemoryPool, block: int, offset: int, layout: KVLayout, num_tokens: int) -> None:
        self.pool = pool
        self.block = block  # the allocator range holding the object; the data starts at ``offset`` in it
        self.offset = offset
        self.layout = layout
        self.num_tokens = num_tokens
        self.nbytes = layout.chunk_bytes(num_tokens)
        self.refcount = 1
        # Flat uint8 view of the object's bytes; no copy.
        self.data: np.ndarray = pool.view(offset, self.nbytes)
        self._array: np.ndarray | None = None
        self._tensor: Any = None

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return self.layout.chunk_shape(self.num_tokens)

    def array(self) -> np.ndarray:
        """A numpy view shaped like the chunk (bf16/fp8 appear as same-width unsigned ints)."""
        if self._array is None:
            self._array = self.data.view(self.layout.element.numpy_name).reshape(self.shape)
        return self._array

    def tensor(self) -> Any:
        """A torch view of the same memory, with the layout's real dtype (imports torch lazily)."""
        if self._tensor is None:
            import torch

            flat = torch.from_numpy(self.data)
            self._tensor = flat.view(getattr(torch, self.layout.element.torch_name)).view(self.shape)
        return self._tensor

    def ref(self) -> MemoryObj:
        self.pool.ref(self)
        return self

    def unref(self) -> None:
        self.pool.unref(self)

    def __repr__(self) -> str:
        return f"MemoryObj(offset={self.offset}, tokens={self.num_tokens}, refs={self.refcount})"
