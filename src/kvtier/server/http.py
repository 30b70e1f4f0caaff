"""HTTP admin and metrics for the cache server: FastAPI (typed handlers, request validation, the OpenAPI document
generated from them) served by uvicorn on its own thread.

Reading: ``GET /`` (the dashboard: one self-contained HTML page, ``dashboard``), ``/dashboard/data`` (what it polls:
status, counters and gauges by label, recent requests; JSON), ``/healthcheck`` (200 healthy / 503 not ready),
``/status`` (JSON), ``/metrics`` (Prometheus text), ``/requests`` (the last requests with their hits and misses),
``/quota`` (tenants by id), ``/quota/<cache_salt>`` (one tenant, for whoever holds its salt), ``/openapi.json``.
Changing, with the bearer token when the server has one: ``POST /clear`` (all, or one tenant), ``/delete`` and
``/pin`` (a prompt's chunks), ``/unpin``, ``PUT|DELETE /quota/<cache_salt>``.

Whatever a client sends, it gets a prompt answer with a reason and the server goes on: a body is read whole
before any handler runs (at most ``MAX_BODY_BYTES``: 413; within ``BODY_TIMEOUT_SEC``: 408; a client that goes
away before it is complete runs nothing), parsed by the protocol's strict JSON parser (deep nesting, huge
integers, NaN, duplicate keys: 400), then validated against the handler's model (wrong or unknown fields: 400).
uvicorn refuses malformed HTTP (a negative Content-Length, oversized headers) itself.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Callable
from typing import Annotated, Any, Literal

import uvicorn
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.convertors import Convertor, register_url_convertor
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvtier import __version__
from kvtier.errors import KVTierError
from kvtier.memory.layout import DTYPES_BY_NAME
from kvtier.protocol import MAX_LAYOUT_DIM, ProtocolError, parse_json_object
from kvtier.server import dashboard
from kvtier.server.admin import DEFAULT_TENANT
from kvtier.server.service import MAX_MODEL_NAME, CacheService
from kvtier.tokens.keys import MAX_SALT_LENGTH

log = logging.getLogger("kvtier.server")
MAX_BODY_BYTES = 64 << 20  # a /delete or /pin body lists at most server_max_tokens ids
BODY_TIMEOUT_SEC = 10.0  # a body must arrive within this long once its headers have
MAX_CONNECTIONS = 128  # beyond this many open connections uvicorn answers 503
MAX_PREFETCH = 1024  # prompts in one /prefetch
MAX_RECENT = 200  # requests the server remembers for /requests
DTYPE_NAMES = tuple(DTYPES_BY_NAME)


# -- request and reply models (the OpenAPI document is generated from these) --------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ClearBody(_Strict):
    cache_salt: str | None = Field(None, max_length=MAX_SALT_LENGTH, description="only this tenant's chunks")


class LayoutBody(_Strict):
    num_layers: int = Field(ge=1, le=MAX_LAYOUT_DIM)
    num_kv_heads: int = Field(ge=1, le=MAX_LAYOUT_DIM)
    head_dim: int = Field(ge=1, le=MAX_LAYOUT_DIM)
    dtype: Literal[DTYPE_NAMES] = "float16"  # type: ignore[valid-type]
    kv_size: int = Field(2, ge=1, le=2)


class NamespaceBody(_Strict):
    """Which engine: the model, its KV layout, the parallel rank, the chunk size the client uses, the tenant."""

    model: str = Field(min_length=1, max_length=MAX_MODEL_NAME)
    layout: LayoutBody
    world_size: int = Field(1, ge=1, le=1 << 16)
    rank: int = Field(0, ge=0, lt=1 << 16)
    chunk_size: int | None = Field(None, ge=1, le=1 << 20)
    cache_salt: str = Field("", max_length=MAX_SALT_LENGTH)


TokenIds = list[Annotated[int, Field(ge=0, lt=1 << 32)]]


class PromptBody(NamespaceBody):
    tokens: TokenIds = Field(max_length=1 << 24)


class ExplainBody(NamespaceBody):
    tokens: TokenIds | None = Field(None, max_length=1 << 24)
    text: str | None = Field(None, max_length=MAX_BODY_BYTES, description="tokenized by the server (model dirs)")

    @model_validator(mode="after")
    def _one_prompt(self) -> ExplainBody:
        if (self.tokens is None) == (self.text is None):
            raise ValueError("give tokens or text, not both")
        return self


class PrefetchBody(NamespaceBody):
    prompts: list[TokenIds] = Field(min_length=1, max_length=MAX_PREFETCH)
    wait: bool = Field(False, description="answer once every prompt is loaded, with the prefix lengths")


class UnpinBody(_Strict):
    pin_id: int = Field(ge=0, lt=1 << 63)


class QuotaBody(_Strict):
    limit_gb: float = Field(ge=0, lt=1 << 20, description="GiB of memory the tenant may hold")


class Cleared(BaseModel):
    cleared_chunks: int


class Deleted(BaseModel):
    deleted_chunks: int


class LookedUp(BaseModel):
    hit_tokens: int = Field(description="length of the longest cached prefix")
    total_tokens: int
    tier_tokens: dict[str, int] = Field(description="how many of the hit tokens each tier holds")
    chunk_size: int


class ChunkStatus(BaseModel):
    start: int
    end: int
    tier: str | None = Field(description="hit: the tier serving it; miss: the tier the reason concerns, if any")
    reason: str | None = Field(description="why it is not served (None: it is); see docs/operations.md")
    detail: str


class Explained(BaseModel):
    hit_tokens: int
    total_tokens: int
    chunk_size: int
    miss_tokens: dict[str, int] = Field(description="tokens not served, by reason")
    chunks: list[ChunkStatus]


class RecentRequest(BaseModel):
    at: float = Field(description="Unix time")
    op: str
    model: str
    tenant: str
    total_tokens: int
    hit_tokens: int
    stored_tokens: int
    tier_tokens: dict[str, int]
    miss_tokens: dict[str, int]
    seconds: float


class RecentRequests(BaseModel):
    requests: list[RecentRequest] = Field(description="newest first")


class LabeledValue(BaseModel):
    labels: dict[str, str]
    value: float


class DashboardData(BaseModel):
    status: dict[str, Any] = Field(description="as GET /status, without the configuration")
    metrics: dict[str, list[LabeledValue]] = Field(description="every counter and gauge, by label set")
    requests: list[RecentRequest] = Field(description="the last requests, newest first")


class Prefetched(BaseModel):
    prompts: int
    loaded_tokens: list[int] | None = Field(description="with wait: each prompt's prefix now in memory")


class Pinned(BaseModel):
    pin_id: int
    pinned_tokens: int


class Unpinned(BaseModel):
    unpinned: bool


class TenantUse(BaseModel):
    limit_bytes: int | None
    used_bytes: int


class Quotas(BaseModel):
    quotas: dict[str, TenantUse] = Field(description="by tenant id (never by salt); _default: no salt")


class TenantQuota(TenantUse):
    tenant: str


class Health(BaseModel):
    status: str


class ErrorReply(BaseModel):
    error: str = Field(description="why the request was refused")


# -- the app ------------------------------------------------------------------------------------------------
def create_app(service: CacheService, ready: threading.Event) -> ASGIApp:
    """The admin API over ``service``; ``ready`` tells the health check whether the server serves yet."""
    app = FastAPI(
        title="kvtier server admin API",
        version=__version__,
        docs_url=None,  # the interactive pages load their scripts from the internet
        redoc_url=None,
    )
    app.state.service = service
    admin = [Depends(_authorized)]

    @app.get("/", response_class=HTMLResponse, summary="The dashboard (self-contained HTML; polls /dashboard/data)")
    def dashboard_page() -> HTMLResponse:
        return HTMLResponse(dashboard.page(), headers=dashboard.headers())

    @app.get("/dashboard/data", response_model=DashboardData, summary="Everything the dashboard shows, in one poll")
    def dashboard_data(limit: Annotated[int, Query(ge=1, le=MAX_RECENT)] = 50) -> Any:
        return {
            "status": service.status(),
            "metrics": service.metrics.registry.labeled(),
            "requests": service.admin.recent_requests(limit),
        }

    @app.get("/healthcheck", response_model=Health, responses={503: {"model": Health}})
    def healthcheck() -> Any:
        if ready.is_set():
            return {"status": "healthy"}
        return JSONResponse({"status": "starting"}, status_code=503)

    @app.get("/status", summary="Configuration, tiers, capacity, clients, engines")
    def status() -> dict[str, Any]:
        return {**service.status(), "config": service.public_config()}

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus text format 0.0.4")
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/quota", response_model=Quotas, summary="Memory quota and use of every tenant, by tenant id")
    def quotas() -> Any:
        return {"quotas": service.admin.quotas()}

    @app.get(
        "/quota/{cache_salt:salt}", response_model=TenantQuota, summary="One tenant's quota and use (_default: no salt)"
    )
    def tenant_quota(cache_salt: str) -> Any:
        return service.admin.tenant_quota(_salt(cache_salt))

    @app.put(
        "/quota/{cache_salt:salt}", response_model=Quotas, dependencies=admin, summary="Set a tenant's memory quota"
    )
    def put_quota(cache_salt: str, body: QuotaBody) -> Any:
        service.admin.set_quota(_salt(cache_salt), int(body.limit_gb * 2**30))
        return {"quotas": service.admin.quotas()}

    @app.delete(
        "/quota/{cache_salt:salt}", response_model=Quotas, dependencies=admin, summary="Remove a tenant's quota"
    )
    def delete_quota(cache_salt: str) -> Any:
        service.admin.set_quota(_salt(cache_salt), None)
        return {"quotas": service.admin.quotas()}

    @app.post("/clear", response_model=Cleared, dependencies=admin, summary="Remove every chunk, or one tenant's")
    def clear(body: ClearBody | None = None) -> Any:
        return {"cleared_chunks": service.admin.clear(body.cache_salt if body else None)}

    @app.post("/delete", response_model=Deleted, dependencies=admin, summary="Delete a prompt's chunks")
    def delete(body: PromptBody) -> Any:
        return {"deleted_chunks": service.admin.delete_tokens(body.model_dump(exclude_none=True))}

    @app.post(
        "/lookup",
        response_model=LookedUp,
        dependencies=admin,  # which prompts are cached is the tenants' business: the token guards it
        summary="How much of a prompt is cached and where (for KV-aware routers)",
    )
    def lookup(body: PromptBody) -> Any:
        found = service.admin.lookup_tokens(body.model_dump(exclude_none=True))
        return {"hit_tokens": found.hit_tokens, "total_tokens": found.total_tokens,
                "tier_tokens": found.tier_tokens, "chunk_size": service.config.chunk_size}  # fmt: skip

    @app.post(
        "/explain",
        response_model=Explained,
        dependencies=admin,  # it also tells whether another tenant cached the same tokens: for the operator only
        summary="Each chunk of a prompt: the tier serving it, or why none does",
    )
    def explain(body: ExplainBody) -> Any:
        found = service.admin.explain_tokens(body.model_dump(exclude_none=True))
        chunks = [{"start": c.start, "end": c.end, "tier": c.tier, "reason": c.reason, "detail": c.detail}
                  for c in found.chunks]  # fmt: skip
        return {"hit_tokens": found.hit_tokens, "total_tokens": found.total_tokens, "chunks": chunks,
                "chunk_size": service.config.chunk_size, "miss_tokens": found.miss_tokens}  # fmt: skip

    @app.get("/requests", response_model=RecentRequests, summary="The last requests with their hits and misses")
    def requests(limit: Annotated[int, Query(ge=1, le=MAX_RECENT)] = 50) -> Any:
        return {"requests": service.admin.recent_requests(limit)}

    @app.post(
        "/prefetch",
        response_model=Prefetched,
        dependencies=admin,
        summary="Load prompts' cached KV from slower tiers into memory (warm-up before traffic)",
    )
    def prefetch(body: PrefetchBody) -> Any:
        meta = body.model_dump(exclude_none=True, exclude={"wait"})
        return {"prompts": len(body.prompts), "loaded_tokens": service.admin.prefetch_prompts(meta, body.wait)}

    @app.post("/pin", response_model=Pinned, dependencies=admin, summary="Pin a prompt's cached prefix until /unpin")
    def pin(body: PromptBody) -> Any:
        pin_id, tokens = service.admin.pin_tokens(body.model_dump(exclude_none=True))
        return {"pin_id": pin_id, "pinned_tokens": tokens}

    @app.post("/unpin", response_model=Unpinned, dependencies=admin, summary="Release a pin")
    def unpin(body: UnpinBody) -> Any:
        return {"unpinned": service.admin.unpin(body.pin_id)}

    _add_error_handlers(app)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return BoundedBody(app, service.authorized)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's generated document, with the errors this API really answers: 400 (not FastAPI's 422) with
    ``{"error"}`` for bad input, 401 for a missing token, 408/413 for a body too slow or too large."""
    if app.openapi_schema is None:
        spec = get_openapi(title=app.title, version=app.version, routes=app.routes)
        error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorReply"}}}}
        for operation in (op for path in spec["paths"].values() for op in path.values()):
            responses = operation["responses"]
            if responses.pop("422", None) is not None:
                responses["400"] = {"description": "bad input: the reason", **error}
            if "requestBody" in operation:
                responses["408"] = {"description": "the body did not arrive in time", **error}
                responses["413"] = {"description": "the body is too large", **error}
            if "security" in operation:
                responses["401"] = {"description": "missing or wrong bearer token", **error}
        schemas = spec["components"]["schemas"]
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        schemas["ErrorReply"] = ErrorReply.model_json_schema()
        app.openapi_schema = spec
    return app.openapi_schema


class _SaltConvertor(Convertor[str]):
    """A tenant salt in a path (URL-encoded): any characters, slashes and newlines included (Starlette's own
    ``path`` convertor stops at a newline, and so could not address every salt)."""

    regex = r"[\s\S]*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("salt", _SaltConvertor())
BEARER = HTTPBearer(auto_error=False)


def _authorized(request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> None:
    """The mutating endpoints' dependency: the server's bearer token, when it has one (401 otherwise)."""
    if not request.app.state.service.authorized(credentials.credentials if credentials else None):
        raise HTTPException(401, "missing or wrong bearer token")


def _salt(path_salt: str) -> str:
    return "" if path_salt == DEFAULT_TENANT else path_salt


def _add_error_handlers(app: FastAPI) -> None:
    """Every error is ``{"error": reason}`` with its status; a bad request is a 400, never a dropped connection."""

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        reasons = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in exc.errors()[:5]
        )
        return JSONResponse({"error": reasons}, status_code=400)  # the input itself is never echoed back

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        reason = f"no such endpoint: {request.method} {request.url.path}" if exc.status_code == 404 else exc.detail
        return JSONResponse({"error": reason}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(ProtocolError)
    @app.exception_handler(KVTierError)
    @app.exception_handler(ValueError)
    async def bad_request(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("admin API: internal error serving %s %s", request.method, request.url.path)
        return JSONResponse({"error": f"internal error: {type(exc).__name__}"}, status_code=500)


class BoundedBody:
    """ASGI middleware: refuse a mutating request without the token on its headers (401: an unauthenticated
    client never makes the server read a body), read the body whole before the app runs, at most
    ``MAX_BODY_BYTES`` (413) and within ``BODY_TIMEOUT_SEC`` (408), check it is strict JSON (400), then hand it
    to the app. A client that disconnects before its body is complete gets nothing run."""

    def __init__(self, app: ASGIApp, authorized: Callable[[str | None], bool]) -> None:
        self.app = app
        self.authorized = authorized

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            given = headers.get(b"authorization", b"").decode("latin-1").removeprefix("Bearer ").strip()
            if not self.authorized(given or None):
                await _error(send, 401, "missing or wrong bearer token")
                return
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            await _error(send, 413, f"body larger than {MAX_BODY_BYTES} bytes")
            return
        try:
            body = await asyncio.wait_for(_read_body(receive), BODY_TIMEOUT_SEC)
        except TimeoutError:
            await _error(send, 408, f"the body did not arrive within {BODY_TIMEOUT_SEC:g} s")
            return
        except _TooLarge:
            await _error(send, 413, f"body larger than {MAX_BODY_BYTES} bytes")
            return
        if body is None:  # the client went away mid-body: nothing to answer, nothing to run
            return
        if body:
            try:
                parse_json_object(body, "body")
            except ProtocolError as exc:
                await _error(send, 400, str(exc))
                return
        await self.app(scope, _replay(body, receive), send)


class _TooLarge(Exception):
    pass


async def _read_body(receive: Receive) -> bytes | None:
    parts, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        part = message.get("body", b"")
        size += len(part)
        if size > MAX_BODY_BYTES:
            raise _TooLarge
        parts.append(part)
        if not message.get("more_body", False):
            return b"".join(parts)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: the disconnect, when it comes

    return replayed


async def _error(send: Send, status: int, reason: str) -> None:
    await JSONResponse({"error": reason}, status_code=status)({"type": "http"}, _nothing, send)


async def _nothing() -> Message:
    return {"type": "http.disconnect"}


# -- the server thread --------------------------------------------------------------------------------------
class AdminServer:
    """The admin API, served by uvicorn on its own thread. The socket is bound here, so a port in use fails at
    construction, as the data plane's does."""

    def __init__(self, service: CacheService, ready: threading.Event) -> None:
        config = service.config
        family = socket.getaddrinfo(config.http_host, config.http_port, type=socket.SOCK_STREAM)[0][0]
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((config.http_host, config.http_port))
        self._socket.listen(128)
        self.host = config.http_host
        self.uvicorn = uvicorn.Server(
            uvicorn.Config(
                create_app(service, ready),
                http="h11",  # the pure-Python parser, which bounds header size (h11_max_incomplete_event_size)
                log_config=None,  # kvtier's logging as configured, not uvicorn's own
                access_log=False,
                lifespan="off",
                limit_concurrency=MAX_CONNECTIONS,
                timeout_keep_alive=5,
            )
        )
        self._thread = threading.Thread(target=self._serve, name="kvtier-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._socket.getsockname()[1])

    def _serve(self) -> None:
        self.uvicorn.run(sockets=[self._socket])

    def start(self) -> None:
        self._thread.start()
        log.info("kvtier admin HTTP on http://%s:%d", self.host, self.port)

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        if self._thread.is_alive():
            self._thread.join(10)
        self._socket.close()
