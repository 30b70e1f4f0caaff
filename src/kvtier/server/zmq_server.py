"""The data plane: a ZMQ ROUTER socket, a bounded pool of worker threads, replies routed back by identity.

The socket is only touched by the loop thread (ZMQ sockets are not thread-safe): it receives a request,
decodes it, hands it to a worker and, when a worker finishes, sends its reply. Workers signal the loop over an
inproc socket. The transport drops messages above ``server_max_request_mb``; beyond ``server_max_inflight``
requests or ``server_max_inflight_mb`` of request payloads in progress a client gets ``BUSY`` at once instead
of queueing without bound. A malformed message
gets an error reply (when it can be addressed) and is otherwise dropped; nothing a client sends stops the loop.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import zmq

from kvtier.protocol import Message, ProtocolError, Status, decode, encode
from kvtier.server.replies import error_reply, op_name
from kvtier.server.service import CacheService

log = logging.getLogger("kvtier.server")
CLIENT_WINDOW_SEC = 60.0
WAKE_ADDRESS = "inproc://kvtier-replies"


class DataPlane:
    def __init__(self, service: CacheService, context: zmq.Context | None = None) -> None:
        config = service.config
        self.service = service
        self.context = context or zmq.Context.instance()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, config.server_max_request_mb << 20)
        # ZMQ counts queued messages, not bytes: keep its queue short so waiting requests stay bounded too.
        self.socket.setsockopt(zmq.RCVHWM, config.server_max_inflight)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 0)  # a reply to a vanished client is dropped, not an error
        self.endpoint = f"tcp://{config.host}:{config.port}"
        self.socket.bind(self.endpoint)
        self._wake_recv = self.context.socket(zmq.PULL)
        self._wake_recv.bind(WAKE_ADDRESS + f"-{id(self)}")
        self._wake_send = self.context.socket(zmq.PUSH)
        self._wake_send.connect(WAKE_ADDRESS + f"-{id(self)}")
        self._wake_lock = threading.Lock()
        self._replies: queue.SimpleQueue[tuple[bytes, Message, int]] = queue.SimpleQueue()
        self._workers = ThreadPoolExecutor(config.server_workers, thread_name_prefix="kvtier-worker")
        self._inflight = 0
        self._inflight_bytes = 0  # request payloads held by requests in progress
        self._max_inflight = config.server_max_inflight
        self._max_inflight_bytes = config.server_max_inflight_mb << 20
        self._clients: dict[bytes, float] = {}
        self._stopping = threading.Event()
        m = service.server_metrics
        m.clients.add_source(lambda: {(): self.connected_clients()})
        m.inflight.add_source(lambda: {(): self._inflight})

    def connected_clients(self) -> int:
        horizon = time.monotonic() - CLIENT_WINDOW_SEC
        return sum(1 for seen in list(self._clients.values()) if seen >= horizon)

    def serve_forever(self) -> None:
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(self._wake_recv, zmq.POLLIN)
        log.info("kvtier data plane listening on %s", self.endpoint)
        while not self._stopping.is_set():
            try:
                self._step(poller)
            except Exception:  # a bug, not a client's doing: the loop must outlive it (and says so once per step)
                log.exception("data plane: unexpected error; serving on")
        self._drain()

    def _step(self, poller: zmq.Poller) -> None:
        events = dict(poller.poll(200))
        self.service.shm.leases.expire()  # leases of clients that went away, even when nobody calls
        if self._wake_recv in events:
            self._send_replies()
        if self.socket in events:
            self._receive_burst()

    def stop(self) -> None:
        self._stopping.set()

    def _receive_burst(self) -> None:
        for _ in range(64):  # bounded, so replies are not starved by a flood of requests
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._accept(frames)

    def _accept(self, frames: list[Any]) -> None:
        received = time.monotonic()
        identity = bytes(frames[0].buffer)
        self._clients[identity] = received
        if len(self._clients) > 10_000:  # forget long-gone clients so the table stays bounded
            horizon = received - CLIENT_WINDOW_SEC
            self._clients = {k: v for k, v in self._clients.items() if v >= horizon}
        self.service.server_metrics.received_bytes.inc(sum(len(f.buffer) for f in frames[1:]))
        requests = self.service.server_metrics.requests
        try:
            request = decode(frames[1:])
        except ProtocolError as exc:
            requests.inc(op="UNDECODABLE", status=exc.status.name)
            self._send(identity, _undecodable_reply(exc))
            return
        if not self.service.authorized(request.meta.get("auth")):  # before its payload takes a slot or a worker
            requests.inc(op=op_name(request.op), status=Status.UNAUTHORIZED.name)
            self._send(identity, error_reply(request, Status.UNAUTHORIZED, "missing or wrong auth token"))
            return
        size = sum(len(f) for f in request.payload)
        over_bytes = self._inflight and self._inflight_bytes + size > self._max_inflight_bytes
        if self._inflight >= self._max_inflight or over_bytes:
            requests.inc(op=op_name(request.op), status=Status.BUSY.name)
            self._send(identity, error_reply(request, Status.BUSY, "server busy, retry later"))
            return
        self._inflight += 1
        self._inflight_bytes += size
        self._workers.submit(self._work, identity, request, received, size)

    def _work(self, identity: bytes, request: Message, received: float, size: int) -> None:
        try:
            reply = self.service.handle(request, received)
        except Exception as exc:  # handle() never raises; if it ever does, the request is still answered
            log.exception("internal error serving a request")
            reply = error_reply(request, Status.INTERNAL, f"internal error: {type(exc).__name__}")
        self._replies.put((identity, reply, size))  # always: it is what releases the request's in-flight slot
        with self._wake_lock:  # one PUSH socket shared by the workers: serialise its use
            self._wake_send.send(b"", zmq.NOBLOCK)

    def _send_replies(self) -> None:
        while True:
            try:
                self._wake_recv.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
        while True:
            try:
                identity, reply, size = self._replies.get_nowait()
            except queue.Empty:
                return
            self._inflight -= 1
            self._inflight_bytes -= size
            self._send(identity, reply)

    def _send(self, identity: bytes, reply: Message) -> None:
        try:
            frames = encode(reply)
        except ProtocolError as exc:
            frames = encode(error_reply(reply, exc.status, str(exc)))
        self.service.server_metrics.sent_bytes.inc(sum(len(f) for f in frames))
        try:
            self.socket.send_multipart([identity, *frames], copy=False)
        except zmq.ZMQError as exc:
            log.debug("reply to a client that is gone: %s", exc)

    def _drain(self, timeout: float = 10.0) -> None:
        """Let requests in progress finish (their replies are sent), then close the sockets."""
        deadline = time.monotonic() + timeout
        while self._inflight and time.monotonic() < deadline:
            if self._wake_recv.poll(100):
                self._send_replies()
        self._workers.shutdown(wait=True)
        for sock in (self.socket, self._wake_recv, self._wake_send):
            sock.close(linger=0)


def _undecodable_reply(exc: ProtocolError) -> Message:
    """A reply to a message we could not parse, with the reason: to its op and request id when its header was
    intact (the client's waiting call gets it), else op 0 and request id 0."""
    return Message(exc.op, exc.request_id, {"error": str(exc)}, [], exc.status)
