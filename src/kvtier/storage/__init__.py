"""Storage tiers behind one interface, composed by :class:`TieredStorage`."""

from kvtier.storage.base import StorageTier, TierUsage
from kvtier.storage.disk import DiskTier
from kvtier.storage.eviction import EVICTION_POLICIES, EvictionPolicy, make_policy
from kvtier.storage.memory import MemoryTier
from kvtier.storage.tiered import TieredStorage

__all__ = [
    "EVICTION_POLICIES",
    "DiskTier",
    "EvictionPolicy",
    "MemoryTier",
    "StorageTier",
    "TierUsage",
    "TieredStorage",
    "make_policy",
]
