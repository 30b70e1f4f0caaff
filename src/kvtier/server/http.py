"""HTTP admin and metrics for the cache server (standard library only).

``GET /healthcheck`` (200 healthy / 503 not ready), ``GET /status`` (JSON), ``GET /metrics`` (Prometheus text),
``POST /clear`` (auth when configured), ``GET /openapi.json`` (this API described). Every handler answers with
a JSON error body on bad input; nothing a client sends can stop the server.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kvtier import __version__
from kvtier.server.service import CacheService

log = logging.getLogger("kvtier.server")

OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "kvtier server admin API", "version": __version__},
    "paths": {
        "/healthcheck": {
            "get": {
                "summary": "Liveness and readiness",
                "responses": {"200": {"description": "healthy"}, "503": {"description": "not ready"}},
            }
        },
        "/status": {
            "get": {
                "summary": "Configuration, tiers, capacity, clients, engines",
                "responses": {"200": {"description": "status", "content": {"application/json": {}}}},
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {"200": {"description": "Prometheus text format 0.0.4", "content": {"text/plain": {}}}},
            }
        },
        "/clear": {
            "post": {
                "summary": "Remove every chunk from every tier",
                "security": [{"bearer": []}],
                "responses": {"200": {"description": "cleared"}, "401": {"description": "auth"}},
            }
        },
        "/openapi.json": {"get": {"summary": "This description", "responses": {"200": {"description": "spec"}}}},
    },
    "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
}


class AdminServer:
    """The admin HTTP server on its own thread."""

    def __init__(self, service: CacheService, ready: threading.Event) -> None:
        self.service = service
        handler = type("Handler", (_Handler,), {"service": service, "ready": ready})
        config = service.config
        self.httpd = ThreadingHTTPServer((config.http_host, config.http_port), handler)
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="kvtier-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> None:
        self._thread.start()
        log.info("kvtier admin HTTP on http://%s:%d", self.service.config.http_host, self.port)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    service: CacheService
    ready: threading.Event
    server_version = f"kvtier/{__version__}"

    def do_GET(self) -> None:
        route = self.path.split("?", 1)[0]
        if route == "/healthcheck":
            ok = self.ready.is_set()
            self._json(
                HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE, {"status": "healthy" if ok else "starting"}
            )
        elif route == "/status":
            self._json(HTTPStatus.OK, {**self.service.status(), "config": self._public_config()})
        elif route == "/metrics":
            self._send(HTTPStatus.OK, self.service.metrics.render().encode(), "text/plain; version=0.0.4")
        elif route == "/openapi.json":
            self._json(HTTPStatus.OK, OPENAPI)
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: {route}"})

    def do_POST(self) -> None:
        route = self.path.split("?", 1)[0]
        if route != "/clear":
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: {route}"})
        elif not self._authorized():
            self._json(HTTPStatus.UNAUTHORIZED, {"error": "missing or wrong bearer token"})
        else:
            self._json(HTTPStatus.OK, {"cleared_chunks": self.service.storage.clear()})

    def _authorized(self) -> bool:
        secret = self.service.config.auth_token()
        if secret is None:
            return True
        given = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        return hmac.compare_digest(given.encode(), secret.encode())

    def _public_config(self) -> dict[str, Any]:
        config = self.service.config.to_dict()
        for secret in ("server_auth_token", "s3_secret_access_key", "s3_access_key_id"):
            if config.get(secret):
                config[secret] = "***"
        return config

    def _json(self, status: HTTPStatus, body: dict[str, Any]) -> None:
        self._send(status, json.dumps(body, default=str).encode(), "application/json")

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s - %s", self.address_string(), format % args)
