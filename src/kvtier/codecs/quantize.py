"""The cheap lossy codecs: each (token, head) vector of ``head_dim`` values quantized on its own.

- ``int8``: symmetric, one fp16 scale per vector (absmax / 127): 1.9x smaller than fp16/bf16 for head_dim 64.
- ``int4``: asymmetric, an fp16 minimum and step per vector, two values per byte: 3.6x smaller for head_dim 64.

Encoded form: the per-vector parameters (fp16, vector order), then the codes (vector order; int4 packs value
``2i`` in the low and ``2i + 1`` in the high nibble). A chunk with a value a scale cannot represent (non-finite,
beyond fp16) is stored raw. Written with torch (``kvtier[torch]``): its kernels decode 8-9 GB/s here where
numpy's float16 conversion alone ran at 0.5 GB/s. What they cost in quality is measured per model
(``docs/compression.md``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvtier.codecs.base import FLOAT_DTYPES, Codec, as_float32, as_fp16, expect_end, finite, store_float32, take, tensor
from kvtier.memory.layout import KVLayout

if TYPE_CHECKING:
    import torch


def _bytes(values: torch.Tensor) -> memoryview:
    import torch

    return memoryview(values.contiguous().view(torch.uint8).numpy())


def _count(layout: KVLayout, num_tokens: int) -> int:
    return layout.num_layers * layout.kv_size * num_tokens * layout.num_kv_heads


class Int8Codec(Codec):
    name = "int8"
    codec_id = 2
    version = 1
    lossy = True

    def supports(self, layout: KVLayout, num_tokens: int) -> bool:
        return layout.dtype in FLOAT_DTYPES

    def encode(self, payload: memoryview, layout: KVLayout, num_tokens: int) -> bytes:
        import torch

        vectors = finite(as_float32(payload, layout))
        scales = as_fp16(vectors.abs().amax(dim=1) / 127)
        divisor = scales.float().clamp_min(torch.finfo(torch.float16).tiny)
        codes = (vectors / divisor[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        return b"".join((_bytes(scales), _bytes(codes)))

    def decode(self, encoded: memoryview, layout: KVLayout, num_tokens: int, out: memoryview) -> None:
        count = _count(layout, num_tokens)
        scales, offset = take(encoded, 0, 2 * count, "scales")
        codes, offset = take(encoded, offset, count * layout.head_dim, "codes")
        expect_end(encoded, offset)
        values = tensor(codes, "int8").view(count, -1).float().mul_(tensor(scales, "float16").float()[:, None])
        store_float32(values, layout, out)

    def max_encoded_size(self, layout: KVLayout, num_tokens: int) -> int:
        return _count(layout, num_tokens) * (2 + layout.head_dim)


class Int4Codec(Codec):
    name = "int4"
    codec_id = 3
    version = 1
    lossy = True

    def supports(self, layout: KVLayout, num_tokens: int) -> bool:
        return layout.dtype in FLOAT_DTYPES and layout.head_dim % 2 == 0

    def encode(self, payload: memoryview, layout: KVLayout, num_tokens: int) -> bytes:
        import torch

        vectors = finite(as_float32(payload, layout))
        low = as_fp16(vectors.amin(dim=1))
        step = as_fp16((vectors.amax(dim=1) - low.float()) / 15)
        divisor = step.float().clamp_min(torch.finfo(torch.float16).tiny)
        codes = ((vectors - low.float()[:, None]) / divisor[:, None]).round_().clamp_(0, 15).to(torch.uint8)
        packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
        return b"".join((_bytes(low), _bytes(step), _bytes(packed)))

    def decode(self, encoded: memoryview, layout: KVLayout, num_tokens: int, out: memoryview) -> None:
        import torch

        count = _count(layout, num_tokens)
        low, offset = take(encoded, 0, 2 * count, "minimums")
        step, offset = take(encoded, offset, 2 * count, "steps")
        packed, offset = take(encoded, offset, count * layout.head_dim // 2, "codes")
        expect_end(encoded, offset)
        pairs = tensor(packed, "uint8").view(count, -1)
        codes = torch.stack((pairs & 15, pairs >> 4), dim=2).view(count, -1).float()
        values = codes.mul_(tensor(step, "float16").float()[:, None]).add_(tensor(low, "float16").float()[:, None])
        store_float32(values, layout, out)

    def max_encoded_size(self, layout: KVLayout, num_tokens: int) -> int:
        return _count(layout, num_tokens) * (4 + layout.head_dim // 2)
