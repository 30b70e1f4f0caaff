"""``kvtier server``: the cache service, its data plane and its admin HTTP, with a clean shutdown.

Embedded default: memory plus a local disk tier under the user cache directory (``~/.cache/kvtier/disk``),
nothing else to start. SIGINT/SIGTERM stop accepting work, let requests in progress finish, flush queued disk
writes (the disk index is the directory itself, so it is consistent whatever happens) and exit.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from kvtier.config import KVTierConfig, default_disk_path
from kvtier.server.http import AdminServer
from kvtier.server.service import CacheService
from kvtier.server.zmq_server import DataPlane

log = logging.getLogger("kvtier.server")
SERVER_DEFAULTS: dict[str, Any] = {
    "local_disk": default_disk_path(),
    "max_local_disk_size": 10.0,
    "local_cpu_prefault": True,  # a long-running service: take the page faults once, at start
}


class Server:
    """Service + data plane + admin HTTP, startable and stoppable (in-process for tests, or as the CLI)."""

    def __init__(self, config: KVTierConfig) -> None:
        self.ready = threading.Event()
        self.service = CacheService(config)
        self.data_plane = DataPlane(self.service)
        self.admin = AdminServer(self.service, self.ready) if config.http_port else None

    def serve_forever(self) -> None:
        if self.admin is not None:
            self.admin.start()
        self.ready.set()
        try:
            self.data_plane.serve_forever()
        finally:
            self.ready.clear()
            if self.admin is not None:
                self.admin.stop()
            self.service.storage.flush(30.0)
            self.service.close()
            log.info("kvtier server stopped")

    def stop(self) -> None:
        self.data_plane.stop()


def run_server(config: KVTierConfig) -> int:
    logging.getLogger("kvtier").setLevel(config.log_level.upper())
    server = Server(config)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: server.stop())
    tiers = ", ".join(t.name for t in server.service.storage.tiers)
    log.info(
        "kvtier server: tiers %s; data plane tcp://%s:%d; admin http://%s:%d",
        tiers,
        config.host,
        config.port,
        config.http_host,
        config.http_port,
    )
    server.serve_forever()
    return 0
