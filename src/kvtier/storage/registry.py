"""Building the tier stack from configuration, with remote tiers registered by URL scheme.

Remote tiers live in their own modules and are imported only when their scheme is used, so their client
libraries (redis, boto3, ...) stay optional extras.
"""

from __future__ import annotations

import importlib
from urllib.parse import urlsplit

from kvtier.config import GiB, KVTierConfig
from kvtier.errors import ConfigError
from kvtier.memory.pool import MemoryPool
from kvtier.metrics import CacheMetrics
from kvtier.storage.base import StorageTier
from kvtier.storage.disk import DiskTier
from kvtier.storage.eviction import make_policy
from kvtier.storage.memory import MemoryTier
from kvtier.storage.tiered import TieredStorage

#: URL scheme -> "module:factory"; a factory takes ``(url, config, metrics)`` and returns a StorageTier.
REMOTE_TIERS: dict[str, str] = {
    "kvtier": "kvtier.storage.kvtier_remote:create_kvtier_tier",
    "redis": "kvtier.storage.redis:create_redis_tier",
    "redis-cluster": "kvtier.storage.redis:create_redis_tier",
    "redis-sentinel": "kvtier.storage.redis:create_redis_tier",
    "rediss": "kvtier.storage.redis:create_redis_tier",
    "s3": "kvtier.storage.s3:create_s3_tier",
    "valkey": "kvtier.storage.redis:create_redis_tier",
    "valkeys": "kvtier.storage.redis:create_redis_tier",
}
#: Extra to install when a scheme's client library is missing.
REMOTE_EXTRAS = {"s3": "s3"}


def create_remote_tier(url: str, config: KVTierConfig, metrics: CacheMetrics) -> StorageTier:
    scheme = urlsplit(url).scheme
    target = REMOTE_TIERS.get(scheme)
    if target is None:
        known = ", ".join(sorted(REMOTE_TIERS)) or "none in this build"
        raise ConfigError(f"remote_url: no remote tier for scheme {scheme!r} (available: {known})")
    module_name, _, factory_name = target.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), factory_name)
    except ImportError as exc:
        extra = REMOTE_EXTRAS.get(scheme, "redis")
        raise ConfigError(f"remote_url {scheme}:// needs {exc.name}: pip install 'kvtier[{extra}]'") from None
    return factory(url, config, metrics)  # type: ignore[no-any-return]


def build_storage(config: KVTierConfig, metrics: CacheMetrics, *, shared_memory: str | None = None) -> TieredStorage:
    """Memory (if ``local_cpu``), then local disk (if ``local_disk``), then the remote tier (if ``remote_url``).

    ``shared_memory``: a file (e.g. in /dev/shm) backing the memory pool, so other processes can map it."""
    pool = MemoryPool(config.local_cpu_bytes, backing_file=shared_memory)
    if config.pin_local_cpu:
        pool.pin_for_cuda()  # makes every page resident itself
    elif config.local_cpu_prefault:
        pool.prefault()
    memory = MemoryTier(pool, make_policy(config.cache_policy), metrics) if config.local_cpu else None
    lower: list[StorageTier] = []
    if config.local_disk:
        lower.append(
            DiskTier(
                config.local_disk,
                config.local_disk_bytes,
                make_policy(config.cache_policy),
                metrics,
                fsync=config.disk_fsync,
            )
        )
    if config.remote_url:
        lower.append(create_remote_tier(config.remote_url, config, metrics))
    return TieredStorage(
        pool,
        memory,
        lower,
        metrics,
        max_queued_bytes=int(config.max_background_write_size * GiB),
        read_workers=config.read_workers,
    )
