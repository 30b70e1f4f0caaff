"""kvtier as SGLang HiCache's L3 storage backend: ``--hicache-storage-backend dynamic`` with this class.

    python -m sglang.launch_server --model-path MODEL --enable-hierarchical-cache \\
        --hicache-storage-backend dynamic --hicache-mem-layout page_first \\
        --hicache-storage-backend-extra-config '{"backend_name": "kvtier",
            "module_path": "kvtier.integrations.sglang.hicache", "class_name": "KVTierHiCacheStorage",
            "kvtier": {"remote_url": "kvtier://127.0.0.1:65432", "local_cpu": false}}'

SGLang's host pool (L2) hands over whole pages: ``batch_set_v1`` / ``batch_get_v1`` name pages by SGLang's own
chained page hashes and give host-pool indices, whose buffers (a K and a V block per page in the ``page_first``
layouts) this backend copies to and from kvtier chunks; ``batch_exists`` counts the consecutive pages from the
start that kvtier holds. The ``kvtier`` object of the extra config is kvtier's configuration (over
``$KVTIER_CONFIG_FILE`` and ``KVTIER_*``/``LMCACHE_*`` variables): the tiers to use, e.g. a kvtier server
(``remote_url: kvtier://...``) so several SGLang instances share it, or memory, disk and Redis in-process.

Keys: each page hash becomes a kvtier key (BLAKE2b of it) in a namespace of the model (``model_name``), the host
pool's geometry and layout (layers, heads, head dim, dtype, page size, SGLang's memory layout), the TP rank and size
and the tenant salt (``cache_salt`` in the extra config), so another model, layout or rank never reads these
pages. A page's bytes are stored in kvtier's checksummed chunk format: a damaged or truncated one is a miss, never
wrong KV.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
from typing import Any

import numpy as np
import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig, HiCacheStorageExtraInfo

from kvtier.config import load_config
from kvtier.memory.layout import KVLayout
from kvtier.memory.memory_obj import MemoryObj
from kvtier.metrics import CacheMetrics
from kvtier.storage.registry import build_storage
from kvtier.tokens.keys import CacheKey, Namespace

log = logging.getLogger(__name__)
PAGE_HASH_PERSON = b"kvtier.sglang"


class KVTierHiCacheStorage(HiCacheStorage):
    """HiCache L3 storage on kvtier's tiers (see the module docstring)."""

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: dict[str, Any] | None = None) -> None:
        extra = storage_config.extra_config or {}
        self.config = load_config(overrides=extra.get("kvtier") or {})
        self.metrics = CacheMetrics()
        self.storage = build_storage(self.config, self.metrics)
        self.storage_config = storage_config
        self.cache_salt = str(extra.get("cache_salt", ""))  # a tenant's secret: separates its pages from others'
        self.namespace: Namespace | None = None
        self.layout: KVLayout | None = None
        self.page_size = 0

    # -- the host pool ------------------------------------------------------------------------------------------
    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        """Take the host pool's geometry: it sizes the chunks and is part of every key's namespace."""
        super().register_mem_pool_host(mem_pool_host)
        host = mem_pool_host
        dtype = str(host.dtype).removeprefix("torch.")
        self.layout = KVLayout(host.layer_num, host.head_num, host.head_dim, dtype)
        self.page_size = host.page_size
        cfg = self.storage_config
        self.namespace = Namespace(
            (cfg.model_name or "sglang-model").replace("/", "-"),
            f"{self.layout.descriptor()}+sglang-{host.layout}-page{host.page_size}",
            world_size=cfg.tp_size,
            rank=cfg.tp_rank,
            cache_salt=self.cache_salt,
        )

    def _keys(self, page_hashes: list[str]) -> list[CacheKey]:
        if self.namespace is None:
            raise RuntimeError("register_mem_pool_host first: the host pool's geometry is part of every key")
        digests = (hashlib.blake2b(h.encode(), digest_size=32, person=PAGE_HASH_PERSON).digest() for h in page_hashes)
        return [self.namespace.key(d) for d in digests]

    def _page_buffers(self, host_indices: torch.Tensor, pages: int) -> list[list[tuple[int, int]]] | None:
        """(address, size) of each page's buffers in the host pool, in the pool's own order; None (logged) when
        the indices do not cover ``pages`` whole pages: then nothing is read or written."""
        ptrs, sizes = self.mem_pool_host.get_page_buffer_meta(host_indices)
        per_page = len(ptrs) // max(1, pages)
        if not pages or not per_page or per_page * pages != len(ptrs):
            log.warning("HiCache handed %d host buffers for %d pages: not transferred", len(ptrs), pages)
            return None
        return [list(zip(ptrs[i * per_page : (i + 1) * per_page], sizes[i * per_page : (i + 1) * per_page],
                         strict=True)) for i in range(pages)]  # fmt: skip

    # -- v1: zero-copy on host pool pages -----------------------------------------------------------------------
    def batch_exists(self, keys: list[str], extra_info: HiCacheStorageExtraInfo | None = None) -> int:
        """How many pages from the first are held (SGLang loads only a prefix)."""
        return len(self.storage.locate(self._keys(keys)))

    def batch_set_v1(
        self, keys: list[str], host_indices: torch.Tensor, extra_info: HiCacheStorageExtraInfo | None = None
    ) -> list[bool]:
        assert self.layout is not None
        pages = self._page_buffers(host_indices, len(keys))
        if pages is None:
            return [False] * len(keys)
        cache_keys, objs = self._keys(keys), []
        for buffers in pages:
            obj = self.storage.allocate(self.layout, self.page_size)
            if obj is None or obj.nbytes != sum(size for _, size in buffers):
                if obj is not None:
                    obj.unref()
                break  # memory is short (or the pool is not what was registered): store a prefix
            _gather(buffers, obj)
            objs.append(obj)
        try:
            self.storage.write(cache_keys[: len(objs)], objs)
        finally:
            for obj in objs:
                obj.unref()
        return [i < len(objs) for i in range(len(keys))]

    def batch_get_v1(
        self, keys: list[str], host_indices: torch.Tensor, extra_info: HiCacheStorageExtraInfo | None = None
    ) -> list[bool]:
        pages = self._page_buffers(host_indices, len(keys))
        if pages is None:
            return [False] * len(keys)
        cache_keys = self._keys(keys)
        sources = self.storage.locate(cache_keys, ask_remote=False)
        read = self.storage.read(cache_keys[: len(sources)], sources)
        loaded = 0
        try:
            for buffers, obj in zip(pages, read.objs, strict=False):
                if obj.nbytes != sum(size for _, size in buffers):
                    break
                _scatter(obj, buffers)
                loaded += 1
        finally:
            for obj in read.objs:
                obj.unref()
        return [i < loaded for i in range(len(keys))]

    # -- the older tensor interface (SGLang's abstract methods) -----------------------------------------------
    def get(self, key: str, target_location: Any = None, target_sizes: Any = None) -> torch.Tensor | None:
        got = self.batch_get([key], [target_location] if target_location is not None else None)
        return got[0] if isinstance(got, list) else None

    def batch_get(
        self, keys: list[str], target_locations: Any = None, target_sizes: Any = None
    ) -> list[torch.Tensor | None]:
        """Values stored by :meth:`batch_set`, copied into ``target_locations`` (tensors of their size)."""
        cache_keys = self._keys(keys)
        sources = self.storage.locate(cache_keys, ask_remote=False)
        read = self.storage.read(cache_keys[: len(sources)], sources)
        out: list[torch.Tensor | None] = [None] * len(keys)
        try:
            for i, obj in enumerate(read.objs):
                target = target_locations[i] if target_locations is not None else None
                if target is None or target.numel() * target.element_size() != obj.nbytes:
                    continue
                target.view(torch.uint8).reshape(-1).numpy()[:] = obj.data
                out[i] = target
        finally:
            for obj in read.objs:
                obj.unref()
        return out

    def set(self, key: str, value: Any = None, target_location: Any = None, target_sizes: Any = None) -> bool:
        return self.batch_set([key], [value])

    def batch_set(
        self, keys: list[str], values: Any = None, target_locations: Any = None, target_sizes: Any = None
    ) -> bool:
        """Tensors of one page each (the host pool's page bytes)."""
        assert self.layout is not None
        objs: list[MemoryObj] = []
        try:
            for value in values or []:
                obj = self.storage.allocate(self.layout, self.page_size)
                raw = value.contiguous().view(torch.uint8).reshape(-1).numpy()
                if obj is None or obj.nbytes != raw.nbytes:
                    if obj is not None:
                        obj.unref()
                    return False
                obj.data[:] = raw
                objs.append(obj)
            self.storage.write(self._keys(keys), objs)
            return True
        finally:
            for obj in objs:
                obj.unref()

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    def clear(self) -> None:
        self.storage.clear()

    def get_stats(self) -> dict[str, float] | None:
        return None

    def close(self) -> None:
        self.storage.close()


def _gather(buffers: list[tuple[int, int]], obj: MemoryObj) -> None:
    """Copy a page's host buffers, in order, into ``obj``."""
    offset, base = 0, obj.data.ctypes.data
    for address, size in buffers:
        ctypes.memmove(base + offset, address, size)
        offset += size


def _scatter(obj: MemoryObj, buffers: list[tuple[int, int]]) -> None:
    offset, base = 0, np.ascontiguousarray(obj.data).ctypes.data
    for address, size in buffers:
        ctypes.memmove(address, base + offset, size)
        offset += size
