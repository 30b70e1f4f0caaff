"""``KVTierConnector``: kvtier as a vLLM v1 KV connector.

vLLM creates one instance in its scheduler process (role SCHEDULER: lookups and the per-step plan) and one
in each worker process (role WORKER: the KV copies). Everything the worker needs travels in
:class:`~kvtier.integrations.vllm.metadata.KVTierConnectorMetadata`. Loads run before the forward, stores after
the forward that completes a prompt: in the step, or off it (``enable_async_loading``, ``async_store``: see
:mod:`kvtier.integrations.vllm.transfers`). Load with::

    --kv-transfer-config '{"kv_connector": "KVTierConnector", "kv_connector_module_path":
        "kvtier.integrations.vllm", "kv_role": "kv_both", "kv_connector_extra_config": {"chunk_size": 256}}'

See ``docs/vllm.md``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from kvtier.config import FIELDS, KVTierConfig, load_config
from kvtier.integrations.backend import KVBackend, open_backend
from kvtier.integrations.segment_io import SegmentFinder
from kvtier.integrations.vllm import compat
from kvtier.integrations.vllm.blending import WorkerBlender
from kvtier.integrations.vllm.compat import KVConnectorBase_V1, KVConnectorMetadata, KVConnectorRole
from kvtier.integrations.vllm.lookup import LookupClient, LookupServer, lookup_address
from kvtier.integrations.vllm.metadata import KVTierConnectorMetadata
from kvtier.integrations.vllm.scheduler import Lookup, SchedulerSide
from kvtier.integrations.vllm.stats import KVTierConnectorStats
from kvtier.integrations.vllm.worker import WorkerSide
from kvtier.metrics import IntegrationMetrics

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger("kvtier")
KEY_PREFIX = "kvtier."  # kv_connector_extra_config keys may be written "chunk_size" or "kvtier.chunk_size"


def connector_config(extra_config: dict[str, Any]) -> KVTierConfig:
    """kvtier's configuration: defaults < YAML (``KVTIER_CONFIG_FILE``) < ``LMCACHE_*`` < ``KVTIER_*`` < the
    kvtier keys of vLLM's ``kv_connector_extra_config``."""
    overrides = {}
    for key, value in extra_config.items():
        name = key.removeprefix(KEY_PREFIX)
        if name in FIELDS:
            overrides[name] = value
        else:
            log.warning("kvtier: ignoring kv_connector_extra_config key %r (not a kvtier setting)", key)
    return load_config(overrides=overrides)


def _setup_logging(level: str) -> None:
    """vLLM configures only its own loggers: give kvtier's a handler so its per-request lines are seen."""
    logger = logging.getLogger("kvtier")
    logger.setLevel(level.upper())
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [kvtier] %(message)s", "%m-%d %H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False


class KVTierConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        version = compat.check_version()
        compat.check_kv_cache_groups(kv_cache_config)
        self.config = connector_config(compat.extra_config(vllm_config))
        _setup_logging(self.config.log_level)
        self.layout = compat.kv_layout(vllm_config)
        self.block_size = compat.block_size(vllm_config)
        self.metrics = IntegrationMetrics()
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        self._closers: list[Any] = []
        if role == KVConnectorRole.SCHEDULER:
            self._init_scheduler(vllm_config)
        else:
            self._init_worker(vllm_config)
        log.info(
            "kvtier: vLLM %s connector (%s, %s) for %s: chunk size %d, vLLM block size %d, %s",
            version,
            role.name.lower(),
            vllm_config.kv_transfer_config.kv_role,
            compat.model_name(vllm_config),
            self.config.chunk_size,
            self.block_size,
            f"server {self.config.server_url}" if self.config.server_url else "in-process cache",
        )
        if role == KVConnectorRole.SCHEDULER and self.config.chunk_size % self.block_size:
            log.warning(
                "kvtier: chunk_size %d is not a multiple of vLLM's block size %d. It works (KV moves by slot), "
                "but vLLM's own prefix cache hits end on block boundaries, and kvtier loads from the chunk "
                "boundary before them: KV vLLM already has is read again. Prefer a multiple of %d.",
                self.config.chunk_size,
                self.block_size,
                self.block_size,
            )

    def _init_scheduler(self, vllm_config: VllmConfig) -> None:
        compat.recompute_failed_loads(vllm_config)
        lookup: Lookup
        if self.config.server_url:
            backend = self._open_backend(vllm_config, worker=False)
            self._closers.append(backend)
            lookup = lambda tokens, salt, segment: backend.lookup(tokens, cache_salt=salt, segment=segment)  # noqa: E731
        else:  # the cache lives in the worker: ask it
            client = LookupClient(
                lookup_address(vllm_config.kv_transfer_config.engine_id), self.config.server_timeout_sec, self.metrics
            )
            self._closers.append(client)
            lookup = lambda tokens, salt, segment: client.lookup(tokens, cache_salt=salt, segment=segment)  # noqa: E731
        self._scheduler = SchedulerSide(
            self.config,
            lookup=lookup,
            can_load=compat.can_load(vllm_config),
            can_save=compat.can_save(vllm_config),
            metrics=self.metrics,
            segments=SegmentFinder(self.config, compat.tokenizer(vllm_config)) if self.config.enable_blending else None,
        )
        self._closers.append(self._scheduler)

    def _init_worker(self, vllm_config: VllmConfig) -> None:
        if not self.config.server_url and compat.parallel_rank(vllm_config, worker=True)[0] > 1:
            raise compat.UnsupportedVLLMError(
                "kvtier's in-process mode serves one worker; with tensor parallelism set server_url"
            )
        blender = None
        if self.config.enable_blending:
            model = vllm_config.model_config
            blender = WorkerBlender(str(model.model), model.dtype, compat.device(vllm_config), self.config)
        backend = self._open_backend(vllm_config, worker=True)
        self._worker = WorkerSide(backend, self.layout, self.block_size, blender)
        self._closers.append(self._worker)
        if not self.config.server_url:
            self._closers.append(LookupServer(backend, lookup_address(vllm_config.kv_transfer_config.engine_id)))

    def _open_backend(self, vllm_config: VllmConfig, *, worker: bool) -> KVBackend:
        world_size, rank = compat.parallel_rank(vllm_config, worker=worker)
        return open_backend(
            self.config,
            self.layout,
            model_name=compat.model_name(vllm_config),
            world_size=world_size,
            rank=rank,
            metrics=self.metrics,
        )

    # ---- scheduler side ----

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self._scheduler is not None
        return self._scheduler.num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        assert self._scheduler is not None
        self._scheduler.after_alloc(request, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self._scheduler is not None
        return self._scheduler.build_meta(scheduler_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        assert self._scheduler is not None
        return self._scheduler.finished(request, block_ids)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a cache: a store lost to preemption is a later miss, not an error

    # ---- worker side ----

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self._worker is not None
        self._worker.register(kv_caches, compat.paged_layout(self._vllm_config, kv_caches))

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        assert self._worker is not None
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVTierConnectorMetadata)
        self._worker.load(meta)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self._worker is None:
            return None, None
        # A prompt's store copies out of the blocks in its step; only decode stores hold a finished request's.
        return self._worker.finished_stores() or None, self._worker.finished_loads() or None

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # start_load_kv loaded every layer already

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any
    ) -> None:
        return  # wait_for_save stores all layers at once, from the registered KV caches

    def wait_for_save(self) -> None:
        assert self._worker is not None
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVTierConnectorMetadata)
        self._worker.store(meta)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_failed_blocks() if self._worker is not None else set()

    def get_kv_connector_stats(self) -> KVTierConnectorStats | None:
        if self._worker is None:
            return None
        stats = self._worker.take_stats()
        return KVTierConnectorStats.from_data(stats.as_dict()) if stats.loads or stats.stores else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVTierConnectorStats:
        return KVTierConnectorStats.from_data(data)

    def shutdown(self) -> None:
        for closer in reversed(self._closers):
            closer.close()
        self._closers.clear()
