"""``kvtier proxy`` (:mod:`kvtier.integrations.vllm.proxy`), the prefill/decode disaggregation proxy.

The fast tests run the proxy on a real uvicorn between real HTTP peers written here (:class:`FakeVLLM`: small
FastAPI apps that answer as a prefiller or decoder would, record what they get, stream SSE, fail or stall on
demand): test doubles of vLLM's HTTP side, for the protocol checks only. The slow test runs the whole thing for
real: a ``kvtier server``, two ``vllm serve`` of the local model (``kv_producer`` and ``kv_consumer``) and
``kvtier proxy``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client.parser import text_string_to_metric_families

from kvtier.integrations.models import is_prepared
from kvtier.integrations.vllm.proxy import CHAT, COMPLETIONS, Proxy, server_config
from servers import HttpProcess, ServerProcess, free_port, vllm_serve_with_server

PARAMS = {"kvtier": {"opaque": [1, 2, 3]}, "other": "kept as it is"}  # what the fake prefiller hands back
MARKED = {"max_tokens": 1, "stream": False, "kv_transfer_params": {"do_remote_decode": True}}  # a prefill's changes
CHUNKS = 3  # SSE events per fake stream, before [DONE]


def dead_url() -> str:
    """A loopback URL nothing listens on."""
    return f"http://127.0.0.1:{free_port()}"


class Served:
    """uvicorn serving an app on loopback, in a thread of the test process."""

    def __init__(self, config: uvicorn.Config) -> None:
        self.url = f"http://{config.host}:{config.port}"
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, f"uvicorn did not start on {self.url}"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@dataclass
class Received:
    path: str
    body: dict[str, Any]
    headers: dict[str, str]


class FakeVLLM:
    """A test double of one vLLM OpenAI server's HTTP side. It records each request and answers as the request's
    ``fake`` field says for its name: ``{"fake": {NAME: {"status": 503, "sleep": 2.0, "gated": true, "params":
    {...}}}}`` (an error status with an error body; a delay; a stream whose events wait for :attr:`gate`; the
    ``kv_transfer_params`` of its reply, else those given at construction)."""

    def __init__(self, name: str, kv_transfer_params: dict[str, Any] | None = None) -> None:
        self.name = name
        self.kv_transfer_params = kv_transfer_params
        self.reset()
        app = FastAPI()
        app.post(COMPLETIONS)(self._generate)
        app.post(CHAT)(self._generate)
        app.get("/v1/models")(lambda: {"object": "list", "data": [{"id": "fake-model", "owned_by": self.name}]})
        app.get("/health")(lambda: Response(status_code=200))
        config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_config=None, access_log=False,
                                lifespan="off", timeout_graceful_shutdown=1)  # fmt: skip
        self.served = Served(config)
        self.url = self.served.url

    def reset(self) -> None:
        self.received: list[Received] = []
        self.gate = threading.Semaphore(0)  # one release per event of a gated stream
        self.stream_closed = threading.Event()  # a stream was closed before its end

    async def _generate(self, request: Request) -> Response:
        body = await request.json()
        self.received.append(Received(request.url.path, body, dict(request.headers)))
        act = body.get("fake", {}).get(self.name, {})
        await asyncio.sleep(act.get("sleep", 0))
        status = act.get("status", 200)
        if status != 200:
            return JSONResponse({"error": {"message": f"{self.name} says {status}", "code": status}}, status)
        if body.get("stream"):
            return StreamingResponse(self._events(act.get("gated", False)), media_type="text/event-stream")
        params = act.get("params", self.kv_transfer_params)
        return JSONResponse({"served_by": self.name, "choices": [{"text": "..."}], "kv_transfer_params": params})

    async def _events(self, gated: bool) -> Any:
        finished = False
        try:
            for i in range(CHUNKS):
                while gated and not self.gate.acquire(blocking=False):
                    await asyncio.sleep(0.005)
                yield f"data: {json.dumps({'served_by': self.name, 'i': i})}\n\n"
            yield "data: [DONE]\n\n"
            finished = True
        finally:
            if not finished:
                self.stream_closed.set()


@dataclass
class RunningProxy:
    proxy: Proxy
    served: Served

    @property
    def url(self) -> str:
        return self.served.url

    def count(self, metric: str, **labels: str) -> float:
        return float(getattr(self.proxy.metrics, metric).value(**labels))


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, FakeVLLM]]:
    started = {
        "prefiller": FakeVLLM("prefiller", PARAMS),
        "decoder-a": FakeVLLM("decoder-a"),
        "decoder-b": FakeVLLM("decoder-b"),
    }
    yield started
    for fake in started.values():
        fake.served.stop()


@pytest.fixture
def peers(fakes: dict[str, FakeVLLM]) -> dict[str, FakeVLLM]:
    for fake in fakes.values():
        fake.reset()
    return fakes


@pytest.fixture
def start_proxy() -> Iterator[Callable[..., RunningProxy]]:
    """``start_proxy(prefillers, decoders, prefill_timeout=5.0)``: a proxy on a free port; all stop at the end."""
    started: list[Served] = []

    def start(prefillers: list[str], decoders: list[str], prefill_timeout: float = 5.0) -> RunningProxy:
        proxy = Proxy(prefillers, decoders, prefill_timeout)
        served = Served(server_config(proxy, "127.0.0.1", free_port()))
        started.append(served)
        return RunningProxy(proxy, served)

    yield start
    for served in started:
        served.stop()


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as c:
        yield c


def next_event(lines: Iterator[str]) -> Any:
    """The next SSE event's data: decoded JSON, or the text itself (``[DONE]``)."""
    for line in lines:
        if line:
            data = line.removeprefix("data: ")
            return data if data == "[DONE]" else json.loads(data)
    raise AssertionError("the stream ended")


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


# -- the protocol ---------------------------------------------------------------------------------------------------
def test_prefill_then_decode_with_the_prefillers_params(peers, start_proxy, client) -> None:
    running = start_proxy([peers["prefiller"].url], [peers["decoder-a"].url])
    body = {"model": "m", "prompt": "hello", "max_tokens": 20, "min_tokens": 5, "kv_transfer_params": {"own": 1}}
    headers = {"Authorization": "Bearer secret", "X-Request-Id": "req-1", "X-Other": "not forwarded"}
    reply = client.post(running.url + COMPLETIONS, json=body, headers=headers)

    assert reply.status_code == 200 and reply.json()["served_by"] == "decoder-a"
    (prefill,) = peers["prefiller"].received
    expected = {k: v for k, v in body.items() if k != "min_tokens"}  # more than one token would be refused
    assert prefill.body == {**expected, **MARKED}
    (decode,) = peers["decoder-a"].received
    assert decode.body == {**body, "kv_transfer_params": PARAMS}
    for seen in (prefill, decode):
        assert seen.path == COMPLETIONS
        assert seen.headers["authorization"] == "Bearer secret" and seen.headers["x-request-id"] == "req-1"
        assert "x-other" not in seen.headers
    assert reply.headers["x-request-id"] == "req-1" and reply.headers["x-kvtier-prefill"] == "ok"
    assert float(reply.headers["x-kvtier-prefill-seconds"]) > 0

    assert running.count("requests", route=COMPLETIONS, outcome="ok") == 1
    assert running.proxy.metrics.prefill_seconds.count() == 1
    assert running.proxy.metrics.decode_first_byte_seconds.count(stream="false") == 1
    exposition = client.get(running.url + "/metrics").text
    assert 'kvtier_proxy_requests_total{outcome="ok",route="/v1/completions"} 1.0' in exposition
    assert "kvtier_proxy_prefill_seconds_count 1.0" in exposition
    assert 'kvtier_proxy_decode_first_byte_seconds_count{stream="false"} 1.0' in exposition


def test_chat_stream_passes_through_event_by_event(peers, start_proxy, client) -> None:
    running = start_proxy([peers["prefiller"].url], [peers["decoder-a"].url])
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "max_completion_tokens": 30,
        "stream": True,
        "stream_options": {"include_usage": True},
        "fake": {"decoder-a": {"gated": True}},
    }
    with client.stream("POST", running.url + CHAT, json=body) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
        lines = reply.iter_lines()
        for i in range(CHUNKS):
            peers["decoder-a"].gate.release()  # the decoder sends event i only now: it must arrive before i + 1
            assert next_event(lines) == {"served_by": "decoder-a", "i": i}
        assert next_event(lines) == "[DONE]"

    (prefill,) = peers["prefiller"].received
    assert prefill.path == CHAT
    unstreamed = {k: v for k, v in body.items() if k != "stream_options"}
    assert prefill.body == {**unstreamed, **MARKED, "max_completion_tokens": 1}
    assert peers["decoder-a"].received[0].body == {**body, "kv_transfer_params": PARAMS}
    wait_until(lambda: running.count("requests", route=CHAT, outcome="ok") == 1)
    assert running.proxy.metrics.decode_first_byte_seconds.count(stream="true") == 1


def test_no_params_from_the_prefiller_means_none_for_the_decoder(peers, start_proxy, client) -> None:
    running = start_proxy([peers["prefiller"].url], [peers["decoder-a"].url])
    body = {"prompt": "x", "kv_transfer_params": {"own": 1}, "fake": {"prefiller": {"params": None}}}
    assert client.post(running.url + COMPLETIONS, json=body).status_code == 200
    assert "kv_transfer_params" not in peers["decoder-a"].received[0].body


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("status", [400, 503])
def test_decoder_errors_pass_through(peers, start_proxy, client, status: int, stream: bool) -> None:
    running = start_proxy([peers["prefiller"].url], [peers["decoder-a"].url])
    body = {"prompt": "x", "stream": stream, "fake": {"decoder-a": {"status": status}}}
    reply = client.post(running.url + COMPLETIONS, json=body)
    assert reply.status_code == status
    assert reply.json() == {"error": {"message": f"decoder-a says {status}", "code": status}}
    wait_until(lambda: running.count("requests", route=COMPLETIONS, outcome="decoder_error") == 1)


@pytest.mark.parametrize("failure", ["unreachable", "error", "timeout"])
def test_a_failed_prefill_falls_back_to_the_decoder(peers, start_proxy, client, failure: str) -> None:
    prefiller = dead_url() if failure == "unreachable" else peers["prefiller"].url
    running = start_proxy([prefiller], [peers["decoder-a"].url], prefill_timeout=0.5)
    act = {"error": {"status": 500}, "timeout": {"sleep": 3.0}}.get(failure, {})
    started = time.monotonic()
    reply = client.post(running.url + COMPLETIONS, json={"prompt": "x", "fake": {"prefiller": act}})
    assert reply.status_code == 200 and reply.json()["served_by"] == "decoder-a"
    assert time.monotonic() - started < 2.5  # a slow prefiller costs the timeout, not its whole delay
    assert reply.headers["x-kvtier-prefill"] == failure
    assert "kv_transfer_params" not in peers["decoder-a"].received[0].body
    assert running.count("prefill_fallbacks", reason=failure) == 1
    assert running.count("requests", route=COMPLETIONS, outcome="ok") == 1


def test_health_and_models(peers, start_proxy, client) -> None:
    dead = dead_url()
    running = start_proxy([dead], [peers["decoder-a"].url])
    health = client.get(running.url + "/health")
    assert health.status_code == 200
    assert health.json()["decoders"] == {peers["decoder-a"].url: True}
    assert health.json()["prefillers"] == {dead: False}
    models = client.get(running.url + "/v1/models")
    assert models.status_code == 200 and models.json()["data"][0]["owned_by"] == "decoder-a"

    no_decoder = start_proxy([peers["prefiller"].url], [dead])
    assert client.get(no_decoder.url + "/health").status_code == 503
    assert client.get(no_decoder.url + "/v1/models").status_code == 502


def test_a_dead_decoder_is_skipped(peers, start_proxy, client) -> None:
    running = start_proxy([peers["prefiller"].url], [dead_url(), peers["decoder-a"].url])
    for _ in range(2):
        reply = client.post(running.url + COMPLETIONS, json={"prompt": "x"})
        assert reply.status_code == 200 and reply.json()["served_by"] == "decoder-a"

    none_up = start_proxy([peers["prefiller"].url], [dead_url()])
    reply = client.post(none_up.url + COMPLETIONS, json={"prompt": "x"})
    assert reply.status_code == 502 and "no decoder reachable" in reply.json()["error"]["message"]
    assert none_up.count("requests", route=COMPLETIONS, outcome="no_decoder") == 1


def test_least_outstanding_decoder_then_round_robin(peers, start_proxy, client) -> None:
    running = start_proxy([peers["prefiller"].url], [peers["decoder-a"].url, peers["decoder-b"].url])
    gated = {"prompt": "x", "stream": True, "fake": {"decoder-a": {"gated": True}, "decoder-b": {"gated": True}}}
    with client.stream("POST", running.url + COMPLETIONS, json=gated) as stream:
        busy = next(name for name in ("decoder-a", "decoder-b") if peers[name].received)
        idle = "decoder-b" if busy == "decoder-a" else "decoder-a"
        served = [client.post(running.url + COMPLETIONS, json={"prompt": "x"}).json()["served_by"] for _ in range(3)]
        assert served == [idle] * 3  # the busy one has a request outstanding
        for _ in range(CHUNKS):
            peers[busy].gate.release()
        stream.read()
    wait_until(lambda: all(i.outstanding == 0 for i in running.proxy.decoders.instances))
    served = [client.post(running.url + COMPLETIONS, json={"prompt": "x"}).json()["served_by"] for _ in range(4)]
    assert set(served[:2]) == {"decoder-a", "decoder-b"} and served[2:] == served[:2]  # ties: round robin


def test_client_disconnect_closes_the_decoders_stream(peers, start_proxy, client) -> None:
    running = start_proxy([peers["prefiller"].url], [peers["decoder-a"].url])
    body = {"prompt": "x", "stream": True, "fake": {"decoder-a": {"gated": True}}}
    with client.stream("POST", running.url + COMPLETIONS, json=body) as reply:
        peers["decoder-a"].gate.release()
        assert next_event(reply.iter_lines()) == {"served_by": "decoder-a", "i": 0}
    # The client is gone with the stream half sent: the proxy closes the decoder's, which sees its client go.
    assert peers["decoder-a"].stream_closed.wait(5)
    wait_until(lambda: running.count("requests", route=COMPLETIONS, outcome="disconnected") == 1)
    assert running.proxy.decoders.instances[0].outstanding == 0


def test_a_client_gone_during_the_prefill_spares_the_decoder(peers, start_proxy) -> None:
    running = start_proxy([peers["prefiller"].url], [peers["decoder-a"].url])
    body = {"prompt": "x", "fake": {"prefiller": {"sleep": 1.0}}}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(running.url + COMPLETIONS, json=body, timeout=0.3)
    wait_until(lambda: running.count("requests", route=COMPLETIONS, outcome="disconnected") == 1)
    assert peers["prefiller"].received and not peers["decoder-a"].received


def test_a_body_that_is_not_a_json_object_is_refused(peers, start_proxy, client) -> None:
    running = start_proxy([peers["prefiller"].url], [peers["decoder-a"].url])
    for content in (b"not json", b"[1, 2]"):
        reply = client.post(running.url + COMPLETIONS, content=content)
        assert reply.status_code == 400 and "JSON object" in reply.json()["error"]["message"]
    assert not peers["prefiller"].received and not peers["decoder-a"].received


# -- end to end: kvtier server, two vLLMs, the proxy -----------------------------------------------------------------
CHUNK_SIZE = 256
MODEL_NAME = "smollm2"
MAX_TOKENS = 12
PROMPT_TOKENS = (300, 517, 700)  # none a multiple of the chunk size: each leaves a partial chunk the decoder computes


def complete(url: str, prompt: list[int]) -> httpx.Response:
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
    reply = httpx.post(url + COMPLETIONS, json=body, timeout=300)
    assert reply.status_code == 200, reply.text
    return reply


def streamed_text(url: str, prompt: list[int]) -> tuple[str, int]:
    """The text of a streamed completion and the number of its events."""
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    parts: list[str] = []
    with httpx.stream("POST", url + COMPLETIONS, json=body, timeout=300) as reply:
        assert reply.status_code == 200
        lines = reply.iter_lines()
        while (event := next_event(lines)) != "[DONE]":
            parts.extend(choice["text"] for choice in event["choices"])
    return "".join(parts), len(parts)


def chat(url: str, system: str) -> httpx.Response:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Which box holds the lamp?"}]
    body = {"model": MODEL_NAME, "messages": messages, "max_completion_tokens": MAX_TOKENS, "temperature": 0}
    reply = httpx.post(url + CHAT, json=body, timeout=300)
    assert reply.status_code == 200, reply.text
    return reply


def prompt_tokens_by_source(url: str) -> dict[str, float]:
    """vLLM's count of prompt tokens computed (``local_compute``), from its prefix cache, and loaded by kvtier
    (``external_kv_transfer``), from its /metrics."""
    text = httpx.get(url + "/metrics").text
    (family,) = (f for f in text_string_to_metric_families(text) if f.name == "vllm:prompt_tokens_by_source")
    return {s.labels["source"]: s.value for s in family.samples if s.name.endswith("_total")}


def document(k: int) -> str:
    """A long text of its own for prompt ``k`` (its first words differ, so its chunks share no hash)."""
    words = ["lamp", "key", "map", "coin", "book", "ring"]
    lines = (f"Line {i}: the {words[(i + k) % 6]} is stored in box {(i * 7 + k) % 13}." for i in range(150))
    return f"Document {k}. " + " ".join(lines)


@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
@pytest.mark.skipif(not is_prepared(), reason="the model is not prepared: run `kvtier model prepare`")
def test_disaggregated_serving_end_to_end(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "disk", "--chunk-size", str(CHUNK_SIZE), "--max-local-cpu-size", "1",
                           "--max-local-disk-size", "1")  # fmt: skip
    vllm_args = ("--served-model-name", MODEL_NAME, "--max-model-len", "2048", "--max-num-seqs", "4")
    proxy_port = free_port()
    urls = {"proxy": f"http://127.0.0.1:{proxy_port}"}
    vllms: dict[str, HttpProcess] = {}
    proxy: HttpProcess | None = None
    try:
        started = time.monotonic()
        # The prefiller stores off its step: its answer can reach the proxy before its KV reaches the server, and
        # the decoder waits for the tokens the prefiller's kv_transfer_params name.
        off_step = {"async_store": True}
        vllms["prefiller"] = vllm_serve_with_server(tmp_path / "prefiller.log", server.port, role="kv_producer",
                                       chunk_size=CHUNK_SIZE, extra_config=off_step, args=vllm_args)  # fmt: skip
        vllms["decoder"] = vllm_serve_with_server(tmp_path / "decoder.log", server.port, role="kv_consumer",
                                     chunk_size=CHUNK_SIZE, args=vllm_args)  # fmt: skip
        for name, served in vllms.items():  # started together: one start's wait covers the other's
            urls[name] = served.wait_healthy().url
        print(f"\nboth vLLMs up in {time.monotonic() - started:.0f} s")
        proxy_args = [sys.executable, "-m", "kvtier.cli.main", "proxy", "--prefiller", urls["prefiller"],
                      "--decoder", urls["decoder"], "--port", str(proxy_port),
                      "--prefill-timeout", "300"]  # fmt: skip
        proxy = HttpProcess(proxy_args, tmp_path / "proxy.log", urls["proxy"]).wait_healthy(60)

        prompts = []
        for k, n in enumerate(PROMPT_TOKENS):
            ids = httpx.post(urls["prefiller"] + "/tokenize", json={"model": MODEL_NAME, "prompt": document(k)}).json()
            ids = ids["tokens"]
            assert len(ids) >= n
            prompts.append(ids[:n])

        # Through the proxy: the prefiller computes and stores each prompt, the decoder loads its whole chunks.
        hits_before = server.status()["metrics"]["kvtier_retrieve_hit_tokens_total"]
        decoder_before = prompt_tokens_by_source(urls["decoder"])
        proxied = []
        for prompt in prompts:
            reply = complete(urls["proxy"], prompt)
            assert reply.headers["x-kvtier-prefill"] == "ok"
            proxied.append(reply.json()["choices"][0]["text"])
            print(f"{len(prompt)} tokens: prefill {float(reply.headers['x-kvtier-prefill-seconds']):.2f} s")
        hits = server.status()["metrics"]["kvtier_retrieve_hit_tokens_total"] - hits_before
        whole_chunks = sum(n // CHUNK_SIZE * CHUNK_SIZE for n in PROMPT_TOKENS)
        assert hits >= whole_chunks  # only the decoder retrieves
        # The decoder loads every whole chunk and computes only each prompt's last partial chunk.
        decoder = prompt_tokens_by_source(urls["decoder"])
        computed = decoder["local_compute"] - decoder_before["local_compute"]
        loaded = decoder["external_kv_transfer"] - decoder_before["external_kv_transfer"]
        assert (computed, loaded) == (sum(n % CHUNK_SIZE for n in PROMPT_TOKENS), whole_chunks), decoder

        # The same model, greedy: the prefiller asked directly gives the same text.
        direct = [complete(urls["prefiller"], prompt).json()["choices"][0]["text"] for prompt in prompts]
        assert proxied == direct and all(direct)

        text, events = streamed_text(urls["proxy"], prompts[0])
        assert text == direct[0] and events > 1

        proxied_chat = chat(urls["proxy"], document(7)[:2000])
        assert proxied_chat.headers["x-kvtier-prefill"] == "ok"
        answer = proxied_chat.json()["choices"][0]["message"]["content"]
        assert answer == chat(urls["prefiller"], document(7)[:2000]).json()["choices"][0]["message"]["content"]

        metrics = httpx.get(urls["proxy"] + "/metrics").text
        assert "kvtier_proxy_prefill_seconds_count 5.0" in metrics  # 3 completions, 1 stream, 1 chat
        assert "kvtier_proxy_prefill_fallbacks_total" in metrics and 'reason="' not in metrics

        # The prefiller's answer to a proxy's prefill says how much of the prompt the cache holds (or will).
        handoff = {
            "model": MODEL_NAME,
            "prompt": prompts[0],
            "max_tokens": 1,
            "kv_transfer_params": {"do_remote_decode": True},
        }
        params = httpx.post(urls["prefiller"] + COMPLETIONS, json=handoff, timeout=300).json()["kv_transfer_params"]
        assert params == {"kvtier": {"cached_tokens": PROMPT_TOKENS[0] // CHUNK_SIZE * CHUNK_SIZE}}
        assert "did not arrive" not in vllms["decoder"].tail(10**6)  # no hand-off timed out
        assert "(off the step; " in vllms["prefiller"].tail(10**6)

        # Without the prefiller the decoder alone answers, computing what kvtier lacks.
        vllms["prefiller"].stop()
        reply = complete(urls["proxy"], prompts[0])
        assert reply.headers["x-kvtier-prefill"] == "unreachable"
        assert reply.json()["choices"][0]["text"] == direct[0]
        fresh = prompts[1][:5] + prompts[2][5:400]  # never seen: computed by the decoder whole
        assert complete(urls["proxy"], fresh).json()["choices"][0]["text"]
        assert httpx.get(urls["proxy"] + "/health").json()["prefillers"] == {urls["prefiller"]: False}
    finally:
        for served in vllms.values():
            served.stop()
        if proxy is not None:
            proxy.stop()
        server.stop()
