"""Codecs: how a chunk is laid out as bytes outside process memory (versioned, checksummed)."""

from kvtier.codecs.chunk_format import (
    CHUNK_HEADER_SIZE,
    FORMAT_VERSION,
    ChunkHeader,
    decode_header,
    make_header,
    verify_payload,
)

__all__ = ["CHUNK_HEADER_SIZE", "FORMAT_VERSION", "ChunkHeader", "decode_header", "make_header", "verify_payload"]
