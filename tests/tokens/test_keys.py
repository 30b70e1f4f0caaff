"""Namespaces and cache keys: isolation by every namespace field, string round trip, golden digest."""

from __future__ import annotations

import dataclasses

import pytest

from kvtier.tokens.hashing import HASH_SCHEME, HASH_SIZE
from kvtier.tokens.keys import (
    KEY_ID_SIZE,
    NAMESPACE_DIGEST_SIZE,
    CacheKey,
    Namespace,
    key_id_from_str,
    key_id_to_str,
    salt_digest,
)

LAYOUT = "lkthd-v1:L2:KV2:H2:D8:float16"
BASE = Namespace("meta-llama/Llama-3.1-8B", LAYOUT, 2, 1, "tenant-a")
CHUNK = bytes(range(HASH_SIZE))

# Pinned forever: the namespace digest names every stored chunk (disk directories, remote keys).
GOLDEN_DIGEST = "24cb55323b93549c7452164e307c10bc"
GOLDEN_DEFAULT_DIGEST = "8349c373988055ceb5b4e9275f0a9f8d"  # Namespace("m", "l")


def test_golden_namespace_digest():
    """The digest of a fixed namespace never changes."""
    assert BASE.digest.hex() == GOLDEN_DIGEST
    assert Namespace("m", "l").digest.hex() == GOLDEN_DEFAULT_DIGEST
    assert len(BASE.digest) == NAMESPACE_DIGEST_SIZE


def test_digest_is_deterministic_and_ignores_object_identity():
    """Equal namespaces built separately have equal digests and give equal, equally hashed keys."""
    twin = Namespace("meta-llama/Llama-3.1-8B", LAYOUT, 2, 1, "tenant-a")
    assert twin == BASE and twin.digest == BASE.digest
    assert twin.key(CHUNK) == BASE.key(CHUNK)
    assert hash(twin.key(CHUNK)) == hash(BASE.key(CHUNK))
    assert len({twin.key(CHUNK), BASE.key(CHUNK)}) == 1


@pytest.mark.parametrize(
    "change",
    [
        {"model_name": "meta-llama/Llama-3.1-70B"},
        {"layout": "lkthd-v1:L2:KV2:H2:D8:bfloat16"},
        {"world_size": 4},
        {"rank": 0},
        {"cache_salt": "tenant-b"},
        {"cache_salt": ""},
        {"hash_scheme": "blake2b256-chain-u32le-v2"},
    ],
    ids=lambda c: next(iter(c)),
)
def test_any_namespace_field_changes_key(change):
    """Namespaces differing in any one field give different key ids (and unequal keys) for the same chunk."""
    other = dataclasses.replace(BASE, **change)
    assert other.digest != BASE.digest
    assert other.key(CHUNK).id != BASE.key(CHUNK).id
    assert other.key(CHUNK) != BASE.key(CHUNK)
    assert other.key(CHUNK).to_str() != BASE.key(CHUNK).to_str()


def test_fields_are_length_prefixed():
    """Moving characters between adjacent fields cannot produce the same digest."""
    a = Namespace("ab", "c")
    b = Namespace("a", "bc")
    assert a.digest != b.digest
    assert Namespace("m", "l", cache_salt="x1").digest != Namespace("m", "l", cache_salt="x").digest


def test_different_chunk_hash_changes_key():
    """Within one namespace, keys differ exactly when chunk hashes differ."""
    other = bytes(HASH_SIZE)
    assert BASE.key(CHUNK) != BASE.key(other)
    assert BASE.key(CHUNK).id[:NAMESPACE_DIGEST_SIZE] == BASE.key(other).id[:NAMESPACE_DIGEST_SIZE]


def test_key_layout_and_string_round_trip():
    """A key id is digest + chunk hash; to_str/key_id_from_str round-trip it."""
    key = BASE.key(CHUNK)
    assert key.id == BASE.digest + CHUNK and len(key.id) == KEY_ID_SIZE
    text = key.to_str()
    assert text == f"{GOLDEN_DIGEST}/{CHUNK.hex()}"
    assert key_id_from_str(text) == key.id
    assert key_id_to_str(key.id) == text
    assert "/" in text and text.count("/") == 1 and all(c in "0123456789abcdef/" for c in text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "/",
        GOLDEN_DIGEST,
        f"{GOLDEN_DIGEST}/",
        f"/{CHUNK.hex()}",
        f"{GOLDEN_DIGEST}/{CHUNK.hex()[:-2]}",
        f"{GOLDEN_DIGEST}/{CHUNK.hex()}00",
        f"{GOLDEN_DIGEST[:-2]}/{CHUNK.hex()}00",
        f"{GOLDEN_DIGEST}00/{CHUNK.hex()[:-2]}",
        f"{GOLDEN_DIGEST}/{CHUNK.hex()[:-1]}z",
        f"{GOLDEN_DIGEST}{CHUNK.hex()}",
        f"{GOLDEN_DIGEST}/{CHUNK.hex()}.kvt",
        f"{GOLDEN_DIGEST}/{CHUNK.hex()}/x",
        f"{GOLDEN_DIGEST}/{CHUNK.hex()}\n",
        f" {GOLDEN_DIGEST}/{CHUNK.hex()}",
        f"{GOLDEN_DIGEST}/{' '.join(f'{b:02x}' for b in CHUNK)}",
    ],
)
def test_invalid_key_strings_rejected(text):
    """Anything but '<32 hex>/<64 hex>' raises ValueError."""
    with pytest.raises(ValueError):
        key_id_from_str(text)


@pytest.mark.parametrize("bad_hash", [b"", bytes(HASH_SIZE - 1), bytes(HASH_SIZE + 1)])
def test_key_requires_full_chunk_hash(bad_hash):
    """A chunk hash of the wrong size is rejected."""
    with pytest.raises(ValueError):
        CacheKey(BASE, bad_hash)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"model_name": "", "layout": LAYOUT},
        {"model_name": "m", "layout": LAYOUT, "world_size": 0},
        {"model_name": "m", "layout": LAYOUT, "world_size": 2, "rank": 2},
        {"model_name": "m", "layout": LAYOUT, "rank": -1},
        {"model_name": "m", "layout": LAYOUT, "cache_salt": "x" * 257},
    ],
)
def test_invalid_namespaces_rejected(kwargs):
    """Empty model names, ranks outside the world and oversized salts raise ValueError."""
    with pytest.raises(ValueError):
        Namespace(**kwargs)


def test_namespace_description_names_every_field_but_not_the_salt():
    """describe() records every field that feeds the digest (written next to disk chunks), the tenant's salt only
    as a digest; no repr shows the salt either."""
    assert BASE.describe() == {
        "model_name": "meta-llama/Llama-3.1-8B",
        "layout": LAYOUT,
        "world_size": 2,
        "rank": 1,
        "cache_salt_digest": salt_digest("tenant-a"),
        "hash_scheme": HASH_SCHEME,
    }
    assert "tenant-a" not in repr(BASE) and "tenant-a" not in str(BASE.describe())
    assert salt_digest("") == "" and salt_digest("a") != salt_digest("b")
