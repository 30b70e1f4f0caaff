"""What the cache server does with a request, independent of sockets: validate it, run it, build the reply.

One :class:`CacheService` owns one set of tiers (one memory budget, one disk directory, one remote store) and
serves any number of models, layouts, ranks and tenants from it: each namespace gets a :class:`CacheEngine`
view over the shared :class:`TieredStorage`, created on first use. Every input is checked before it is
trusted (field types, sizes, counts, the chunk size), and a failure is a reply with a status, never a crash.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

from kvtier import __version__
from kvtier.codecs.chunk_format import CHUNK_HEADER_SIZE, decode_chunk, encode_chunk
from kvtier.config import KVTierConfig
from kvtier.engine.cache_engine import CacheEngine, skip_mask
from kvtier.errors import KVTierError
from kvtier.memory.layout import KVLayout
from kvtier.metrics import CacheMetrics, ServerMetrics
from kvtier.protocol import MAX_KEYS, Message, Op, ProtocolError, Status, get_field, layout_from_meta, writer_path
from kvtier.server.shared_memory import ShmLeaseTable, shared_memory_path
from kvtier.storage.registry import build_storage
from kvtier.tokens.keys import MAX_SALT_LENGTH, NAMESPACE_DIGEST_SIZE, CacheKey, Namespace, key_id_from_str

log = logging.getLogger("kvtier.server")
MAX_MODEL_NAME = 256
MAX_ENGINES = 1024  # distinct (model, layout, world size, rank) served at once
MAX_ADMIN_PINS = 1024  # prompts pinned through the admin API at once (each holds memory until unpinned)
MAX_QUOTAS = 4096  # tenants with a memory quota
SECRET_KEYS = ("server_auth_token", "s3_secret_access_key", "s3_access_key_id")
DEFAULT_TENANT = "_default"  # the tenant with no cache_salt, in listings and in /quota/<salt> paths

NamespaceKey = tuple[str, KVLayout, int, int]


class CacheService:
    """Runs requests against the shared tiers. Thread-safe."""

    def __init__(self, config: KVTierConfig) -> None:
        self.config = config
        self.metrics = CacheMetrics()
        self.server_metrics = ServerMetrics(self.metrics.registry)
        self.server_id = uuid.uuid4().hex
        self.shm_path = shared_memory_path(self.server_id) if config.server_shared_memory else None
        self.storage = build_storage(config, self.metrics, shared_memory=self.shm_path)
        self.shm_leases = ShmLeaseTable(config.server_lease_sec)
        self.server_metrics.shm_leases.add_source(self._lease_counts)
        self.started = time.time()
        self._max_reply_bytes = config.server_max_request_mb << 20  # the largest message, either way
        self._tenant_key = secrets.token_bytes(32)  # for tenant_id: ids stable for this server's lifetime only
        self.auth_token = config.auth_token()  # read once: both planes check this value, whatever the file does
        self._engines: dict[NamespaceKey, CacheEngine] = {}
        self._lock = threading.Lock()
        self._admin_pins: dict[int, list[tuple[Any, list[CacheKey]]]] = {}
        self._handlers: dict[int, Callable[[Message], Message]] = {
            Op.PING: self._ping,
            Op.LOOKUP: self._lookup,
            Op.STORE: self._store,
            Op.RETRIEVE: self._retrieve,
            Op.PREFETCH: self._prefetch,
            Op.DELETE: self._delete,
            Op.CLEAR: self._clear,
            Op.STATS: self._stats,
            Op.RELEASE: self._release,
            Op.EXISTS_KEYS: self._exists_keys,
            Op.GET_KEYS: self._get_keys,
            Op.PUT_KEYS: self._put_keys,
            Op.DELETE_KEYS: self._delete_keys,
            Op.SHM_INFO: self._shm_info,
            Op.STORE_RESERVE: self._store_reserve,
            Op.STORE_COMMIT: self._store_commit,
            Op.RETRIEVE_PIN: self._retrieve_pin,
            Op.SHM_RELEASE: self._shm_release,
        }

    # -- entry point --------------------------------------------------------------------------------
    def handle(self, request: Message, received_at: float) -> Message:
        """The reply to ``request``; never raises."""
        name = op_name(request.op)
        try:
            if request.timeout_ms and time.monotonic() > received_at + request.timeout_ms / 1000:
                raise ProtocolError("deadline passed before the request was served", Status.DEADLINE_EXCEEDED)
            self._check_auth(request)
            self.shm_leases.expire()
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

    def _lease_counts(self) -> dict[tuple[str, ...], float]:
        stalled = self.shm_leases.stalled()
        return {("active",): len(self.shm_leases) - stalled, ("stalled",): stalled}

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
                engine = CacheEngine(
                    self.config, layout, model_name=model, world_size=world_size, rank=rank, storage=self.storage
                )
                self._engines[key] = engine
            return engine

    def _salt(self, meta: dict[str, Any]) -> str:
        salt = get_field(meta, "cache_salt", str, "")
        if len(salt) > MAX_SALT_LENGTH:
            raise ProtocolError(f"cache_salt longer than {MAX_SALT_LENGTH} characters")
        return salt

    def _tokens(self, request: Message) -> np.ndarray:
        if not request.payload:
            raise ProtocolError("missing token frame")
        frame = request.payload[0]
        if len(frame) % 4:
            raise ProtocolError("token frame length is not a multiple of 4 (u32 token ids)")
        if len(frame) // 4 > self.config.server_max_tokens:
            raise ProtocolError(f"more than {self.config.server_max_tokens} tokens", Status.TOO_LARGE)
        return np.frombuffer(frame, dtype="<u4")

    # -- ops ----------------------------------------------------------------------------------------
    def _ping(self, request: Message) -> Message:
        return reply_to(
            request, {"server_id": self.server_id, "version": __version__, "chunk_size": self.config.chunk_size}
        )

    def _lookup(self, request: Message) -> Message:
        engine, tokens = self.engine_for(request.meta), self._tokens(request)
        pin = get_field(request.meta, "pin", bool, False)
        result = engine.lookup(tokens, cache_salt=self._salt(request.meta), pin=pin)
        lease = result.lease.id if result.lease else None
        return reply_to(request, {"hit_tokens": result.hit_tokens, "tiers": result.tier_tokens, "lease": lease})

    def _store(self, request: Message) -> Message:
        engine, tokens = self.engine_for(request.meta), self._tokens(request)
        if len(request.payload) != 2:
            raise ProtocolError("store takes a token frame and one KV frame")
        layout, frame = engine.layout, request.payload[1]
        if len(frame) != layout.chunk_bytes(len(tokens)):
            raise ProtocolError(f"KV frame has {len(frame)} bytes, {layout.chunk_bytes(len(tokens))} expected")
        kv = np.frombuffer(frame, dtype=layout.element.numpy_name).reshape(layout.chunk_shape(len(tokens)))
        result = engine.store(tokens, kv, mask=self._mask(request, len(tokens)), cache_salt=self._salt(request.meta))
        return reply_to(
            request,
            {
                "stored_tokens": result.stored_tokens,
                "skipped_tokens": result.skipped_tokens,
                "dropped_tokens": result.dropped_tokens,
            },
        )

    def _retrieve(self, request: Message) -> Message:
        engine, tokens = self.engine_for(request.meta), self._tokens(request)
        mask = self._mask(request, len(tokens))
        fits = self._max_reply_bytes // engine.layout.bytes_per_token  # a longer hit comes back as a shorter prefix
        if fits < len(tokens):
            tokens = tokens[: fits - fits % self.config.chunk_size]
            mask = None if mask is None else mask[: len(tokens)]
        result = engine.retrieve(tokens, mask=mask, cache_salt=self._salt(request.meta))
        meta = {"hit_tokens": result.hit_tokens, "loaded_tokens": result.loaded_tokens, "tiers": result.tier_tokens}
        return reply_to(request, meta, [memoryview(np.ascontiguousarray(result.kv).reshape(-1).view(np.uint8))])

    def _mask(self, request: Message, num_tokens: int) -> np.ndarray | None:
        skip = get_field(request.meta, "skip_tokens", int, 0)
        if not 0 <= skip <= num_tokens:
            raise ProtocolError(f"skip_tokens {skip} out of range")
        return skip_mask(num_tokens, skip)

    def _prefetch(self, request: Message) -> Message:
        engine, tokens = self.engine_for(request.meta), self._tokens(request)
        engine.prefetch(tokens, cache_salt=self._salt(request.meta))
        return reply_to(request, {"accepted": True})

    def _delete(self, request: Message) -> Message:
        engine, tokens = self.engine_for(request.meta), self._tokens(request)
        return reply_to(request, {"deleted_chunks": engine.delete(tokens, cache_salt=self._salt(request.meta))})

    def _clear(self, request: Message) -> Message:
        return reply_to(request, {"cleared_chunks": self.storage.clear()})

    def _stats(self, request: Message) -> Message:
        return reply_to(request, self.status())

    def _release(self, request: Message) -> Message:
        engine = self.engine_for(request.meta)
        return reply_to(request, {"released": engine.release(get_field(request.meta, "lease", int))})

    # -- key-level ops: another kvtier engine using this server as its remote tier ------------------
    def _keys(self, request: Message) -> list[CacheKey]:
        names = get_field(request.meta, "keys", list)
        if len(names) > MAX_KEYS:
            raise ProtocolError(f"more than {MAX_KEYS} keys in one request", Status.TOO_LARGE)
        if not all(isinstance(n, str) for n in names):
            raise ProtocolError("keys must be strings")
        try:
            return [CacheKey.from_id(key_id_from_str(n)) for n in names]
        except ValueError as exc:
            raise ProtocolError(f"bad key: {exc}") from None

    def _exists_keys(self, request: Message) -> Message:
        return reply_to(request, {"exists": [t is not None for t in self.storage.find(self._keys(request))]})

    def _get_keys(self, request: Message) -> Message:
        """Each key's chunk in the stored chunk format (an empty frame for a miss)."""
        keys = self._keys(request)
        frames: list[memoryview] = []
        budget = self._max_reply_bytes  # beyond it the remaining keys are answered as misses
        for key, tier in zip(keys, self.storage.find(keys), strict=True):
            obj = self.storage.read_one(key, tier) if tier is not None and budget > 0 else None
            if obj is None:
                frames.append(memoryview(b""))
                continue
            budget -= CHUNK_HEADER_SIZE + obj.nbytes
            try:  # a copy: the chunk's memory may be reused once we let go of it, before ZMQ has sent it
                header, payload = encode_chunk(key.id, obj)
                frames.append(memoryview(header + payload.tobytes()))
            finally:
                obj.unref()
        return reply_to(request, {"found": sum(1 for f in frames if len(f))}, frames)

    def _put_keys(self, request: Message) -> Message:
        keys = self._with_namespaces(self._keys(request), get_field(request.meta, "namespaces", dict))
        if len(request.payload) != len(keys):
            raise ProtocolError(f"{len(keys)} keys but {len(request.payload)} value frames")
        stored = 0
        for key, frame in zip(keys, request.payload, strict=True):
            obj = decode_chunk(frame, key.id, self.storage.allocate)  # a bad chunk: BAD_REQUEST, nothing stored
            if obj is None:
                break  # memory full of pinned chunks: the rest is not stored, as in a local store
            try:
                stored += self.storage.write([key], [obj])
            finally:
                obj.unref()
        return reply_to(request, {"stored": stored})

    @staticmethod
    def _with_namespaces(keys: list[CacheKey], described: dict[str, Any]) -> list[CacheKey]:
        """``keys`` with their namespaces, as the client describes them: quotas and clears by tenant need them. A
        description must hash to the key's own namespace digest, so no client can bill chunks to another tenant."""
        namespaces: dict[bytes, Namespace] = {}
        full = []
        for key in keys:
            digest = key.id[:NAMESPACE_DIGEST_SIZE]
            if digest not in namespaces:
                fields = described.get(digest.hex())
                try:
                    namespace = Namespace.from_fields(fields) if isinstance(fields, dict) else None
                except ValueError as exc:
                    raise ProtocolError(f"bad namespace for key {key.to_str()}: {exc}") from None
                if namespace is None or namespace.digest != digest:
                    raise ProtocolError(f"no namespace matching key {key.to_str()}: PUT_KEYS describes every key's")
                namespaces[digest] = namespace
            full.append(namespaces[digest].key(key.chunk_hash))
        return full

    def _delete_keys(self, request: Message) -> Message:
        return reply_to(request, {"deleted": sum(self.storage.delete(k) for k in self._keys(request))})

    # -- shared memory (same-host clients) ----------------------------------------------------------
    def _shm_info(self, request: Message) -> Message:
        if self.shm_path is None:
            raise ProtocolError("this server has no shared-memory pool (server_shared_memory: false)")
        return reply_to(request, {"path": self.shm_path, "size": self.storage.pool.capacity_bytes})

    def _store_reserve(self, request: Message) -> Message:
        """Reserve memory for the new chunks; the client writes them at the returned offsets, then commits."""
        engine, tokens = self.engine_for(request.meta), self._tokens(request)
        writer = writer_path(get_field(request.meta, "session", str))
        if writer is None:
            raise ProtocolError("session must name the client's liveness file (kvtier-client-<pid>-<32 hex>)")
        number, done_below = get_field(request.meta, "reservation", int), get_field(request.meta, "done_below", int)
        self.shm_leases.settle(writer, done_below)  # orphans first: their memory may be what this one needs
        reservation = engine.reserve(tokens, mask=self._mask(request, len(tokens)), cache_salt=self._salt(request.meta))
        lease = self.shm_leases.open(
            lambda: engine.abandon(reservation), lambda: engine.commit(reservation), writer=writer, number=number
        )
        chunks = [[c.start, c.end, o.offset] for c, o in zip(reservation.chunks, reservation.objs, strict=True)]
        meta = {"lease": lease, "chunks": chunks, "dropped_tokens": reservation.dropped_tokens, "path": self.shm_path}
        return reply_to(request, meta)

    def _store_commit(self, request: Message) -> Message:
        lease = self.shm_leases.take(get_field(request.meta, "lease", int))
        if lease is None or lease.commit is None:
            raise ProtocolError("unknown or expired store lease: nothing was stored")
        result = lease.commit()
        meta = {
            "stored_tokens": result.stored_tokens,
            "skipped_tokens": result.skipped_tokens,
            "dropped_tokens": result.dropped_tokens,
        }
        return reply_to(request, meta)

    def _retrieve_pin(self, request: Message) -> Message:
        """Hand out the cached prefix's chunks in place; the client copies them, then releases the lease."""
        engine, tokens = self.engine_for(request.meta), self._tokens(request)
        acquired = engine.acquire(tokens, mask=self._mask(request, len(tokens)), cache_salt=self._salt(request.meta))

        def release() -> None:
            for obj in acquired.objs:
                obj.unref()

        lease = self.shm_leases.open(release)
        chunks = [[c.start, c.end, o.offset] for c, o in zip(acquired.chunks, acquired.objs, strict=True)]
        result = acquired.result
        return reply_to(
            request,
            {
                "lease": lease,
                "chunks": chunks,
                "path": self.shm_path,
                "hit_tokens": result.hit_tokens,
                "loaded_tokens": result.loaded_tokens,
                "tiers": result.tier_tokens,
            },
        )

    def _shm_release(self, request: Message) -> Message:
        lease = self.shm_leases.take(get_field(request.meta, "lease", int))
        if lease is not None:
            lease.release()
        return reply_to(request, {"released": lease is not None})

    # -- admin actions (HTTP) -----------------------------------------------------------------------
    def clear(self, cache_salt: str | None = None) -> int:
        """Remove every chunk, or every chunk of one tenant (memory and disk; remote stores are shared)."""
        if cache_salt is None:
            return self.storage.clear()
        return self.storage.delete_namespaces(self.storage.tenant_namespaces(cache_salt))

    def delete_tokens(self, body: dict[str, Any]) -> int:
        engine, tokens = self.engine_for(body), self._body_tokens(body)
        return engine.delete(tokens, cache_salt=self._salt(body))

    def pin_tokens(self, body: dict[str, Any]) -> tuple[int, int]:
        """Pin the cached prefix of ``tokens`` until :meth:`unpin` (no expiry); return (pin id, tokens pinned)."""
        engine, tokens = self.engine_for(body), self._body_tokens(body)
        if len(self._admin_pins) >= MAX_ADMIN_PINS:
            raise ProtocolError(f"{MAX_ADMIN_PINS} pins are held already: unpin some first")
        chunks, keys = engine.chunk_keys(tokens, self._salt(body))
        sources = self.storage.locate(keys)
        pins = self.storage.pin(keys[: len(sources)], sources)
        pin_id = secrets.randbits(62)
        with self._lock:
            self._admin_pins[pin_id] = pins
        return pin_id, chunks[len(sources) - 1].end if sources else 0

    def unpin(self, pin_id: int) -> bool:
        with self._lock:
            pins = self._admin_pins.pop(pin_id, None)
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

    def _body_tokens(self, body: dict[str, Any]) -> np.ndarray:
        tokens = get_field(body, "tokens", list)
        if len(tokens) > self.config.server_max_tokens:
            raise ProtocolError(f"more than {self.config.server_max_tokens} tokens", Status.TOO_LARGE)
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**32 for t in tokens):
            raise ProtocolError("tokens must be integers in [0, 2**32)")
        return np.asarray(tokens, dtype="<u4")

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
            engines = [
                {"model": m, "layout": lay.descriptor(), "world_size": ws, "rank": r} for m, lay, ws, r in self._engines
            ]
        return {
            "server_id": self.server_id,
            "version": __version__,
            "uptime_sec": time.time() - self.started,
            "chunk_size": self.config.chunk_size,
            "tiers": tiers,
            "engines": engines,
            "clients": sum(self.server_metrics.clients.values().values()),
            "shared_memory": {
                "path": self.shm_path,
                "leases": len(self.shm_leases),
                "stalled_writers": self.shm_leases.stalled(),
            },
            "quotas": self.quotas(),
            "metrics": self.metrics.registry.snapshot(),
        }

    def close(self) -> None:
        with self._lock:
            engines = list(self._engines.values())
            self._engines.clear()
        self.shm_leases.release_all()
        for engine in engines:
            engine.close()
        self.storage.close()
        if self.shm_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.shm_path)


def _without_password(url: str) -> str:
    """``url`` with the password of its user info (``redis://:secret@host``) replaced by ``***``."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{parts.username or ''}:***@{host}").geturl()


def reply_to(request: Message, meta: dict[str, Any], payload: list[memoryview] | None = None) -> Message:
    return Message(request.op, request.request_id, meta, payload or [])


def error_reply(request: Message, status: Status, message: str) -> Message:
    return Message(request.op, request.request_id, {"error": message}, [], status)


def vars_of(usage: object) -> dict[str, Any]:
    return {name: getattr(usage, name) for name in usage.__slots__}  # type: ignore[attr-defined]


def op_name(op: int) -> str:
    try:
        return Op(op).name
    except ValueError:
        return "UNKNOWN"
