"""Where an engine integration keeps KV: an in-process :class:`CacheEngine` or a ``kvtier server``.

Both integrations (transformers, vLLM) move KV through the same three calls, on a contiguous
``(layers, kv, tokens, heads, head_dim)`` torch tensor on the CPU: :meth:`KVBackend.lookup`,
:meth:`KVBackend.retrieve` into it, :meth:`KVBackend.store` from it. Which backend is used is configuration
(``server_url``), never code in the integration.

A backend never raises for a cache failure: a server that is down, slow or answers garbage, or a tier error,
becomes a miss (lookup 0, nothing loaded, nothing stored), counted in ``kvtier_integration_backend_errors_total``
and logged at most once per ``WARN_EVERY_SEC``, so the model recomputes instead of failing the request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from kvtier.config import KVTierConfig
from kvtier.engine.cache_engine import CacheEngine
from kvtier.memory.layout import KVLayout
from kvtier.metrics import CacheMetrics, IntegrationMetrics

log = logging.getLogger("kvtier")
WARN_EVERY_SEC = 10.0
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Loaded:
    """What :meth:`KVBackend.retrieve` put into the caller's tensor: tokens ``[skip_tokens, loaded_end)``."""

    loaded_end: int  # 0 when nothing was loaded (a miss)
    loaded_tokens: int
    tier_tokens: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


class KVBackend:
    """The cache as an integration sees it. Subclasses implement the ``_lookup/_retrieve/_store`` calls."""

    kind = "?"

    def __init__(
        self,
        config: KVTierConfig,
        layout: KVLayout,
        *,
        model_name: str,
        world_size: int = 1,
        rank: int = 0,
        metrics: IntegrationMetrics | None = None,
    ) -> None:
        self.config = config
        self.layout = layout
        self.chunk_size = config.chunk_size
        self.metrics = metrics or IntegrationMetrics()
        self._last_warning = 0.0
        self._connect(model_name, world_size, rank)

    def _connect(self, model_name: str, world_size: int, rank: int) -> None:
        """Open the engine or the connection for this model, layout and parallel rank."""
        raise NotImplementedError

    def lookup(self, tokens: Any, *, cache_salt: str = "", segment: bool = False) -> int:
        """Length of the longest cached prefix of ``tokens`` (0 when the cache cannot be reached). Each call takes
        ``segment``: ``tokens`` are then one segment, cached by its own content (reused at any position)."""
        return self._guard("lookup", 0, lambda: self._lookup(tokens, cache_salt, segment))

    def retrieve(
        self, tokens: Any, out: Any, *, skip_tokens: int = 0, cache_salt: str = "", segment: bool = False
    ) -> Loaded:
        """Load the cached KV of ``tokens`` from ``skip_tokens`` (a multiple of ``chunk_size``) into ``out``, a
        CPU tensor ``(layers, kv, n, heads, head_dim)``; only chunks ending within ``n`` are loaded."""
        if skip_tokens % self.chunk_size:
            raise ValueError(f"skip_tokens {skip_tokens} is not a multiple of chunk_size {self.chunk_size}")
        started = time.perf_counter()
        call = lambda: self._retrieve(tokens, out, skip_tokens, cache_salt, segment)  # noqa: E731
        loaded = self._guard("retrieve", Loaded(0, 0), call)
        return Loaded(loaded.loaded_end, loaded.loaded_tokens, loaded.tier_tokens, time.perf_counter() - started)

    def store(self, tokens: Any, kv: Any, *, skip_tokens: int = 0, cache_salt: str = "", segment: bool = False) -> int:
        """Store the KV of ``tokens`` (``kv`` covers all of them; tokens before ``skip_tokens``, a multiple of
        ``chunk_size``, are cached already and not read). Returns the tokens newly stored."""
        if skip_tokens % self.chunk_size:
            raise ValueError(f"skip_tokens {skip_tokens} is not a multiple of chunk_size {self.chunk_size}")
        return self._guard("store", 0, lambda: self._store(tokens, kv, skip_tokens, cache_salt, segment))

    def close(self) -> None:
        """Release the engine or connection (an in-process engine finishes its queued disk writes)."""

    def _guard(self, op: str, fallback: T, call: Callable[[], T]) -> T:
        try:
            return call()
        except (ValueError, TypeError):
            raise  # the caller's mistake (wrong shape, dtype): a bug to fix, not a cache outage
        except Exception as exc:
            self.metrics.backend_errors.inc(op=op)
            now = time.monotonic()
            if now - self._last_warning >= WARN_EVERY_SEC:
                self._last_warning = now
                log.warning("kvtier %s failed (%s: %s): treating it as a miss", op, type(exc).__name__, exc)
            return fallback

    def _lookup(self, tokens: Any, cache_salt: str, segment: bool) -> int:
        raise NotImplementedError

    def _retrieve(self, tokens: Any, out: Any, skip_tokens: int, cache_salt: str, segment: bool) -> Loaded:
        raise NotImplementedError

    def _store(self, tokens: Any, kv: Any, skip_tokens: int, cache_salt: str, segment: bool) -> int:
        raise NotImplementedError


class InProcessBackend(KVBackend):
    """A :class:`CacheEngine` with the configured tiers, inside this process."""

    kind = "in-process"

    def _connect(self, model_name: str, world_size: int, rank: int) -> None:
        self.engine = CacheEngine(
            self.config, self.layout, model_name=model_name, world_size=world_size, rank=rank, metrics=CacheMetrics()
        )

    def _lookup(self, tokens: Any, cache_salt: str, segment: bool) -> int:
        return self.engine.lookup(tokens, cache_salt=cache_salt, segment=segment).hit_tokens

    def _retrieve(self, tokens: Any, out: Any, skip_tokens: int, cache_salt: str, segment: bool) -> Loaded:
        result = self.engine.retrieve(tokens, out, skip_tokens=skip_tokens, cache_salt=cache_salt, segment=segment)
        end = skip_tokens + result.loaded_tokens if result.loaded_tokens else 0
        return Loaded(end, result.loaded_tokens, result.tier_tokens)

    def _store(self, tokens: Any, kv: Any, skip_tokens: int, cache_salt: str, segment: bool) -> int:
        result = self.engine.store(tokens, kv, skip_tokens=skip_tokens, cache_salt=cache_salt, segment=segment)
        return result.stored_tokens

    def close(self) -> None:
        self.engine.close()


class ServerBackend(KVBackend):
    """A ``kvtier server`` (shared memory on the same host, TCP otherwise), shared with other processes."""

    kind = "server"

    def _connect(self, model_name: str, world_size: int, rank: int) -> None:
        from kvtier.client.client import KVTierClient  # the in-process path needs no ZMQ client

        config = self.config
        assert config.server_url is not None
        self.client = KVTierClient(
            config.server_url,
            model=model_name,
            layout=self.layout,
            world_size=world_size,
            rank=rank,
            chunk_size=config.chunk_size,
            timeout=config.server_timeout_sec,
            retries=0,  # a miss now beats a late hit: the model is waiting
            auth_token=config.auth_token(),
        )

    def _lookup(self, tokens: Any, cache_salt: str, segment: bool) -> int:
        return self.client.lookup(tokens, cache_salt=cache_salt, segment=segment).hit_tokens

    def _retrieve(self, tokens: Any, out: Any, skip_tokens: int, cache_salt: str, segment: bool) -> Loaded:
        limit = int(out.shape[2])
        if limit < len(tokens):  # the server sends every cached chunk asked for: ask only for those that fit
            tokens = tokens[: limit - limit % self.chunk_size]
        result = self.client.retrieve(
            tokens, out=as_numpy(out), skip_tokens=skip_tokens, cache_salt=cache_salt, segment=segment
        )
        end = skip_tokens + result.loaded_tokens if result.loaded_tokens else 0
        return Loaded(end, result.loaded_tokens, result.tiers)

    def _store(self, tokens: Any, kv: Any, skip_tokens: int, cache_salt: str, segment: bool) -> int:
        reply = self.client.store(tokens, as_numpy(kv), skip_tokens=skip_tokens, cache_salt=cache_salt, segment=segment)
        return reply.stored_tokens

    def close(self) -> None:
        self.client.close()


def open_backend(
    config: KVTierConfig,
    layout: KVLayout,
    *,
    model_name: str,
    world_size: int = 1,
    rank: int = 0,
    metrics: IntegrationMetrics | None = None,
) -> KVBackend:
    """A :class:`ServerBackend` when ``config.server_url`` is set, else an :class:`InProcessBackend`."""
    cls = ServerBackend if config.server_url else InProcessBackend
    backend = cls(config, layout, model_name=model_name, world_size=world_size, rank=rank, metrics=metrics)
    log.info("kvtier %s backend for %s (%s)", backend.kind, model_name, config.server_url or "memory/disk tiers here")
    return backend


def as_numpy(tensor: Any) -> np.ndarray:
    """A numpy view of a CPU tensor (bf16/fp8, which numpy lacks, as unsigned ints of the same width)."""
    if isinstance(tensor, np.ndarray):
        return tensor
    import torch

    if tensor.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
        tensor = tensor.view(torch.uint16 if tensor.element_size() == 2 else torch.uint8)
    return tensor.numpy()
