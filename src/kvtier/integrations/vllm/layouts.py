"""Moving KV between vLLM's paged KV cache and kvtier's contiguous ``(layers, kv, tokens, heads, head_dim)`` tensor.

vLLM keeps each attention layer's KV in fixed-size blocks; a token's place is its *slot*,
``block_id * block_size + offset``, and a request's tokens are scattered over whatever blocks it was given.
Each supported :class:`PagedLayout` is turned into two strided views per layer, of its keys and of its values,
shaped ``(blocks, block_size, heads, head_dim)`` (no copy), so a gather or a scatter of any set of slots is an
advanced-indexing operation per layer on a GPU, whatever the physical order of the backend's tensor is. On the
CPU, where indexing moves one 256-byte row at a time, the slots are cut into runs within a block (a request's
slots come in block-sized runs) and each run is one strided copy: 3-8x faster.

Only torch is imported here (never vLLM): the layouts are unit-tested on plain tensors.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


class PagedLayout(enum.Enum):
    """How one attention layer's paged KV tensor holds K and V (the attention backend decides, see compat)."""

    CPU_PLANES = "cpu-planes"
    """vLLM's CPU backend: ``[blocks, heads, block_size, 2 * head_dim]``, read by the kernels as two planes per
    block and head: the keys of all its tokens stored dimension-major (``[head_dim, block_size]``, the order its
    ``vec``/``vec16`` kernels read for q.K), then the values token-major (``[block_size, head_dim]``). compat
    checks this with vLLM's own cache-write kernel at start (:func:`~kvtier.integrations.vllm.compat.paged_layout`)."""
    CONTENT_SPLIT = "content-split"
    """vLLM 0.32 FlashAttention / Triton / FlexAttention: a (possibly strided) ``[blocks, heads, block_size,
    2 * head_dim]`` view whose last axis is the token's K then its V."""
    KV_FIRST = "kv-first"
    """FlashAttention before vLLM's layout descriptors: ``[2, blocks, block_size, heads, head_dim]``."""


def key_value_views(kv: torch.Tensor, layout: PagedLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of one layer's paged keys and values, each ``(blocks, block_size, heads, head_dim)`` (share memory)."""
    if layout is PagedLayout.KV_FIRST:
        if kv.dim() != 5 or kv.shape[0] != 2:
            raise ValueError(
                f"{layout.value} KV must be [2, blocks, block_size, heads, head_dim], got {tuple(kv.shape)}"
            )
        return kv[0], kv[1]
    if kv.dim() != 4 or kv.shape[3] % 2:
        raise ValueError(f"{layout.value} KV must be [blocks, heads, block_size, 2 * head_dim], got {tuple(kv.shape)}")
    blocks, heads, block_size, content = kv.shape
    head_dim = content // 2
    if layout is PagedLayout.CPU_PLANES:
        # The reinterpretation the CPU kernels do (cpu_attn.py, then the kernels' key order): the layer is dense.
        planes = kv.view(blocks, heads, 2, block_size * head_dim)
        keys = planes[:, :, 0].view(blocks, heads, head_dim, block_size).permute(0, 3, 1, 2)
        values = planes[:, :, 1].view(blocks, heads, block_size, head_dim).permute(0, 2, 1, 3)
        return keys, values
    return kv[..., :head_dim].permute(0, 2, 1, 3), kv[..., head_dim:].permute(0, 2, 1, 3)


def slot_mapping(block_ids: Sequence[int], block_size: int, start: int, end: int) -> torch.Tensor:
    """Slots of token positions ``[start, end)`` of a request holding ``block_ids`` (int64, on the CPU)."""
    if not 0 <= start <= end <= len(block_ids) * block_size:
        raise ValueError(f"tokens [{start}, {end}) do not fit in {len(block_ids)} blocks of {block_size}")
    positions = torch.arange(start, end, dtype=torch.int64)
    blocks = torch.as_tensor(block_ids, dtype=torch.int64)
    return blocks[positions // block_size] * block_size + positions % block_size


def blocks_of(block_ids: Sequence[int], block_size: int, start: int, end: int) -> set[int]:
    """The block ids holding token positions ``[start, end)``."""
    if start >= end:
        return set()
    return set(block_ids[start // block_size : (end - 1) // block_size + 1])


@dataclass(slots=True)
class PagedKV:
    """All layers of vLLM's paged KV cache, as ``(blocks, block_size, heads, head_dim)`` views of keys and values.

    ``block_size`` is the block size of the tensors (vLLM's kernel block size). vLLM may split a scheduler block
    into several kernel blocks; they are consecutive, so a slot computed with the scheduler's block size maps to
    ``divmod(slot, block_size)`` here all the same.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    layout: PagedLayout

    @classmethod
    def from_layers(cls, layers: Sequence[torch.Tensor], layout: PagedLayout) -> PagedKV:
        pairs = [key_value_views(kv, layout) for kv in layers]
        shapes = {(k.shape, k.dtype, k.device) for pair in pairs for k in pair}
        if len(shapes) != 1:
            raise ValueError(f"all attention layers must have the same KV shape, dtype and device; got {shapes}")
        return cls([k for k, _ in pairs], [v for _, v in pairs], layout)

    @property
    def block_size(self) -> int:
        return int(self.keys[0].shape[1])

    @property
    def device(self) -> torch.device:
        return self.keys[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype

    def staging_shape(self, num_tokens: int) -> tuple[int, int, int, int, int]:
        """Shape of kvtier's contiguous tensor for ``num_tokens`` tokens."""
        _, _, heads, head_dim = self.keys[0].shape
        return (len(self.keys), 2, num_tokens, int(heads), int(head_dim))

    def _index(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        slots = slots.to(self.device, non_blocking=True)
        return torch.div(slots, self.block_size, rounding_mode="floor"), slots % self.block_size

    def _runs(self, slots: torch.Tensor) -> list[tuple[int, int, int, int]]:
        """``slots`` as runs of consecutive slots within one block: (block, offset, first token, tokens)."""
        flat = slots.cpu().numpy()
        blocks, offsets = np.divmod(flat, self.block_size)
        breaks = np.flatnonzero((np.diff(blocks) != 0) | (np.diff(offsets) != 1)) + 1
        starts = np.concatenate(([0], breaks)).tolist()
        ends = [*breaks.tolist(), len(flat)]
        return [(int(blocks[a]), int(offsets[a]), a, b - a) for a, b in zip(starts, ends, strict=True)]

    def _planes(self) -> list[tuple[int, int, torch.Tensor]]:
        """(layer, 0 for keys / 1 for values, view) of every plane."""
        return [(i, kv, view) for kv, views in enumerate((self.keys, self.values)) for i, view in enumerate(views)]

    def gather(self, slots: torch.Tensor, out: torch.Tensor) -> None:
        """Copy the KV of ``slots`` into ``out`` ``(layers, 2, len(slots), heads, head_dim)`` on this device."""
        if self.device.type == "cpu":
            runs = self._runs(slots)
            for layer, kv, view in self._planes():
                for block, offset, first, n in runs:
                    out[layer, kv, first : first + n] = view[block, offset : offset + n]
            return
        blocks, offsets = self._index(slots)
        for layer, kv, view in self._planes():
            out[layer, kv] = view[blocks, offsets]  # one vectorised gather per plane

    def scatter(self, slots: torch.Tensor, src: torch.Tensor) -> None:
        """Write ``src`` ``(layers, 2, len(slots), heads, head_dim)`` (on this device) into ``slots``."""
        if self.device.type == "cpu":
            runs = self._runs(slots)
            for layer, kv, view in self._planes():
                for block, offset, first, n in runs:
                    view[block, offset : offset + n] = src[layer, kv, first : first + n]
            return
        blocks, offsets = self._index(slots)
        for layer, kv, view in self._planes():
            view[blocks, offsets] = src[layer, kv]


class HostBuffer:
    """One reusable host buffer for kvtier's contiguous tensors (page-locked when the KV is on a GPU, so the
    copies are DMA and can run asynchronously). Grows to the largest request seen; never shrinks."""

    def __init__(self, dtype: torch.dtype, pin: bool) -> None:
        self.dtype = dtype
        self.pin = pin
        self._flat = torch.empty(0, dtype=dtype)

    def tensor(self, shape: tuple[int, ...]) -> torch.Tensor:
        """A contiguous tensor of ``shape`` over the start of the buffer (valid until the next call)."""
        numel = 1
        for size in shape:
            numel *= size
        if numel > self._flat.numel():
            self._flat = torch.empty(numel, dtype=self.dtype, pin_memory=self.pin)
        return self._flat[:numel].view(shape)


class PagedTransfer:
    """Gathers to and scatters from host memory; on CUDA the copies run on their own stream through a
    page-locked buffer, ordered after the model's writes (gather) and before its reads (scatter)."""

    def __init__(self, paged: PagedKV) -> None:
        self.paged = paged
        self.on_cuda = paged.device.type == "cuda"
        self.host = self.new_host_buffer()
        self.stream = torch.cuda.Stream(device=paged.device) if self.on_cuda else None

    def host_tensor(self, num_tokens: int, buffer: HostBuffer | None = None) -> torch.Tensor:
        """A host tensor for ``num_tokens`` tokens of KV, over ``buffer`` (default: this transfer's own)."""
        return (buffer or self.host).tensor(self.paged.staging_shape(num_tokens))

    def new_host_buffer(self) -> HostBuffer:
        """A host buffer of its own (for KV that outlives the next transfer), like this transfer's."""
        return HostBuffer(self.paged.dtype, pin=self.on_cuda)

    def gather_to_host(self, slots: torch.Tensor, host: torch.Tensor, start: int) -> None:
        """Fill tokens ``[start, start + len(slots))`` of ``host`` (see :meth:`host_tensor`) with the KV of
        ``slots``; returns when the copy is done."""
        end = start + len(slots)
        if self.stream is None:
            self.paged.gather(slots, host[:, :, start:end])
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.paged.device))  # the forward wrote this KV
        with torch.cuda.stream(self.stream):
            staged = torch.empty(self.paged.staging_shape(len(slots)), dtype=host.dtype, device=self.paged.device)
            self.paged.gather(slots, staged)
            for layer in range(host.shape[0]):
                for kv in range(2):  # each (layer, kv) token range is contiguous: a direct DMA from pinned memory
                    host[layer, kv, start:end].copy_(staged[layer, kv], non_blocking=True)
        self.stream.synchronize()

    def scatter_from_host(self, slots: torch.Tensor, host: torch.Tensor, start: int) -> None:
        """Write tokens ``[start, start + len(slots))`` of ``host`` into ``slots``; the model's stream waits for
        the copy before its next kernel."""
        end = start + len(slots)
        if self.stream is None:
            self.paged.scatter(slots, host[:, :, start:end])
            return
        current = torch.cuda.current_stream(self.paged.device)
        self.stream.wait_stream(current)  # vLLM may have zeroed these fresh blocks on its stream
        with torch.cuda.stream(self.stream):
            staged = torch.empty(self.paged.staging_shape(len(slots)), dtype=host.dtype, device=self.paged.device)
            for layer in range(host.shape[0]):
                for kv in range(2):
                    staged[layer, kv].copy_(host[layer, kv, start:end], non_blocking=True)
            self.paged.scatter(slots, staged)
        current.wait_stream(self.stream)
        # The host buffer is reused by the next load: it must have been read before this returns.
        self.stream.synchronize()
