"""The kvtier error hierarchy.

A cache miss is never an exception: lookups and retrieves return results whose hit count may be zero.
Exceptions are for misuse (bad arguments, bad configuration) and for failures a caller must see.
"""

from __future__ import annotations


class KVTierError(Exception):
    """Base class of every error kvtier raises on purpose."""


class ConfigError(KVTierError, ValueError):
    """A configuration key is unknown or its value is invalid; the message names the key."""


class LayoutError(KVTierError, ValueError):
    """KV data does not match the layout the cache was set up for."""


class StorageError(KVTierError):
    """A storage tier failed to read or write."""


class CorruptChunkError(StorageError):
    """A stored chunk failed verification (bad magic, version, checksum, size or key)."""


class TruncatedChunkError(CorruptChunkError):
    """A stored chunk is shorter than its header says."""


class CodecMismatchError(CorruptChunkError):
    """A stored chunk is sound but encoded in a codec (or codec version) this reader does not take: a miss here,
    and kept for the readers that do."""
