"""Cache keys: a chunk hash inside a namespace (model, KV layout, hash scheme, world size, rank, tenant salt).

Two keys are equal only if every namespace field and the chunk hash are equal, so KV of one model, layout,
parallel rank or tenant can never be served to another. Keys compare and hash by ``id`` (namespace digest +
chunk hash, 48 bytes), which also names the chunk in every storage tier.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from hashlib import blake2b

from kvtier.tokens.hashing import HASH_SCHEME, HASH_SIZE

NAMESPACE_DIGEST_SIZE = 16
KEY_ID_SIZE = NAMESPACE_DIGEST_SIZE + HASH_SIZE
MAX_SALT_LENGTH = 256


@dataclass(frozen=True, slots=True)
class Namespace:
    """Everything besides the tokens that decides whether stored KV may be reused."""

    model_name: str
    layout: str
    world_size: int = 1
    rank: int = 0
    cache_salt: str = field(default="", repr=False)  # a tenant's secret: never in a repr, a log line or a file
    hash_scheme: str = HASH_SCHEME
    digest: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.model_name:
            raise ValueError("model_name must not be empty")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} out of range for world_size {self.world_size}")
        if len(self.cache_salt) > MAX_SALT_LENGTH:
            raise ValueError(f"cache_salt longer than {MAX_SALT_LENGTH} characters")
        object.__setattr__(self, "digest", self._compute_digest())

    def _compute_digest(self) -> bytes:
        h = blake2b(digest_size=NAMESPACE_DIGEST_SIZE, person=b"kvtier.ns.v1")
        for part in (
            self.hash_scheme,
            self.model_name,
            self.layout,
            str(self.world_size),
            str(self.rank),
            self.cache_salt,
        ):
            raw = part.encode("utf-8")
            h.update(len(raw).to_bytes(4, "little"))
            h.update(raw)
        return h.digest()

    def key(self, chunk_hash: bytes) -> CacheKey:
        return CacheKey(self, chunk_hash)

    def fields(self) -> dict[str, object]:
        """Every field, salt included: what a peer needs to rebuild the namespace (:meth:`from_fields`)."""
        return {
            "model_name": self.model_name,
            "layout": self.layout,
            "world_size": self.world_size,
            "rank": self.rank,
            "cache_salt": self.cache_salt,
            "hash_scheme": self.hash_scheme,
        }

    @classmethod
    def from_fields(cls, fields: dict[str, object]) -> Namespace:
        """The namespace :meth:`fields` describes; ValueError for anything but those fields, correctly typed."""
        types = {
            "model_name": str,
            "layout": str,
            "world_size": int,
            "rank": int,
            "cache_salt": str,
            "hash_scheme": str,
        }
        if set(fields) != set(types) or not all(
            isinstance(fields[k], t) and not isinstance(fields[k], bool) for k, t in types.items()
        ):
            raise ValueError(f"a namespace has exactly the fields {sorted(types)}, correctly typed")
        return cls(**fields)  # type: ignore[arg-type]

    def describe(self) -> dict[str, object]:
        """What a person or tool may be shown of the namespace: every field, the salt only as
        :func:`salt_digest`."""
        return {
            "model_name": self.model_name,
            "layout": self.layout,
            "world_size": self.world_size,
            "rank": self.rank,
            "cache_salt_digest": salt_digest(self.cache_salt),
            "hash_scheme": self.hash_scheme,
        }


def salt_digest(cache_salt: str) -> str:
    """A stable digest of a tenant salt, for the server's own files (``namespace.json`` in its private disk
    directory), where a tenant must be recognised across restarts; "" for no salt. Listings use the server's
    keyed ids instead."""
    if not cache_salt:
        return ""
    return blake2b(cache_salt.encode(), digest_size=16, person=b"kvtier.salt.v1").hexdigest()


class CacheKey:
    """The identity of one stored chunk. Immutable; equality and hashing use ``id``."""

    __slots__ = ("chunk_hash", "id", "namespace")

    def __init__(self, namespace: Namespace, chunk_hash: bytes) -> None:
        if len(chunk_hash) != HASH_SIZE:
            raise ValueError(f"chunk hash must be {HASH_SIZE} bytes, got {len(chunk_hash)}")
        self.namespace: Namespace | None = namespace
        self.chunk_hash = chunk_hash
        self.id = namespace.digest + chunk_hash

    @classmethod
    def from_id(cls, key_id: bytes) -> CacheKey:
        """A key known only by its id (a peer sent it): same identity, no namespace details."""
        if len(key_id) != KEY_ID_SIZE:
            raise ValueError(f"key id must be {KEY_ID_SIZE} bytes, got {len(key_id)}")
        key = cls.__new__(cls)
        key.namespace, key.chunk_hash, key.id = None, key_id[NAMESPACE_DIGEST_SIZE:], bytes(key_id)
        return key

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CacheKey) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        model = self.namespace.model_name if self.namespace else "?"
        return f"CacheKey({model!r}, {self.to_str()})"

    def to_str(self) -> str:
        """``<namespace digest hex>/<chunk hash hex>``: safe as a file path, object name or Redis key."""
        return key_id_to_str(self.id)


def key_id_to_str(key_id: bytes) -> str:
    return f"{key_id[:NAMESPACE_DIGEST_SIZE].hex()}/{key_id[NAMESPACE_DIGEST_SIZE:].hex()}"


def key_id_from_str(text: str) -> bytes:
    """Inverse of :func:`key_id_to_str`; raises ValueError for anything else."""
    ns_hex, _, hash_hex = text.partition("/")
    key_id = bytes.fromhex(ns_hex) + bytes.fromhex(hash_hex)
    if len(ns_hex) != 2 * NAMESPACE_DIGEST_SIZE or len(hash_hex) != 2 * HASH_SIZE or len(key_id) != KEY_ID_SIZE:
        raise ValueError(f"not a kvtier key: {text!r}")
    return key_id
