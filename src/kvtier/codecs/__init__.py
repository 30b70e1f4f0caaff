"""Codecs: how a chunk is laid out as bytes outside process memory (versioned, checksummed)."""

from kvtier.codecs.chunk_format import (
    FORMAT_VERSION,
    HEADER_SIZE,
    ChunkHeader,
    decode_header,
    make_header,
    verify_payload,
)

__all__ = ["FORMAT_VERSION", "HEADER_SIZE", "ChunkHeader", "decode_header", "make_header", "verify_payload"]
