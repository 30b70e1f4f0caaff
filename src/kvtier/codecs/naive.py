"""The raw payload (LMCache's ``naive`` serde): what memory holds, byte for byte. Every reader accepts it."""

from __future__ import annotations

from kvtier.codecs.base import Codec
from kvtier.errors import CorruptChunkError
from kvtier.memory.layout import KVLayout


class NaiveCodec(Codec):
    name = "naive"
    codec_id = 0
    version = 0
    lossy = False

    def encode(self, payload: memoryview, layout: KVLayout, num_tokens: int) -> memoryview:
        return payload

    def decode(self, encoded: memoryview, layout: KVLayout, num_tokens: int, out: memoryview) -> None:
        if len(encoded) != len(out):
            raise CorruptChunkError("payload size does not match layout and token count")
        out[:] = encoded

    def max_encoded_size(self, layout: KVLayout, num_tokens: int) -> int:
        return layout.chunk_bytes(num_tokens)
