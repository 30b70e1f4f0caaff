"""Moving KV between an engine's buffers and kvtier's chunk memory.

The cache engine never assumes how the caller holds KV. It asks a :class:`KVSource` to copy a token range into
a chunk and a :class:`KVDestination` to copy a chunk out to a token range. Plain ``(layers, kv, tokens, heads,
head_dim)`` numpy arrays and torch tensors (CPU or CUDA) are adapted here; engine integrations (vLLM's paged
KV through its slot mapping) bring their own source/destination, and the copy goes straight between the
engine's buffers and pool memory with no intermediate tensor.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from kvtier.errors import LayoutError
from kvtier.memory.layout import KVLayout
from kvtier.memory.memory_obj import MemoryObj


@runtime_checkable
class KVSource(Protocol):
    """Supplies the KV of a prompt, token range by token range."""

    def read_into(self, obj: MemoryObj, start: int, end: int) -> None:
        """Copy the KV of tokens ``[start, end)`` into ``obj`` (``end - start == obj.num_tokens``).
        May be asynchronous until :meth:`synchronize`."""

    def synchronize(self) -> None:
        """Return once every copy issued so far has finished writing chunk memory."""


@runtime_checkable
class KVDestination(Protocol):
    """Receives retrieved KV, token range by token range."""

    def write_from(self, obj: MemoryObj, start: int, end: int) -> None:
        """Copy ``obj`` into the KV of tokens ``[start, end)``. May be asynchronous until :meth:`synchronize`."""

    def synchronize(self) -> None:
        """Return once every copy issued so far has finished reading chunk memory."""


class ArrayKV:
    """A numpy array shaped ``(layers, kv, tokens, heads, head_dim)``; source and destination.

    Copies of different chunks may run on several threads at once (``parallel_copies``).
    """

    parallel_copies = True

    def __init__(self, array: np.ndarray, layout: KVLayout) -> None:
        layout.check_shape(array.shape)
        expected = np.dtype(layout.element.numpy_name)
        if array.dtype != expected:
            raise LayoutError(f"KV array dtype {array.dtype} does not match layout dtype {layout.dtype} ({expected})")
        self.array = array
        self.num_tokens = array.shape[2]

    def address_of(self, start: int) -> int:
        """Address of token ``start``'s KV in layer 0 (so chunk memory can share its alignment)."""
        return int(self.array.ctypes.data) + start * self.array.strides[2]

    def read_into(self, obj: MemoryObj, start: int, end: int) -> None:
        np.copyto(obj.array(), self.array[:, :, start:end])

    def write_from(self, obj: MemoryObj, start: int, end: int) -> None:
        np.copyto(self.array[:, :, start:end], obj.array())

    def synchronize(self) -> None:
        return None


class TorchKV:
    """A torch tensor shaped ``(layers, kv, tokens, heads, head_dim)`` on any device.

    Copies to and from a CUDA tensor are issued non-blocking (the chunk memory stays referenced until
    :meth:`synchronize`), so the transfers of consecutive chunks overlap; with a page-locked arena
    (``pin_local_cpu``) they are DMA at full link speed.
    """

    def __init__(self, tensor: Any, layout: KVLayout) -> None:
        import torch

        layout.check_shape(tuple(tensor.shape))
        expected = getattr(torch, layout.element.torch_name)
        if tensor.dtype != expected:
            raise LayoutError(f"KV tensor dtype {tensor.dtype} does not match layout dtype {layout.dtype}")
        self.tensor = tensor
        self.num_tokens = int(tensor.shape[2])
        self._cuda = tensor.device.type == "cuda"

    def address_of(self, start: int) -> int | None:
        """Address of token ``start``'s KV in layer 0 for a CPU tensor (DMA to a GPU does not care)."""
        if self._cuda:
            return None
        return int(self.tensor.data_ptr()) + start * self.tensor.stride(2) * self.tensor.element_size()

    def read_into(self, obj: MemoryObj, start: int, end: int) -> None:
        obj.tensor().copy_(self.tensor[:, :, start:end], non_blocking=self._cuda)

    def write_from(self, obj: MemoryObj, start: int, end: int) -> None:
        self.tensor[:, :, start:end].copy_(obj.tensor(), non_blocking=self._cuda)

    def synchronize(self) -> None:
        if self._cuda:
            import torch

            torch.cuda.current_stream(self.tensor.device).synchronize()


def _is_torch_tensor(value: Any) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "device")


def as_source(kv: Any, layout: KVLayout) -> KVSource:
    """Adapt an array, tensor or :class:`KVSource` for storing."""
    if isinstance(kv, np.ndarray):
        return ArrayKV(kv, layout)
    if _is_torch_tensor(kv):
        return TorchKV(kv, layout)
    if isinstance(kv, KVSource):
        return kv
    raise TypeError(f"cannot store KV from {type(kv).__name__}: pass a numpy array, a torch tensor or a KVSource")


def as_destination(out: Any, layout: KVLayout) -> KVDestination:
    """Adapt an array, tensor or :class:`KVDestination` for retrieving."""
    if isinstance(out, np.ndarray):
        return ArrayKV(out, layout)
    if _is_torch_tensor(out):
        return TorchKV(out, layout)
    if isinstance(out, KVDestination):
        return out
    raise TypeError(
        f"cannot retrieve KV into {type(out).__name__}: pass a numpy array, a torch tensor or a KVDestination"
    )
