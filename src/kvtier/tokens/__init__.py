"""Tokens -> chunks -> cache keys."""

from kvtier.tokens.chunking import Chunk, Chunker
from kvtier.tokens.hashing import HASH_SCHEME, chained_hashes, token_bytes
from kvtier.tokens.keys import CacheKey, Namespace

__all__ = ["HASH_SCHEME", "CacheKey", "Chunk", "Chunker", "Namespace", "chained_hashes", "token_bytes"]
