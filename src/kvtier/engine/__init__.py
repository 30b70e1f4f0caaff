"""The cache engine and how KV moves in and out of it."""

from kvtier.engine.cache_engine import CacheEngine
from kvtier.engine.leases import Lease
from kvtier.engine.results import LookupResult, RetrieveResult, StoreResult
from kvtier.engine.transfer import KVDestination, KVSource

__all__ = ["CacheEngine", "KVDestination", "KVSource", "Lease", "LookupResult", "RetrieveResult", "StoreResult"]
