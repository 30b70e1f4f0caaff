"""The shared-memory ops of the data plane: same-host clients copy KV straight into and out of the server's pool,
under leases (``shared_memory.py`` says what a lease guarantees whatever a client's timing)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvtier.protocol import Message, Op, ProtocolError, get_field, writer_path
from kvtier.server.replies import reply_to, store_meta
from kvtier.server.shared_memory import ShmLeaseTable

if TYPE_CHECKING:
    from kvtier.server.service import CacheService, Handler


class SharedMemoryOps:
    def __init__(self, service: CacheService, path: str | None) -> None:
        self.service = service
        self.path = path  # the pool's file; None when the server has no shared memory
        self.leases = ShmLeaseTable(service.config.server_lease_sec)

    def handlers(self) -> dict[int, Handler]:
        return {
            Op.SHM_INFO: self.info,
            Op.STORE_RESERVE: self.store_reserve,
            Op.STORE_COMMIT: self.store_commit,
            Op.RETRIEVE_PIN: self.retrieve_pin,
            Op.SHM_RELEASE: self.release,
        }

    def info(self, request: Message) -> Message:
        if self.path is None:
            raise ProtocolError("this server has no shared-memory pool (server_shared_memory: false)")
        return reply_to(request, {"path": self.path, "size": self.service.storage.pool.capacity_bytes})

    def store_reserve(self, request: Message) -> Message:
        """Reserve memory for the new chunks; the client writes them at the returned offsets, then commits."""
        s = self.service
        engine, tokens = s.engine_for(request.meta), s.tokens(request)
        writer = writer_path(get_field(request.meta, "session", str))
        if writer is None:
            raise ProtocolError("session must name the client's liveness file (kvtier-client-<pid>-<32 hex>)")
        number, done_below = get_field(request.meta, "reservation", int), get_field(request.meta, "done_below", int)
        self.leases.settle(writer, done_below)  # orphans first: their memory may be what this one needs
        reservation = engine.reserve(
            tokens, skip_tokens=s.skip_tokens(request), cache_salt=s.salt(request.meta), segment=s.segment(request)
        )
        lease = self.leases.open(
            lambda: engine.abandon(reservation), lambda: engine.commit(reservation), writer=writer, number=number
        )
        chunks = [[c.start, c.end, o.offset] for c, o in zip(reservation.chunks, reservation.objs, strict=True)]
        meta = {"lease": lease, "chunks": chunks, "dropped_tokens": reservation.dropped_tokens, "path": self.path}
        return reply_to(request, meta)

    def store_commit(self, request: Message) -> Message:
        lease = self.leases.take(get_field(request.meta, "lease", int))
        if lease is None or lease.commit is None:
            raise ProtocolError("unknown or expired store lease: nothing was stored")
        return reply_to(request, store_meta(lease.commit()))

    def retrieve_pin(self, request: Message) -> Message:
        """Hand out the cached prefix's chunks in place; the client copies them, then releases the lease."""
        s = self.service
        engine, tokens = s.engine_for(request.meta), s.tokens(request)
        acquired = engine.acquire(
            tokens, skip_tokens=s.skip_tokens(request), cache_salt=s.salt(request.meta), segment=s.segment(request)
        )

        def release() -> None:
            for obj in acquired.objs:
                obj.unref()

        lease = self.leases.open(release)
        chunks = [[c.start, c.end, o.offset] for c, o in zip(acquired.chunks, acquired.objs, strict=True)]
        result = acquired.result
        meta = {
            "lease": lease,
            "chunks": chunks,
            "path": self.path,
            "hit_tokens": result.hit_tokens,
            "loaded_tokens": result.loaded_tokens,
            "tiers": result.tier_tokens,
        }
        return reply_to(request, meta)

    def release(self, request: Message) -> Message:
        lease = self.leases.take(get_field(request.meta, "lease", int))
        if lease is not None:
            lease.release()
        return reply_to(request, {"released": lease is not None})

    def lease_counts(self) -> dict[tuple[str, ...], float]:
        """``kvtier_server_shm_leases`` by state."""
        stalled = self.leases.stalled()
        return {("active",): len(self.leases) - stalled, ("stalled",): stalled}
