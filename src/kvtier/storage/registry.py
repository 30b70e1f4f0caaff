"""Building the tier stack from configuration, with remote tiers registered by URL scheme.

Remote tiers live in their own modules and are imported only when their scheme is used, so their client
libraries (redis, boto3, pymemcache, ...) stay optional extras. Other distributions add tiers through the
``kvtier.tiers`` entry point group (``docs/remote_tiers.md``, "Writing a tier").
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from importlib.metadata import entry_points
from urllib.parse import urlsplit

from kvtier.codecs.registry import codec_named
from kvtier.config import GiB, KVTierConfig
from kvtier.errors import ConfigError
from kvtier.memory.pool import MemoryPool
from kvtier.metrics import CacheMetrics
from kvtier.storage.base import StorageTier
from kvtier.storage.disk import DiskTier
from kvtier.storage.eviction import make_policy
from kvtier.storage.memory import MemoryTier
from kvtier.storage.tiered import TieredStorage

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TierEntry:
    """Where a remote tier's factory lives (``"module:factory"``; a factory takes ``(url, config, metrics)`` and
    returns a StorageTier) and what installs its client library when it is missing."""

    target: str
    install_hint: str = ""


def _extra(name: str) -> str:
    return f"pip install 'kvtier[{name}]'"


#: The remote tiers kvtier ships, by URL scheme. Others come from installed distributions' entry points.
BUILTIN_TIERS: dict[str, TierEntry] = {
    "kvtier": TierEntry("kvtier.storage.kvtier_remote:create_kvtier_tier"),
    "memcached": TierEntry("kvtier.storage.memcached:create_memcached_tier", _extra("memcached")),
    "mooncakestore": TierEntry(
        "kvtier.storage.mooncake:create_mooncake_tier",
        "pip install mooncake-transfer-engine (CUDA machines) or mooncake-transfer-engine-non-cuda, "
        "and the libibverbs1 system package it links",
    ),
    "redis": TierEntry("kvtier.storage.redis:create_redis_tier", _extra("redis")),
    "redis-cluster": TierEntry("kvtier.storage.redis:create_redis_tier", _extra("redis")),
    "redis-sentinel": TierEntry("kvtier.storage.redis:create_redis_tier", _extra("redis")),
    "rediss": TierEntry("kvtier.storage.redis:create_redis_tier", _extra("redis")),
    "s3": TierEntry("kvtier.storage.s3:create_s3_tier", _extra("s3")),
    "valkey": TierEntry("kvtier.storage.redis:create_redis_tier", _extra("redis")),
    "valkeys": TierEntry("kvtier.storage.redis:create_redis_tier", _extra("redis")),
}
#: Entry point group through which another distribution adds a tier: the entry point's name is the URL scheme,
#: its value the factory (``[project.entry-points."kvtier.tiers"] foo = "kvtier_foo:create_tier"``).
ENTRY_POINT_GROUP = "kvtier.tiers"


def remote_tiers() -> dict[str, TierEntry]:
    """Every remote tier available: kvtier's own, then those installed distributions register. A plugin cannot
    take over a scheme kvtier ships (it is ignored, with a warning)."""
    tiers = dict(BUILTIN_TIERS)
    for point in entry_points(group=ENTRY_POINT_GROUP):
        source = point.dist.name if point.dist is not None else "an installed distribution"
        if point.name in tiers:
            log.warning("ignoring %s's tier for %s://: kvtier has its own", source, point.name)
            continue
        tiers[point.name] = TierEntry(point.value, f"its client library belongs to {source}: reinstall it")
    return tiers


def create_remote_tier(url: str, config: KVTierConfig, metrics: CacheMetrics) -> StorageTier:
    scheme = urlsplit(url).scheme
    tiers = remote_tiers()
    entry = tiers.get(scheme)
    if entry is None:
        raise ConfigError(f"remote_url: no remote tier for scheme {scheme!r} (available: {', '.join(sorted(tiers))})")
    module_name, _, factory_name = entry.target.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), factory_name)
    except ImportError as exc:
        hint = f": {entry.install_hint}" if entry.install_hint else ""
        missing = (exc.name or "a library").split(".")[0]
        raise ConfigError(f"remote_url {scheme}:// needs {missing}{hint}") from None
    except AttributeError:
        raise ConfigError(f"remote_url {scheme}://: {entry.target} names no factory") from None
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
                codec=codec_named(config.local_disk_serde),
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
        history_entries=config.miss_history_entries,
    )
