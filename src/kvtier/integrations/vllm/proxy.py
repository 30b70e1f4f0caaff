"""``kvtier proxy``: an OpenAI-compatible HTTP proxy for prefill/decode disaggregation (``docs/disaggregation.md``).

Each generation request (``POST /v1/completions``, ``/v1/chat/completions``) goes first to a prefiller, a vLLM
whose kvtier connector has ``kv_role`` ``kv_producer``, for one output token and not streamed: the prefiller computes
the prompt and its connector stores the prompt's KV in the kvtier server (during or just after its answer, which
then says how much of the prompt the cache will hold). Then the client's request goes to a decoder
(``kv_consumer``), which waits for and loads that KV instead of computing it and generates; the
decoder's reply (status, body, SSE stream as it comes) is the client's. The prefill request carries
``"kv_transfer_params": {"do_remote_decode": true}`` (vLLM's convention) and whatever ``kv_transfer_params`` object
the prefiller's reply holds goes, unchanged, into the decoder's request: the proxy never looks inside it.

A prefill that fails (no prefiller reachable, an error status, no reply within ``prefill_timeout_sec``) is skipped
with a warning and counted: the decoder then computes the prompt itself, so no request fails for it. A decoder's
error is passed through as it is. Each role's instances are chosen by least outstanding requests, ties round robin.
For ``DOWN_COOLDOWN_SEC`` after refusing a connection a prefiller is skipped and a decoder tried last (a dead
instance has no outstanding requests and would otherwise win every choice).

HTTP only, on FastAPI/uvicorn and ``httpx.AsyncClient``: this module never imports vLLM.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from kvtier import __version__
from kvtier.metrics import Counter, Gauge, Histogram, Registry

log = logging.getLogger("kvtier.proxy")

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
CONNECT_TIMEOUT_SEC = 5.0  # an instance that has not accepted a connection by then counts as down
METADATA_TIMEOUT_SEC = 10.0  # /v1/models
HEALTH_TIMEOUT_SEC = 2.0
DOWN_COOLDOWN_SEC = 5.0
GRACEFUL_SHUTDOWN_SEC = 30.0  # streams still open at SIGTERM get this long to finish
MAX_CONNECTIONS = 1024  # to all instances together; a request beyond waits for a free one
# The client's headers that go upstream (vLLM's --api-key), besides X-Request-Id, which vLLM names its request by:
# the client's or a new one, the same on the prefiller and the decoder so that their logs line up.
FORWARDED_HEADERS = ("authorization",)
# Sampling fields a one-token prefill must not carry: vLLM refuses stream_options without stream, and a
# min_tokens above max_tokens.
PREFILL_DROPPED = ("stream_options", "min_tokens")
CONNECT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout)  # the request never reached the instance: try another
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

# Outcomes of a generation request (kvtier_proxy_requests_total).
OK = "ok"  # the decoder answered 2xx (and a stream reached its end)
DECODER_ERROR = "decoder_error"  # the decoder's own error status, passed through
NO_DECODER = "no_decoder"  # no decoder reachable, or one failed before answering: 502
BROKEN = "broken"  # the decoder's stream broke off after its status was sent
DISCONNECTED = "disconnected"  # the client went away before the stream's end
BAD_REQUEST = "bad_request"  # the body is not a JSON object: 400


@dataclass(eq=False)
class Instance:
    """One vLLM OpenAI server."""

    url: str
    outstanding: int = 0
    down_until: float = 0.0  # monotonic time before which it is tried last (it refused a connection)


class Unreachable(Exception):
    """No instance of a role accepted the connection."""


class Pool:
    """The instances of one role. Used from the event loop's thread only, so without a lock."""

    def __init__(self, role: str, urls: Sequence[str]) -> None:
        self.role = role
        self.instances = [Instance(url.rstrip("/")) for url in urls]
        self._next = 0  # where the round robin among equally loaded instances starts

    def order(self) -> list[Instance]:
        """The instances in the order to try them: up ones first, by outstanding requests, ties round robin."""
        now, count = time.monotonic(), len(self.instances)
        ranked = sorted(
            range(count),
            key=lambda k: (self.instances[k].down_until > now, self.instances[k].outstanding, (k - self._next) % count),
        )
        return [self.instances[k] for k in ranked]

    def up(self) -> list[Instance]:
        """:meth:`order` without the instances that refused a connection lately."""
        now = time.monotonic()
        return [instance for instance in self.order() if instance.down_until <= now]

    def acquire(self, instance: Instance) -> None:
        instance.outstanding += 1
        self._next = (self.instances.index(instance) + 1) % len(self.instances)

    def release(self, instance: Instance) -> None:
        instance.outstanding -= 1

    def mark_down(self, instance: Instance, error: Exception) -> None:
        instance.down_until = time.monotonic() + DOWN_COOLDOWN_SEC
        log.warning("proxy: %s %s is unreachable (%s); tried last for %g s", self.role, instance.url,
                    _describe(error), DOWN_COOLDOWN_SEC)  # fmt: skip

    def outstanding(self) -> dict[tuple[str, ...], float]:
        """Requests in flight per instance (a gauge's source)."""
        return {(self.role, instance.url): float(instance.outstanding) for instance in self.instances}


class ProxyMetrics:
    """The proxy's metrics, on ``/metrics``: requests by route and outcome, prefill fallbacks, the TTFT breakdown
    (prefill time, then the decoder's time to its first byte) and requests in flight per instance."""

    def __init__(self, pools: Sequence[Pool]) -> None:
        self.registry = r = Registry()
        self.requests = r.register(
            Counter(
                "kvtier_proxy_requests_total",
                "Generation requests by route and outcome (ok, decoder_error, no_decoder, broken, disconnected, "
                "bad_request).",
                ("route", "outcome"),
            )
        )
        self.prefill_fallbacks = r.register(
            Counter(
                "kvtier_proxy_prefill_fallbacks_total",
                "Requests sent to a decoder without a prefill, by reason (unreachable, error, timeout).",
                ("reason",),
            )
        )
        self.prefill_seconds = r.register(
            Histogram(
                "kvtier_proxy_prefill_seconds",
                "Time of a successful prefill: the prefiller computed and stored the prompt.",
                buckets=SECONDS_BUCKETS,
            )
        )
        self.decode_first_byte_seconds = r.register(
            Histogram(
                "kvtier_proxy_decode_first_byte_seconds",
                "From sending a request to a decoder to its first byte: the decode's time to first token when "
                "streamed, its whole reply otherwise.",
                ("stream",),
                buckets=SECONDS_BUCKETS,
            )
        )
        self.outstanding = r.register(
            Gauge("kvtier_proxy_outstanding_requests", "Requests in flight at an instance.", ("role", "instance"))
        )
        for pool in pools:
            self.outstanding.add_source(pool.outstanding)


@dataclass(frozen=True)
class Prefill:
    """What the prefill of one request gave."""

    seconds: float
    instance: str | None = None  # the prefiller that answered
    kv_transfer_params: dict[str, Any] | None = None  # from its reply, for the decoder
    fallback: str | None = None  # why it was skipped (unreachable, error, timeout); None when it ran


@dataclass(eq=False)
class Exchange:
    """One generation request through the proxy: what is measured and logged of it."""

    route: str
    request_id: str
    stream: bool = False
    prefill: Prefill | None = None
    decoder: Instance | None = None
    first_byte_sec: float | None = None


def prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    """The request a prefiller gets: the client's, for one output token, not streamed, marked for a remote decode."""
    request = {key: value for key, value in body.items() if key not in PREFILL_DROPPED}
    request.update(max_tokens=1, stream=False, kv_transfer_params={"do_remote_decode": True})
    if "max_completion_tokens" in body:  # chat: it takes precedence over max_tokens
        request["max_completion_tokens"] = 1
    return request


def decode_body(body: dict[str, Any], kv_transfer_params: dict[str, Any] | None) -> dict[str, Any]:
    """The request a decoder gets: the client's, with the prefiller's ``kv_transfer_params`` (the proxy owns that
    field: a client's own is dropped)."""
    request = {key: value for key, value in body.items() if key != "kv_transfer_params"}
    if kv_transfer_params is not None:
        request["kv_transfer_params"] = kv_transfer_params
    return request


def error_response(status: int, message: str) -> JSONResponse:
    """An error of the proxy's own, shaped as vLLM's (OpenAI's) are."""
    kind = "BadRequestError" if status < 500 else "BadGatewayError"
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}}, status)


class Relay(StreamingResponse):
    """A decoder's reply streamed to the client as its bytes arrive. However the client's side ends (the stream's
    end, the client gone, the task cancelled) the upstream response is closed, which ends the decoder's request,
    and ``on_done`` gets the outcome."""

    def __init__(
        self,
        upstream: httpx.Response,
        headers: dict[str, str],
        outcome: str,
        on_first_byte: Callable[[], None],
        on_done: Callable[[str], None],
    ) -> None:
        self._upstream = upstream
        self._on_first_byte = on_first_byte
        self._on_done = on_done
        self._outcome = DISCONNECTED  # until the decoder's stream has been relayed to its end
        super().__init__(self._chunks(outcome), status_code=upstream.status_code, headers=headers)

    async def _chunks(self, outcome: str) -> AsyncIterator[bytes]:
        first = True
        try:
            async for chunk in self._upstream.aiter_bytes():
                if first:
                    self._on_first_byte()
                    first = False
                yield chunk
        except httpx.HTTPError as exc:  # the status is sent: all that is left is to end the stream early
            log.warning("proxy: the decoder's stream broke off: %s", _describe(exc))
            self._outcome = BROKEN
            return
        self._outcome = outcome

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):  # a cancelled task must still close the decoder's stream
                await self._upstream.aclose()
            self._on_done(self._outcome)


class Proxy:
    """The proxy's state: the prefillers, the decoders, one pooled HTTP client to them all, and the metrics."""

    def __init__(self, prefillers: Sequence[str], decoders: Sequence[str], prefill_timeout_sec: float) -> None:
        if not decoders:
            raise ValueError("the proxy needs at least one decoder")
        self.prefillers = Pool("prefiller", prefillers)
        self.decoders = Pool("decoder", decoders)
        self.prefill_timeout_sec = prefill_timeout_sec
        self.metrics = ProxyMetrics([self.prefillers, self.decoders])
        self.client = httpx.AsyncClient(
            # No read timeout: a generation may take minutes; the prefill is bounded by prefill_timeout_sec.
            timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT_SEC),
            limits=httpx.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_CONNECTIONS),
            trust_env=False,  # the instances are on the serving network: never through an HTTP(S)_PROXY
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    # -- generation -----------------------------------------------------------------------------------------------
    async def generate(self, route: str, request: Request) -> Response:
        exchange = Exchange(route, request.headers.get("x-request-id") or uuid.uuid4().hex)
        try:
            body = json.loads(await request.body())
        except ValueError:
            body = None
        if not isinstance(body, dict):
            self.metrics.requests.inc(route=route, outcome=BAD_REQUEST)
            return error_response(400, "the request body must be a JSON object")
        headers = self._upstream_headers(request, exchange.request_id)
        exchange.stream = body.get("stream") is True
        exchange.prefill = prefill = await self.prefill(exchange, body, headers)
        if await request.is_disconnected():  # a client that gave up during the prefill: spare the decoder
            self._finish(exchange, DISCONNECTED)
            return Response(status_code=499)  # nginx's "client closed request": nobody reads it
        return await self.decode(exchange, decode_body(body, prefill.kv_transfer_params), headers)

    async def prefill(self, exchange: Exchange, body: dict[str, Any], headers: dict[str, str]) -> Prefill:
        """Have a prefiller compute and store the prompt; a failure is a :class:`Prefill` with its ``fallback``."""
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.prefill_timeout_sec):
                instance, response = await self._post_prefill(exchange.route, prefill_body(body), headers)
        except TimeoutError:
            return self._skip(exchange, "timeout", started, f"no reply within {self.prefill_timeout_sec:g} s")
        except Unreachable as exc:
            return self._skip(exchange, "unreachable", started, str(exc))
        except httpx.HTTPError as exc:
            return self._skip(exchange, "error", started, _describe(exc))
        if response.status_code != 200:
            return self._skip(exchange, "error", started,
                              f"{instance.url} answered {response.status_code}: {response.text[:200]}")  # fmt: skip
        try:
            reply = response.json()
        except ValueError:
            return self._skip(exchange, "error", started, f"{instance.url} answered no JSON: {response.text[:200]!r}")
        params = reply.get("kv_transfer_params") if isinstance(reply, dict) else None
        seconds = time.perf_counter() - started
        self.metrics.prefill_seconds.observe(seconds)
        return Prefill(seconds, instance.url, params if isinstance(params, dict) else None)

    async def _post_prefill(
        self, route: str, body: dict[str, Any], headers: dict[str, str]
    ) -> tuple[Instance, httpx.Response]:
        for instance in self.prefillers.up():
            self.prefillers.acquire(instance)
            try:
                return instance, await self.client.post(instance.url + route, json=body, headers=headers)
            except CONNECT_ERRORS as exc:
                self.prefillers.mark_down(instance, exc)
            finally:
                self.prefillers.release(instance)
        raise Unreachable(f"no prefiller reachable (one that refused a connection rests {DOWN_COOLDOWN_SEC:g} s)")

    def _skip(self, exchange: Exchange, reason: str, started: float, detail: str) -> Prefill:
        self.metrics.prefill_fallbacks.inc(reason=reason)
        log.warning("proxy: request %s: prefill skipped (%s: %s); the decoder computes the prompt",
                    exchange.request_id, reason, detail)  # fmt: skip
        return Prefill(time.perf_counter() - started, fallback=reason)

    async def decode(self, exchange: Exchange, body: dict[str, Any], headers: dict[str, str]) -> Response:
        """Send the request to a decoder and hand its reply to the client, status and body as they are."""
        started = time.perf_counter()
        try:
            exchange.decoder, upstream = await self._open_decode(exchange.route, body, headers)
        except (Unreachable, httpx.HTTPError) as exc:
            self._finish(exchange, NO_DECODER)
            return error_response(502, f"kvtier proxy: {_describe(exc)}")
        outcome = OK if upstream.is_success else DECODER_ERROR
        reply_headers = self._reply_headers(exchange, upstream)

        def first_byte() -> None:
            exchange.first_byte_sec = time.perf_counter() - started
            self.metrics.decode_first_byte_seconds.observe(exchange.first_byte_sec, stream=str(exchange.stream).lower())

        if exchange.stream:
            return Relay(upstream, reply_headers, outcome, first_byte, lambda done: self._finish(exchange, done))
        try:
            content = await upstream.aread()
            first_byte()
        except httpx.HTTPError as exc:
            outcome = NO_DECODER
            return error_response(502, f"kvtier proxy: the decoder's reply broke off: {_describe(exc)}")
        finally:
            await upstream.aclose()
            self._finish(exchange, outcome)
        return Response(content, upstream.status_code, headers=reply_headers)

    async def _open_decode(
        self, route: str, body: dict[str, Any], headers: dict[str, str]
    ) -> tuple[Instance, httpx.Response]:
        """The chosen decoder and its response, open (headers read, body not yet)."""
        for instance in self.decoders.order():
            self.decoders.acquire(instance)
            request = self.client.build_request("POST", instance.url + route, json=body, headers=headers)
            try:
                return instance, await self.client.send(request, stream=True)
            except CONNECT_ERRORS as exc:
                self.decoders.release(instance)
                self.decoders.mark_down(instance, exc)
            except BaseException:
                self.decoders.release(instance)
                raise
        raise Unreachable("no decoder reachable")

    def _finish(self, exchange: Exchange, outcome: str) -> None:
        """Count and log the request; hand its decoder back."""
        if exchange.decoder is not None:
            self.decoders.release(exchange.decoder)
        self.metrics.requests.inc(route=exchange.route, outcome=outcome)
        prefill = exchange.prefill
        if prefill is not None and prefill.fallback is None:
            prefilled = f"prefill {prefill.seconds:.3f} s on {prefill.instance}"
        else:
            prefilled = f"prefill skipped ({prefill.fallback if prefill else 'none'})"
        first = "-" if exchange.first_byte_sec is None else f"{exchange.first_byte_sec:.3f} s"
        decoder = exchange.decoder.url if exchange.decoder else "none"
        log.info("proxy: request %s %s: %s, decode first byte %s on %s: %s",
                 exchange.request_id, exchange.route, prefilled, first, decoder, outcome)  # fmt: skip

    def _upstream_headers(self, request: Request, request_id: str) -> dict[str, str]:
        headers = {name: request.headers[name] for name in FORWARDED_HEADERS if name in request.headers}
        headers["x-request-id"] = request_id
        return headers

    def _reply_headers(self, exchange: Exchange, upstream: httpx.Response) -> dict[str, str]:
        """The decoder's content type, the request id, and how the prefill went (for clients that time requests)."""
        prefill = exchange.prefill
        headers = {"x-request-id": exchange.request_id}
        if "content-type" in upstream.headers:
            headers["content-type"] = upstream.headers["content-type"]
        if prefill is not None:
            headers["x-kvtier-prefill"] = prefill.fallback or "ok"
            headers["x-kvtier-prefill-seconds"] = f"{prefill.seconds:.6f}"
        return headers

    # -- the rest of the API --------------------------------------------------------------------------------------
    async def models(self, request: Request) -> Response:
        """A decoder's ``/v1/models``, as it answers."""
        headers = {name: request.headers[name] for name in FORWARDED_HEADERS if name in request.headers}
        for instance in self.decoders.order():
            try:
                response = await self.client.get(
                    instance.url + "/v1/models", headers=headers, timeout=METADATA_TIMEOUT_SEC
                )
            except CONNECT_ERRORS as exc:
                self.decoders.mark_down(instance, exc)
                continue
            except httpx.HTTPError as exc:
                return error_response(502, f"kvtier proxy: {instance.url}: {_describe(exc)}")
            content_type = response.headers.get("content-type", "application/json")
            return Response(response.content, response.status_code, headers={"content-type": content_type})
        return error_response(502, "kvtier proxy: no decoder reachable")

    async def health(self) -> JSONResponse:
        """200 when at least one decoder answers its ``/health`` (without prefillers requests still succeed)."""
        decoders, prefillers = await asyncio.gather(self._health(self.decoders), self._health(self.prefillers))
        healthy = any(decoders.values())
        body = {"status": "ok" if healthy else "no decoder healthy", "decoders": decoders, "prefillers": prefillers}
        return JSONResponse(body, 200 if healthy else 503)

    async def _health(self, pool: Pool) -> dict[str, bool]:
        answers = await asyncio.gather(*(self._answers_health(instance.url) for instance in pool.instances))
        return {instance.url: ok for instance, ok in zip(pool.instances, answers, strict=True)}

    async def _answers_health(self, url: str) -> bool:
        try:
            return (await self.client.get(url + "/health", timeout=HEALTH_TIMEOUT_SEC)).status_code == 200
        except httpx.HTTPError:
            return False


def create_app(proxy: Proxy) -> FastAPI:
    """The proxy's HTTP API; closing the app (uvicorn's shutdown) closes the proxy's connections."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await proxy.aclose()

    app = FastAPI(title="kvtier proxy", version=__version__, lifespan=lifespan)

    @app.post(COMPLETIONS)
    async def completions(request: Request) -> Response:
        return await proxy.generate(COMPLETIONS, request)

    @app.post(CHAT)
    async def chat_completions(request: Request) -> Response:
        return await proxy.generate(CHAT, request)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return await proxy.models(request)

    @app.get("/health")
    async def health() -> JSONResponse:
        return await proxy.health()

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:  # on the event loop, the only thread that changes the pools
        return PlainTextResponse(proxy.metrics.registry.render(), media_type="text/plain; version=0.0.4")

    return app


def server_config(proxy: Proxy, host: str, port: int) -> uvicorn.Config:
    """uvicorn's configuration for the proxy: kvtier's logging (a line per request of its own, no access log)."""
    return uvicorn.Config(
        create_app(proxy),
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SEC,
    )


def _describe(error: BaseException) -> str:
    """An exception for a log line: httpx's often have an empty message."""
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
