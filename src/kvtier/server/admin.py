"""What the admin API does (``http.py`` serves it): clears, deletes, lookups, pins, tenants and their quotas."""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from kvtier.diagnosis import RequestRecord
from kvtier.engine.results import Explanation, LookupResult
from kvtier.protocol import ProtocolError, Status, get_field
from kvtier.server.tokenize import tokenize
from kvtier.storage.base import StorageTier
from kvtier.tokens.keys import CacheKey

if TYPE_CHECKING:
    from kvtier.server.service import CacheService

MAX_ADMIN_PINS = 1024  # prompts pinned through the admin API at once (each holds memory until unpinned)
MAX_QUOTAS = 4096  # tenants with a memory quota
DEFAULT_TENANT = "_default"  # the tenant with no cache_salt, in listings and in /quota/<salt> paths


class AdminActions:
    def __init__(self, service: CacheService) -> None:
        self.service = service
        self.storage = service.storage
        self._pins: dict[int, list[tuple[StorageTier, list[CacheKey]]]] = {}
        self._lock = threading.Lock()
        self._tenant_key = secrets.token_bytes(32)  # for tenant_id: ids stable for this server's lifetime only

    def clear(self, cache_salt: str | None = None) -> int:
        """Remove every chunk, or every chunk of one tenant (memory and disk; remote stores are shared)."""
        if cache_salt is None:
            return self.storage.clear()
        return self.storage.delete_namespaces(self.storage.tenant_namespaces(cache_salt))

    def delete_tokens(self, body: dict[str, Any]) -> int:
        s = self.service
        return s.engine_for(body).delete(self._tokens(body), cache_salt=s.salt(body))

    def lookup_tokens(self, body: dict[str, Any]) -> LookupResult:
        """How much of a prompt's prefix is cached, and in which tiers (nothing is pinned)."""
        s = self.service
        return s.engine_for(body).lookup(self._tokens(body), cache_salt=s.salt(body))

    def explain_tokens(self, body: dict[str, Any]) -> Explanation:
        """Each chunk of a prompt (``tokens``, or ``text`` the server can tokenize): where it is cached or why not.
        Also says when the tokens are cached for another tenant: the admin API is the operator's."""
        s = self.service
        engine = s.engine_for(body)
        tokens = self._tokens({"tokens": tokenize(engine.namespace().model_name, body["text"])}) if "text" in body \
            else self._tokens(body)  # fmt: skip
        return engine.explain(tokens, cache_salt=s.salt(body), reveal_tenants=True)

    def recent_requests(self, limit: int) -> list[dict[str, Any]]:
        """The last ``limit`` requests, newest first, each with its tenant's id (never its salt)."""
        records = self.storage.recent.latest(limit)
        fields = [f.name for f in dataclasses.fields(RequestRecord) if f.name != "cache_salt"]
        return [{**{f: getattr(r, f) for f in fields}, "tenant": self.tenant_id(r.cache_salt)} for r in records]

    def prefetch_prompts(self, body: dict[str, Any], wait: bool) -> list[int] | None:
        """Load each prompt's cached prefix from slower tiers into memory, in the background; with ``wait``, the
        prefix lengths now in memory (or in a tier the next retrieve reads), once all are loaded."""
        s = self.service
        engine, salt = s.engine_for(body), s.salt(body)
        futures = [engine.prefetch(self._tokens({"tokens": p}), cache_salt=salt) for p in body["prompts"]]
        return [f.result() for f in futures] if wait else None

    def pin_tokens(self, body: dict[str, Any]) -> tuple[int, int]:
        """Pin the cached prefix of ``tokens`` until :meth:`unpin` (no expiry); return (pin id, tokens pinned)."""
        s = self.service
        engine, tokens = s.engine_for(body), self._tokens(body)
        if len(self._pins) >= MAX_ADMIN_PINS:
            raise ProtocolError(f"{MAX_ADMIN_PINS} pins are held already: unpin some first")
        chunks, keys = engine.chunk_keys(tokens, s.salt(body))
        sources = self.storage.locate(keys)
        pins = self.storage.pin(keys[: len(sources)], sources)
        pin_id = secrets.randbits(62)
        with self._lock:
            self._pins[pin_id] = pins
        return pin_id, chunks[len(sources) - 1].end if sources else 0

    def unpin(self, pin_id: int) -> bool:
        with self._lock:
            pins = self._pins.pop(pin_id, None)
        if pins is not None:
            self.storage.unpin(pins)
        return pins is not None

    def set_quota(self, cache_salt: str, limit_bytes: int | None) -> None:
        """Bytes tenant ``cache_salt`` may hold in memory (None: no limit); its own oldest chunks make room."""
        if self.storage.memory is None:
            raise ProtocolError("quotas apply to the memory tier, which is off (local_cpu: false)")
        quotas = self.storage.memory.quotas
        if limit_bytes is None:
            quotas.pop(cache_salt, None)
        elif cache_salt in quotas or len(quotas) < MAX_QUOTAS:
            quotas[cache_salt] = limit_bytes
        else:
            raise ProtocolError(f"{MAX_QUOTAS} tenants have quotas already: remove some first")

    def quotas(self) -> dict[str, dict[str, int | None]]:
        """Memory quota and use of every tenant holding memory or a quota, by :meth:`tenant_id` (never by salt)."""
        memory = self.storage.memory
        if memory is None:
            return {}
        used = memory.tenant_bytes()
        return {
            self.tenant_id(t): {"limit_bytes": memory.quotas.get(t), "used_bytes": used.get(t, 0)}
            for t in set(used) | set(memory.quotas)
        }

    def tenant_quota(self, cache_salt: str) -> dict[str, Any]:
        """One tenant's id, quota and use, for whoever holds its salt."""
        memory = self.storage.memory
        limit = memory.quotas.get(cache_salt) if memory is not None else None
        used = memory.tenant_bytes().get(cache_salt, 0) if memory is not None else 0
        return {"tenant": self.tenant_id(cache_salt), "limit_bytes": limit, "used_bytes": used}

    def tenant_id(self, cache_salt: str) -> str:
        """How listings name tenant ``cache_salt``: a digest keyed with this server's own random key, so a listing
        neither shows a salt nor lets anyone test guesses against it offline (``_default``: no salt)."""
        if not cache_salt:
            return DEFAULT_TENANT
        return hashlib.blake2b(cache_salt.encode(), key=self._tenant_key, digest_size=8).hexdigest()

    def _tokens(self, body: dict[str, Any]) -> np.ndarray:
        tokens = get_field(body, "tokens", list)
        limit = self.service.config.server_max_tokens
        if len(tokens) > limit:
            raise ProtocolError(f"more than {limit} tokens", Status.TOO_LARGE)
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**32 for t in tokens):
            raise ProtocolError("tokens must be integers in [0, 2**32)")
        return np.asarray(tokens, dtype="<u4")
