"""Memory: KV layouts, the host arena allocator and the memory objects that hold one chunk each."""

from kvtier.memory.layout import DType, KVLayout, dtype_by_name
from kvtier.memory.memory_obj import MemoryObj
from kvtier.memory.pool import MemoryPool

__all__ = ["DType", "KVLayout", "MemoryObj", "MemoryPool", "dtype_by_name"]
