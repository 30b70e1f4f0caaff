"""Prefix-chained chunk hashes over a canonical byte encoding of token ids.

Chunk ``i``'s hash is ``BLAKE2b-256(person="kvtier.chunk.v1", h[i-1] || len_i as u32le || tokens_i as u32le)``
with ``h[-1]`` 32 zero bytes, so each hash commits to every token before it and to its own length (a partial
tail chunk never equals a full one). BLAKE2b from the standard library is used, never Python's ``hash()``:
the same tokens give the same hashes in every process, on every machine, forever. Changing any of this is a
format change: bump ``HASH_SCHEME`` (it is part of every key) and the golden values in the tests.
"""

from __future__ import annotations

import array
import sys
from collections.abc import Sequence
from hashlib import blake2b
from typing import Any

import numpy as np

HASH_SCHEME = "blake2b256-chain-u32le-v1"
HASH_SIZE = 32
ROOT_HASH = bytes(HASH_SIZE)
_PERSON = b"kvtier.chunk.v1"
_MAX_TOKEN = 2**32 - 1


def token_bytes(tokens: Any) -> bytes:
    """Encode token ids as little-endian uint32 bytes; reject ids outside ``[0, 2**32)``.

    Accepts a list/tuple of ints, a numpy integer array or a CPU torch tensor (duck-typed, no import).
    """
    if hasattr(tokens, "detach") and hasattr(tokens, "numpy"):
        tokens = tokens.detach().cpu().numpy()
    if isinstance(tokens, np.ndarray):
        return _array_bytes(tokens)
    if isinstance(tokens, (list, tuple, range)):
        return _sequence_bytes(tokens)
    return _array_bytes(np.asarray(tokens))


def _array_bytes(tokens: np.ndarray) -> bytes:
    if tokens.ndim != 1:
        raise ValueError(f"token ids must be one-dimensional, got shape {tokens.shape}")
    if tokens.size and tokens.dtype.kind not in "iu":
        raise ValueError(f"token ids must be integers, got dtype {tokens.dtype}")
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) > _MAX_TOKEN):
        raise ValueError("token ids must lie in [0, 2**32)")
    return tokens.astype("<u4", copy=False).tobytes()


def _sequence_bytes(tokens: Sequence[int]) -> bytes:
    # array('I') is several times faster than numpy for Python lists and range-checks each id.
    try:
        packed = array.array("I", tokens)
    except (OverflowError, TypeError) as exc:
        raise ValueError(f"token ids must be ints in [0, 2**32): {exc}") from None
    if packed.itemsize != 4:
        return np.asarray(tokens, dtype="<u4").tobytes()
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tobytes()


def chunk_hash(parent: bytes, chunk: bytes) -> bytes:
    """Hash one chunk's token bytes (u32le) onto its parent's hash."""
    h = blake2b(parent, digest_size=HASH_SIZE, person=_PERSON)
    h.update((len(chunk) // 4).to_bytes(4, "little"))
    h.update(chunk)
    return h.digest()


def chained_hashes(encoded: bytes, chunk_size: int, include_partial: bool) -> list[bytes]:
    """Hashes of consecutive ``chunk_size``-token chunks of u32le-encoded tokens."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    step = chunk_size * 4
    end = len(encoded) if include_partial else len(encoded) - len(encoded) % step
    hashes: list[bytes] = []
    parent = ROOT_HASH
    view = memoryview(encoded)
    for start in range(0, end, step):
        parent = chunk_hash(parent, view[start : min(start + step, end)])
        hashes.append(parent)
    return hashes
