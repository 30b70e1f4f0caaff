"""kvtier: a tiered KV cache for LLM inference that turns repeated prefill into reusable KV."""

from kvtier.config import KVTierConfig, load_config
from kvtier.engine import CacheEngine, LookupResult, RetrieveResult, StoreResult
from kvtier.memory import KVLayout

__version__ = "0.1.0"

__all__ = [
    "CacheEngine",
    "KVLayout",
    "KVTierConfig",
    "LookupResult",
    "RetrieveResult",
    "StoreResult",
    "__version__",
    "load_config",
]
