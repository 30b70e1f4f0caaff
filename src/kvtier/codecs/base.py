"""What a payload codec is: how a chunk's KV bytes are turned into fewer bytes for a slow tier, and back.

A codec transforms the payload only; the chunk header (``kvtier.codecs.chunk_format``) records the codec's id and
version, so a reader always knows how a payload was encoded, and the payload CRC covers the encoded bytes, so
damage is caught before anything is decoded. Lossless codecs give back the stored bytes exactly; lossy ones give
back KV within the bound their quality gate measured (``docs/compression.md``).
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

from kvtier.errors import CorruptChunkError
from kvtier.memory.layout import DTYPES_BY_NAME, KVLayout

if TYPE_CHECKING:
    import torch

FLOAT_DTYPES = ("float16", "bfloat16", "float32")
FP16_MAX = 65504.0


class CannotEncode(ValueError):
    """This chunk is not for this codec (e.g. values a quantizer cannot represent): store it raw."""


class Codec(ABC):
    """One payload encoding. ``codec_id`` and ``version`` go in the chunk header: a codec whose encoded form
    changes gets a new version, and chunks written by the old one are then misses, never misdecoded."""

    name: ClassVar[str]
    codec_id: ClassVar[int]
    version: ClassVar[int]
    lossy: ClassVar[bool]

    def supports(self, layout: KVLayout, num_tokens: int) -> bool:
        """Whether this codec can encode chunks of ``layout`` (a chunk it cannot is stored raw)."""
        return True

    @abstractmethod
    def encode(self, payload: memoryview, layout: KVLayout, num_tokens: int) -> bytes | memoryview:
        """The encoded form of ``payload`` (``layout.chunk_bytes(num_tokens)`` raw bytes). Raises
        :class:`CannotEncode` for a chunk this codec must not encode (it is then stored raw)."""

    @abstractmethod
    def decode(self, encoded: memoryview, layout: KVLayout, num_tokens: int, out: memoryview) -> None:
        """Fill ``out`` (``layout.chunk_bytes(num_tokens)`` bytes) from ``encoded``. Raises CorruptChunkError for
        an encoded form that does not decode to exactly that."""

    def max_encoded_size(self, layout: KVLayout, num_tokens: int) -> int:
        """The largest encoded size a valid chunk can have: a header claiming more is corrupt (or hostile)."""
        return layout.chunk_bytes(num_tokens) + (64 << 10)


def tensor(buffer: memoryview, dtype: str) -> torch.Tensor:
    """A flat torch view of ``buffer`` (no copy) as ``dtype`` (a kvtier dtype name, e.g. ``bfloat16``)."""
    import torch

    with warnings.catch_warnings():  # read-only stored bytes are only ever read here
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(buffer, dtype=getattr(torch, DTYPES_BY_NAME[dtype].torch_name))


def as_float32(payload: memoryview, layout: KVLayout) -> torch.Tensor:
    """A float payload as float32 values, one row per (layer, k/v, token, head) vector of ``head_dim``."""
    return tensor(payload, layout.dtype).float().view(-1, layout.head_dim)


def finite(values: torch.Tensor) -> torch.Tensor:
    """``values``, or CannotEncode if any is not finite (no scale represents it: the chunk is stored raw)."""
    if not values.isfinite().all():
        raise CannotEncode("non-finite KV values")
    return values


def as_fp16(values: torch.Tensor) -> torch.Tensor:
    """``values`` (scales, minimums) in fp16, or CannotEncode if one is beyond fp16's range."""
    import torch

    if values.abs().max() > FP16_MAX:
        raise CannotEncode("KV values beyond fp16's range")
    return values.to(torch.float16)


def store_float32(values: torch.Tensor, layout: KVLayout, out: memoryview) -> None:
    """Write float32 ``values`` into ``out`` in the layout's dtype (rounded to nearest)."""
    tensor(out, layout.dtype).view(values.shape).copy_(values)


def take(encoded: memoryview, offset: int, nbytes: int, what: str) -> tuple[memoryview, int]:
    """``nbytes`` of ``encoded`` from ``offset`` and the offset after them; CorruptChunkError if it is short."""
    end = offset + nbytes
    if nbytes < 0 or end > len(encoded):
        raise CorruptChunkError(f"encoded payload too short for its {what}")
    return encoded[offset:end], end


def expect_end(encoded: memoryview, offset: int) -> None:
    """CorruptChunkError unless ``offset`` is the end of ``encoded`` (nothing may follow a codec's contents)."""
    if offset != len(encoded):
        raise CorruptChunkError("encoded payload longer than its contents")
