"""What the cache server does with a request, independent of sockets: validate it, run it, build the reply.

One :class:`CacheService` owns one set of tiers (one memory budget, one disk directory, one remote store) and
serves any number of models, layouts, ranks and tenants from it: each namespace gets a :class:`CacheEngine`
view over the shared :class:`TieredStorage`, created on first use. The ops come in three kinds, one module each:
prompt-level (``prompt_ops``), key-level (``key_ops``) and shared-memory (``shm_ops``); the admin API's actions
are ``admin``. This module holds what they share: the request's namespace and fields (each checked before it
is trusted), auth, dispatch, status. A failure is a reply with a status, never a crash.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

from kvtier import __version__
from kvtier.config import KVTierConfig
from kvtier.engine.cache_engine import CacheEngine
from kvtier.errors import ConfigError, KVTierError
from kvtier.memory.layout import KVLayout
from kvtier.metrics import CacheMetrics, ServerMetrics
from kvtier.protocol import Message, ProtocolError, Status, get_field, layout_from_meta, layout_to_meta
from kvtier.server.admin import AdminActions
from kvtier.server.key_ops import KeyOps
from kvtier.server.prompt_ops import PromptOps
from kvtier.server.replies import error_reply, op_name
from kvtier.server.shared_memory import shared_memory_path
from kvtier.server.shm_ops import SharedMemoryOps
from kvtier.storage.registry import build_storage
from kvtier.tokens.keys import MAX_SALT_LENGTH

log = logging.getLogger("kvtier.server")
MAX_MODEL_NAME = 256
MAX_ENGINES = 1024  # distinct (model, layout, world size, rank) served at once
SECRET_KEYS = ("server_auth_token", "s3_secret_access_key", "s3_access_key_id")

NamespaceKey = tuple[str, KVLayout, int, int]
Handler = Callable[[Message], Message]


class CacheService:
    """Runs requests against the shared tiers. Thread-safe."""

    def __init__(self, config: KVTierConfig) -> None:
        self.config = config
        self.metrics = CacheMetrics()
        self.server_metrics = ServerMetrics(self.metrics.registry)
        self.server_id = uuid.uuid4().hex
        shm_path = shared_memory_path(self.server_id) if config.server_shared_memory else None
        self.storage = build_storage(config, self.metrics, shared_memory=shm_path)
        self.started = time.time()
        self.max_reply_bytes = config.server_max_request_mb << 20  # the largest message, either way
        self.auth_token = config.auth_token()  # read once: both planes check this value, whatever the file does
        self._engines: dict[NamespaceKey, CacheEngine] = {}
        self._lock = threading.Lock()
        self.shm = SharedMemoryOps(self, shm_path)
        self.admin = AdminActions(self)
        self._handlers: dict[int, Handler] = {
            **PromptOps(self).handlers(),
            **KeyOps(self).handlers(),
            **self.shm.handlers(),
        }
        self.server_metrics.shm_leases.add_source(self.shm.lease_counts)

    # -- entry point --------------------------------------------------------------------------------
    def handle(self, request: Message, received_at: float) -> Message:
        """The reply to ``request``; never raises."""
        name = op_name(request.op)
        try:
            if request.timeout_ms and time.monotonic() > received_at + request.timeout_ms / 1000:
                raise ProtocolError("deadline passed before the request was served", Status.DEADLINE_EXCEEDED)
            self._check_auth(request)
            self.shm.leases.expire()
            handler = self._handlers.get(request.op)
            if handler is None:
                raise ProtocolError(f"unknown op {request.op}", Status.UNKNOWN_OP)
            reply = handler(request)
        except ProtocolError as exc:
            reply = error_reply(request, exc.status, str(exc))
        except KVTierError as exc:  # bad layout, bad mask...: the client's request was wrong
            reply = error_reply(request, Status.BAD_REQUEST, str(exc))
        except ValueError as exc:
            reply = error_reply(request, Status.BAD_REQUEST, str(exc))
        except Exception as exc:
            log.exception("internal error serving %s", name)
            reply = error_reply(request, Status.INTERNAL, f"internal error: {type(exc).__name__}")
        self.server_metrics.requests.inc(op=name, status=reply.status.name)
        self.server_metrics.request_seconds.observe(time.monotonic() - received_at, op=name)
        return reply

    def _check_auth(self, request: Message) -> None:
        if not self.authorized(request.meta.get("auth")):
            raise ProtocolError("missing or wrong auth token", Status.UNAUTHORIZED)

    def authorized(self, token: object) -> bool:
        """Whether ``token`` (from a request: anything) is the server's secret; always, when it has none."""
        if self.auth_token is None:
            return True
        return isinstance(token, str) and hmac.compare_digest(token.encode(), self.auth_token.encode())

    # -- namespaces ---------------------------------------------------------------------------------
    def engine_for(self, meta: dict[str, Any]) -> CacheEngine:
        model = get_field(meta, "model", str)
        if not 0 < len(model) <= MAX_MODEL_NAME:
            raise ProtocolError(f"model name must have 1 to {MAX_MODEL_NAME} characters")
        layout = layout_from_meta(get_field(meta, "layout", dict))
        world_size = get_field(meta, "world_size", int, 1)
        rank = get_field(meta, "rank", int, 0)
        if not 0 <= rank < world_size <= 1 << 16:
            raise ProtocolError(f"rank {rank} / world size {world_size} out of range")
        chunk_size = get_field(meta, "chunk_size", int, self.config.chunk_size)
        if chunk_size != self.config.chunk_size:
            raise ProtocolError(f"client chunk size {chunk_size} differs from the server's {self.config.chunk_size}")
        key = (model, layout, world_size, rank)
        with self._lock:
            engine = self._engines.get(key)
            if engine is None:
                if len(self._engines) >= MAX_ENGINES:
                    raise ProtocolError(f"server already serves {MAX_ENGINES} model/layout/rank combinations")
                try:
                    engine = CacheEngine(
                        self.config, layout, model_name=model, world_size=world_size, rank=rank, storage=self.storage
                    )
                except ConfigError as exc:  # e.g. a lossy codec this model has not passed the quality gate for
                    raise ProtocolError(f"model {model!r}: {exc}") from None
                self._engines[key] = engine
            return engine

    def salt(self, meta: dict[str, Any]) -> str:
        salt = get_field(meta, "cache_salt", str, "")
        if len(salt) > MAX_SALT_LENGTH:
            raise ProtocolError(f"cache_salt longer than {MAX_SALT_LENGTH} characters")
        return salt

    def tokens(self, request: Message) -> np.ndarray:
        if not request.payload:
            raise ProtocolError("missing token frame")
        frame = request.payload[0]
        if len(frame) % 4:
            raise ProtocolError("token frame length is not a multiple of 4 (u32 token ids)")
        if len(frame) // 4 > self.config.server_max_tokens:
            raise ProtocolError(f"more than {self.config.server_max_tokens} tokens", Status.TOO_LARGE)
        return np.frombuffer(frame, dtype="<u4")

    @staticmethod
    def segment(request: Message) -> bool:
        """Whether the request's tokens are one segment (cached by its own content) rather than a prompt."""
        return get_field(request.meta, "segment", bool, False)

    @staticmethod
    def skip_tokens(request: Message) -> int:
        """Leading tokens the client has already (the engine checks it against the prompt and chunk size)."""
        return get_field(request.meta, "skip_tokens", int, 0)

    def public_config(self) -> dict[str, Any]:
        """The configuration as anyone may see it (``/status`` needs no token): secrets and the passwords in
        store URLs masked."""
        config = self.config.to_dict()
        for key in SECRET_KEYS:
            if config.get(key):
                config[key] = "***"
        for key, value in config.items():
            if key.endswith("_url") and isinstance(value, str):
                config[key] = _without_password(value)
        return config

    # -- status -------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        tiers = {t.name: vars_of(t.usage()) for t in self.storage.tiers}
        with self._lock:
            engines = [_engine_entry(*key) for key in self._engines]
        return {
            "server_id": self.server_id,
            "version": __version__,
            "uptime_sec": time.time() - self.started,
            "chunk_size": self.config.chunk_size,
            "tiers": tiers,
            "engines": engines,
            "clients": sum(self.server_metrics.clients.values().values()),
            "shared_memory": {
                "path": self.shm.path,
                "leases": len(self.shm.leases),
                "stalled_writers": self.shm.leases.stalled(),
            },
            "quotas": self.admin.quotas(),
            "metrics": self.metrics.registry.snapshot(),
        }

    def close(self) -> None:
        with self._lock:
            engines = list(self._engines.values())
            self._engines.clear()
        self.shm.leases.release_all()
        for engine in engines:
            engine.close()
        self.storage.close()
        if self.shm.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.shm.path)


def _engine_entry(model: str, layout: KVLayout, world_size: int, rank: int) -> dict[str, Any]:
    """An engine in ``/status``; ``layout_meta`` is its layout as requests give it (the dashboard's lookup box
    sends it back to ``/explain``)."""
    return {"model": model, "layout": layout.descriptor(), "layout_meta": layout_to_meta(layout),
            "world_size": world_size, "rank": rank}  # fmt: skip


def _without_password(url: str) -> str:
    """``url`` with the password of its user info (``redis://:secret@host``) replaced by ``***``."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{parts.username or ''}:***@{host}").geturl()


def vars_of(usage: object) -> dict[str, Any]:
    return {name: getattr(usage, name) for name in usage.__slots__}  # type: ignore[attr-defined]
