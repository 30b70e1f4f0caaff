"""Lossless compression for fp16/bf16/fp32 KV: byte shuffle + Zstandard (level 1), through C-Blosc2.

Floating-point KV barely compresses as it is (zstd alone: 1.09x on SmolLM2's fp16 KV); grouping the bytes of
each value by significance (the shuffle) puts the exponents together, and those compress (1.17x fp16, 1.46x bf16,
measured in ``benchmarks/bench_codecs.py``). C-Blosc2 does both with SIMD on several threads: 0.8-1.4 GB/s to
encode, 3-4 GB/s to decode here, against 0.5-0.9 GB/s for a numpy shuffle + python-zstandard. The bit shuffle
gave less on this KV (1.04 / 1.19x), LZ4 nearly nothing (1.01 / 1.13x).
"""

from __future__ import annotations

import blosc2

from kvtier.codecs.base import Codec
from kvtier.errors import CorruptChunkError
from kvtier.memory.layout import DTYPES_BY_NAME, KVLayout

LEVEL = 1  # level 5 compressed no better on KV and encoded 3-8x slower
THREADS = 2


def compress(data: object, *, typesize: int, shuffle: bool) -> bytes:
    """One Blosc2 frame of ``data``: Zstandard level :data:`LEVEL` on :data:`THREADS` threads, byte-shuffled or not."""
    filters = [blosc2.Filter.SHUFFLE if shuffle else blosc2.Filter.NOFILTER]
    return blosc2.compress2(  # type: ignore[no-any-return]
        data, codec=blosc2.Codec.ZSTD, clevel=LEVEL, typesize=typesize, filters=filters, nthreads=THREADS
    )


def decompress_into(frame: memoryview, out: object, nbytes: int) -> None:
    """Decode Blosc2 ``frame`` into ``out`` (``nbytes`` long); CorruptChunkError unless it is exactly that."""
    # Blosc2 writes as many bytes as the frame says, whatever the destination's size: both sizes are checked
    # before it runs.
    try:
        decoded, cbytes, _ = blosc2.get_cbuffer_sizes(frame)
    except ValueError as exc:
        raise CorruptChunkError(f"not a Blosc2 frame: {exc}") from None
    if decoded != nbytes or cbytes != len(frame):
        raise CorruptChunkError("Blosc2 frame sizes do not match the chunk")
    try:
        blosc2.decompress2(frame, dst=out, nthreads=THREADS)
    except (ValueError, RuntimeError) as exc:
        raise CorruptChunkError(f"Blosc2 frame does not decode: {exc}") from None


class LosslessCodec(Codec):
    name = "lossless"
    codec_id = 1
    version = 1
    lossy = False

    def supports(self, layout: KVLayout, num_tokens: int) -> bool:
        return layout.chunk_bytes(num_tokens) <= blosc2.MAX_BUFFERSIZE

    def encode(self, payload: memoryview, layout: KVLayout, num_tokens: int) -> bytes:
        return compress(payload, typesize=DTYPES_BY_NAME[layout.dtype].itemsize, shuffle=True)

    def decode(self, encoded: memoryview, layout: KVLayout, num_tokens: int, out: memoryview) -> None:
        decompress_into(encoded, out, len(out))

    def max_encoded_size(self, layout: KVLayout, num_tokens: int) -> int:
        return layout.chunk_bytes(num_tokens) + blosc2.MAX_OVERHEAD
