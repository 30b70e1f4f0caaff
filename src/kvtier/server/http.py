"""HTTP admin and metrics for the cache server (standard library only).

Reading: ``GET /healthcheck`` (200 healthy / 503 not ready), ``/status`` (JSON), ``/metrics`` (Prometheus text),
``/quota``, ``/openapi.json`` (this API described). Changing, with the bearer token when the server has one:
``POST /clear`` (all, or one tenant), ``/delete`` and ``/pin`` (a prompt's chunks), ``/unpin``,
``PUT|DELETE /quota/<cache_salt>``. Bad input gets a 400 with the reason; nothing a client sends stops the server.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.parse
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kvtier import __version__
from kvtier.errors import KVTierError
from kvtier.protocol import ProtocolError, get_field
from kvtier.server.service import DEFAULT_TENANT, CacheService

log = logging.getLogger("kvtier.server")
MAX_BODY_BYTES = 64 << 20  # a /delete or /pin body lists at most server_max_tokens ids


def _salt_of(route: str) -> str:
    salt = urllib.parse.unquote(route.removeprefix("/quota/"))
    return "" if salt == DEFAULT_TENANT else salt


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
        "/delete": {
            "post": {
                "summary": "Delete a prompt's chunks: {model, layout, tokens, cache_salt?}",
                "security": [{"bearer": []}],
                "responses": {"200": {"description": "deleted"}},
            }
        },
        "/pin": {
            "post": {
                "summary": "Pin a prompt's cached prefix until /unpin: {model, layout, tokens}",
                "security": [{"bearer": []}],
                "responses": {"200": {"description": "pin_id"}},
            }
        },
        "/unpin": {
            "post": {
                "summary": "Release a pin: {pin_id}",
                "security": [{"bearer": []}],
                "responses": {"200": {"description": "unpinned"}},
            }
        },
        "/quota": {
            "get": {"summary": "Memory quotas and use per tenant", "responses": {"200": {"description": "quotas"}}}
        },
        "/quota/{cache_salt}": {
            "put": {
                "summary": "Set a tenant's memory quota: {limit_gb} (_default = no salt)",
                "security": [{"bearer": []}],
                "responses": {"200": {"description": "quotas"}},
            },
            "delete": {
                "summary": "Remove a tenant's quota",
                "security": [{"bearer": []}],
                "responses": {"200": {"description": "quotas"}},
            },
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
        elif route == "/quota":
            self._json(HTTPStatus.OK, {"quotas": self.service.quotas()})
        elif route.startswith("/quota/"):
            self._json(HTTPStatus.OK, self.service.tenant_quota(_salt_of(route)))
        elif route == "/openapi.json":
            self._json(HTTPStatus.OK, OPENAPI)
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: {route}"})

    def do_POST(self) -> None:
        self._mutate({"/clear": self._clear, "/delete": self._delete, "/pin": self._pin, "/unpin": self._unpin})

    def do_PUT(self) -> None:
        self._mutate({"/quota/": self._put_quota})

    def do_DELETE(self) -> None:
        self._mutate({"/quota/": self._delete_quota})

    def _mutate(self, routes: dict[str, Callable[[str, dict[str, Any]], dict[str, Any]]]) -> None:
        """Auth, then the route's action with the JSON body; bad input is a 400 with the reason."""
        route = self.path.split("?", 1)[0]
        action = next(
            (
                fn
                for prefix, fn in routes.items()
                if route == prefix or (prefix.endswith("/") and route.startswith(prefix))
            ),
            None,
        )
        if action is None:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: {self.command} {route}"})
            return
        if not self._authorized():
            self._json(HTTPStatus.UNAUTHORIZED, {"error": "missing or wrong bearer token"})
            return
        try:
            self._json(HTTPStatus.OK, action(route, self._body()))
        except (ProtocolError, KVTierError, ValueError) as exc:
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise ProtocolError(f"body larger than {MAX_BODY_BYTES} bytes")
        raw = self.rfile.read(length) if length else b"{}"
        try:
            body = json.loads(raw or b"{}")
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ProtocolError(f"body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ProtocolError("body must be a JSON object")
        return body

    def _clear(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        salt = get_field(body, "cache_salt", str, None) if "cache_salt" in body else None
        return {"cleared_chunks": self.service.clear(salt)}

    def _delete(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        return {"deleted_chunks": self.service.delete_tokens(body)}

    def _pin(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        pin_id, tokens = self.service.pin_tokens(body)
        return {"pin_id": pin_id, "pinned_tokens": tokens}

    def _unpin(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        return {"unpinned": self.service.unpin(get_field(body, "pin_id", int))}

    def _put_quota(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        limit = get_field(body, "limit_gb", (int, float))
        if isinstance(limit, bool) or not 0 <= limit < 1 << 20:
            raise ProtocolError("limit_gb must be a number >= 0")
        self.service.set_quota(_salt_of(route), int(limit * 2**30))
        return {"quotas": self.service.quotas()}

    def _delete_quota(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        self.service.set_quota(_salt_of(route), None)
        return {"quotas": self.service.quotas()}

    def _authorized(self) -> bool:
        return self.service.authorized(self.headers.get("Authorization", "").removeprefix("Bearer ").strip())

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
