"""Chunk hashing: golden values, cross-process stability, input types, chaining and validation."""

from __future__ import annotations

import os
import subprocess
import sys
from hashlib import blake2b
from pathlib import Path

import numpy as np
import pytest
import torch

import kvtier
from kvtier.tokens.chunking import Chunker
from kvtier.tokens.hashing import HASH_SCHEME, chained_hashes, token_bytes

# Pinned forever: a change here is a cache format change (bump HASH_SCHEME and every stored chunk is lost).
GOLDEN = [
    (
        list(range(8)),
        4,
        False,
        [
            "703cf0201d8c44635758679e8261d3422ec59c2c3c417663ade127ba70e2ab25",
            "b13a0fa963dd0365690608880dc0fbe7d83a11845eaa6b032c6e24a89053d8e3",
        ],
    ),
    (
        list(range(10)),
        4,
        True,
        [
            "703cf0201d8c44635758679e8261d3422ec59c2c3c417663ade127ba70e2ab25",
            "b13a0fa963dd0365690608880dc0fbe7d83a11845eaa6b032c6e24a89053d8e3",
            "bf40c46a797647a9ae160cfea0f9f550a4221c30e16f6ea12da301178d50b4cf",
        ],
    ),
    (
        [1, 2, 3],
        1,
        False,
        [
            "801c9b22ab84059b944cd9fc644dc3b93275220704b2dbc62308553c2ca73d2f",
            "5a5f70c2e3a7cd1c34b65a826e556192be8de4f2d2178a1b292a37b13bfde95a",
            "260e40b0db5e413ae44cea15d606f7a495f37d678a7e579276d7305bf2e0661b",
        ],
    ),
    (
        [0, 2**32 - 1, 7, 42, 100000],
        2,
        True,
        [
            "8fb4775c654109d700518176655de9acde5c03c25a96c66be5dee8703bc274e0",
            "1e1fe10273dd6cce27800b81cdea35874a4dd54d7f941786faa3f1f2733b3e86",
            "e5bc8d4c25cdce005a61ec2d63e1d616e2d0c903080827df2566dc1c26f89aef",
        ],
    ),
]


def hex_hashes(tokens, chunk_size: int, include_partial: bool = False) -> list[str]:
    return [h.hex() for h in chained_hashes(token_bytes(tokens), chunk_size, include_partial)]


def reference_hashes(tokens: list[int], chunk_size: int, include_partial: bool) -> list[str]:
    """The documented scheme, written out independently of the implementation."""
    out, parent = [], bytes(32)
    usable = len(tokens) if include_partial else len(tokens) - len(tokens) % chunk_size
    for start in range(0, usable, chunk_size):
        chunk = tokens[start : min(start + chunk_size, usable)]
        h = blake2b(parent, digest_size=32, person=b"kvtier.chunk.v1")
        h.update(len(chunk).to_bytes(4, "little"))
        h.update(b"".join(t.to_bytes(4, "little") for t in chunk))
        parent = h.digest()
        out.append(parent.hex())
    return out


def test_hash_scheme_name_is_pinned():
    """The scheme name is part of every key; it changes only together with the golden values."""
    assert HASH_SCHEME == "blake2b256-chain-u32le-v1"


@pytest.mark.parametrize(("tokens", "chunk_size", "partial", "expected"), GOLDEN)
def test_golden_hashes(tokens, chunk_size, partial, expected):
    """chained_hashes gives exactly the pinned hex digests."""
    assert hex_hashes(tokens, chunk_size, partial) == expected


@pytest.mark.parametrize(("tokens", "chunk_size", "partial", "expected"), GOLDEN)
def test_golden_hashes_match_documented_scheme(tokens, chunk_size, partial, expected):
    """The golden values follow from the scheme described in the hashing module docstring."""
    assert reference_hashes(tokens, chunk_size, partial) == expected


def test_chunker_uses_golden_hashes():
    """Chunker exposes the same hashes with correct token ranges."""
    chunks = Chunker(4, include_partial=True).chunks(list(range(10)))
    assert [c.hash.hex() for c in chunks] == GOLDEN[1][3]
    assert [(c.index, c.start, c.end, c.num_tokens) for c in chunks] == [(0, 0, 4, 4), (1, 4, 8, 4), (2, 8, 10, 2)]


@pytest.mark.parametrize("seed", ["0", "12345"])
def test_hashes_stable_across_processes(seed):
    """A fresh interpreter with a different PYTHONHASHSEED computes the same hashes."""
    code = (
        "from kvtier.tokens.hashing import chained_hashes, token_bytes\n"
        "print(','.join(h.hex() for h in chained_hashes(token_bytes(list(range(10))), 4, True)))\n"
    )
    src = str(Path(kvtier.__file__).resolve().parent.parent)
    env = {"PYTHONHASHSEED": seed, "PYTHONPATH": src, "PATH": os.environ.get("PATH", "")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().split(",") == GOLDEN[1][3]


def test_input_types_hash_identically():
    """list, tuple, range, numpy int32/int64/uint32 and torch int32/int64 tensors give the same hashes."""
    tokens = [5, 0, 2**31 + 3, 17, 99, 1234567, 8, 2**32 - 1, 3]
    expected = hex_hashes(tokens, 4, True)
    small = [t for t in tokens if t < 2**31]
    variants = [
        tuple(tokens),
        np.array(tokens, dtype=np.int64),
        np.array(tokens, dtype=np.uint32),
        np.array(tokens, dtype=np.uint64),
        torch.tensor(tokens, dtype=torch.int64),
    ]
    for variant in variants:
        assert hex_hashes(variant, 4, True) == expected, type(variant)
    small_expected = hex_hashes(small, 3, True)
    for variant in (np.array(small, dtype=np.int32), torch.tensor(small, dtype=torch.int32), tuple(small)):
        assert hex_hashes(variant, 3, True) == small_expected
    assert hex_hashes(range(12), 4) == hex_hashes(list(range(12)), 4)


def test_non_contiguous_and_big_endian_arrays():
    """Strided and big-endian numpy arrays encode by value, not by memory layout."""
    tokens = np.arange(40, dtype=np.int64)
    assert hex_hashes(tokens[::2], 4) == hex_hashes(list(range(0, 40, 2)), 4)
    assert hex_hashes(tokens.astype(">i4"), 4) == hex_hashes(list(range(40)), 4)


def test_earlier_token_change_changes_later_hashes_only():
    """Changing token j changes the hash of its chunk and every later chunk, never an earlier chunk."""
    size = 4
    base = list(range(100, 120))
    base_hashes = hex_hashes(base, size)
    for j in range(len(base)):
        changed = list(base)
        changed[j] += 1
        hashes = hex_hashes(changed, size)
        owner = j // size
        assert hashes[:owner] == base_hashes[:owner], j
        for i in range(owner, len(base_hashes)):
            assert hashes[i] != base_hashes[i], (j, i)


def test_appending_tokens_keeps_existing_chunk_hashes():
    """A longer prompt shares the hashes of every full chunk of its prefix."""
    short = hex_hashes(list(range(12)), 4)
    long = hex_hashes(list(range(30)), 4)
    assert long[:3] == short


def test_partial_tail_differs_from_full_chunk_at_same_position():
    """A partial tail hash never equals the full chunk at its position, even with identical leading tokens."""
    full = hex_hashes(list(range(8)), 4)
    partial = hex_hashes(list(range(7)), 4, True)
    assert partial[0] == full[0]
    assert partial[1] != full[1]
    # Same bytes but different length: a zero token appended to the tail must still change the hash.
    assert hex_hashes([1, 2, 3, 0], 4) != hex_hashes([1, 2, 3], 4, True)


def test_partial_tail_excluded_by_default():
    """Without include_partial only full chunks are hashed."""
    assert len(hex_hashes(list(range(10)), 4)) == 2
    assert len(hex_hashes(list(range(10)), 4, True)) == 3
    assert Chunker(4).chunks(list(range(10)))[-1].end == 8


def test_chunk_size_one():
    """chunk_size 1 gives one hash per token, each chained on the previous."""
    hashes = hex_hashes(list(range(5)), 1)
    assert len(hashes) == len(set(hashes)) == 5
    assert hex_hashes([0, 1, 2], 1) == hashes[:3]


def test_chunk_size_larger_than_prompt():
    """A prompt shorter than one chunk has no full chunk, but one partial chunk when partials are kept."""
    assert hex_hashes(list(range(5)), 16) == []
    partial = Chunker(16, include_partial=True).chunks(list(range(5)))
    assert [(c.start, c.end) for c in partial] == [(0, 5)]
    assert partial[0].hash.hex() == reference_hashes(list(range(5)), 16, True)[0]


@pytest.mark.parametrize("empty", [[], (), np.array([], dtype=np.int64), torch.tensor([], dtype=torch.int64)])
def test_empty_prompt_has_no_chunks(empty):
    """An empty prompt (any container) yields no chunks, with or without partials."""
    assert hex_hashes(empty, 4, True) == []
    assert Chunker(4, include_partial=True).chunks(empty) == []


@pytest.mark.parametrize(
    "bad",
    [
        [1, -1, 2],
        [2**32],
        [1.0, 2.0],
        [1, 2.5],
        ["1"],
        [[1, 2], [3, 4]],
        np.array([1, -1]),
        np.array([2**32], dtype=np.int64),
        np.array([1.0, 2.0]),
        np.array([[1, 2], [3, 4]]),
        np.array(5),
        torch.tensor([1, -2]),
        torch.tensor([1.0, 2.0]),
        torch.tensor([[1, 2]]),
    ],
    ids=lambda v: f"{type(v).__name__}:{v.tolist() if hasattr(v, 'tolist') else v}",
)
def test_invalid_tokens_rejected(bad):
    """Negative, too large, non-integer and multi-dimensional token ids raise ValueError."""
    with pytest.raises(ValueError):
        token_bytes(bad)
    with pytest.raises(ValueError):
        Chunker(2).chunks(bad)


@pytest.mark.parametrize("size", [0, -3])
def test_invalid_chunk_size_rejected(size):
    """chunk_size below 1 is rejected by both the chunker and chained_hashes."""
    with pytest.raises(ValueError):
        Chunker(size)
    with pytest.raises(ValueError):
        chained_hashes(token_bytes([1, 2]), size, False)
