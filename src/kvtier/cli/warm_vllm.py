"""``kvtier warm --vllm URL``: warm a running vLLM's kvtier connector by sending it the prompts.

Each prompt is one ``/v1/completions`` request for one output token at temperature 0 to the model vLLM serves
(``GET /v1/models``), a few in flight at once (``--concurrency``): vLLM computes the prompt and its connector stores
the KV. Text and chat messages are tokenized by vLLM itself (``POST /tokenize``; messages through the chat template
without a generation prompt, as the transformers path renders them), so the ids looked up and sent are the ones
vLLM computes. When the kvtier server the connector uses is known (``--admin-url``, or the host of ``server_url``
at ``http_port``), its admin API says which prompts are cached up to their last full chunk: those are skipped, and
what each request stored is counted. Without one every prompt is sent (a cached one costs vLLM a load and one
computed token).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any
from urllib.parse import urlsplit

import httpx

from kvtier.cli.ops import TIMEOUT_SEC
from kvtier.cli.warm import Progress, Prompt, Warmed, summary
from kvtier.config import KVTierConfig

REQUEST_TIMEOUT_SEC = 600.0  # a completion waits behind the others in vLLM's queue; a long prompt on a CPU is slow
REFUSED = (400, 422)  # vLLM's answer to a prompt it will not take (too long, messages its template rejects)


class WarmError(Exception):
    """vLLM or the kvtier server failed, or they do not fit together: the run stops with this message."""


class Refused(Exception):
    """vLLM refused one prompt: it is counted and reported, the others go on."""


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What became of prompt ``n``."""

    n: int
    kind: str  # "sent", "cached", "too_short" or "refused"
    stored_tokens: int = 0
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class Api:
    """vLLM's API or the kvtier server's admin API: an exchange that fails is a :class:`WarmError`."""

    client: httpx.Client
    name: str  # for messages: "vLLM at http://..."

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        try:
            return self.client.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise WarmError(f"{self.name}: {path}: {exc or type(exc).__name__}") from None

    def reply(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.decode(self.call(method, path, body), path)

    def decode(self, response: httpx.Response, path: str) -> dict[str, Any]:
        if response.status_code != 200:
            raise WarmError(f"{self.name}: {path}: {response.status_code}: {_reason(response)}")
        try:
            reply = response.json()
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            raise WarmError(f"{self.name}: {path}: not a JSON object: {response.text[:200]!r}")
        return reply


class VLLM:
    """The model a vLLM serves, through its OpenAI API."""

    def __init__(self, api: Api, model: str | None) -> None:
        self.api = api
        cards = [c for c in api.reply("GET", "/v1/models").get("data", []) if isinstance(c, dict)]
        served = ", ".join(str(c.get("id")) for c in cards) or "none"
        if model is None and len(cards) != 1:
            raise WarmError(f"{api.name} serves {len(cards)} models ({served}): name one with --model")
        chosen = [c for c in cards if model is None or c.get("id") == model]
        if not chosen:
            raise WarmError(f"{api.name} does not serve {model!r} (it serves {served})")
        self.name = str(chosen[0]["id"])
        # The connector caches under the model vLLM loaded (its path or hub id), which a served name may rename.
        self.cache_names = (str(chosen[0].get("root") or self.name), self.name)

    def token_ids(self, prompt: Prompt) -> list[int]:
        """The prompt's ids as vLLM tokenizes it."""
        kind, value = prompt
        if kind == "tokens":
            return list(value)
        body: dict[str, Any] = {"model": self.name}
        body.update({"prompt": value} if kind == "text" else {"messages": value, "add_generation_prompt": False})
        tokens = self.api.decode(self._refusable("/tokenize", body), "/tokenize").get("tokens")
        if not isinstance(tokens, list):
            raise WarmError(f"{self.api.name}: /tokenize answered no tokens")
        return [int(t) for t in tokens]

    def complete(self, ids: list[int]) -> None:
        """Compute the prompt (and one output token): the connector stores its KV before vLLM answers."""
        body = {"model": self.name, "prompt": ids, "max_tokens": 1, "temperature": 0}
        self.api.decode(self._refusable("/v1/completions", body), "/v1/completions")

    def _refusable(self, path: str, body: dict[str, Any]) -> httpx.Response:
        response = self.api.call("POST", path, body)
        if response.status_code in REFUSED:
            raise Refused(_reason(response))
        return response


class CacheServer:
    """The kvtier server vLLM's connector stores into, asked through its admin API what is cached."""

    def __init__(self, api: Api, cache_names: tuple[str, ...]) -> None:
        self.api, self.cache_names = api, cache_names
        status = api.reply("GET", "/status")
        self.chunk_size = status.get("chunk_size")
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise WarmError(f"{api.name}: /status names no chunk size: is it a kvtier server's admin API?")
        self.namespace = self._engine(status)

    def find_engine(self) -> None:
        """Once vLLM has served a prompt, its connector has asked the server about it: the server lists it now."""
        self.namespace = self._engine(self.api.reply("GET", "/status"))
        if self.namespace is None:
            raise WarmError(f"vLLM answered, but its connector never asked {self.api.name} about "
                            f"{self.cache_names[0]}: is it configured with this server (server_url, chunk_size "
                            f"{self.chunk_size})?")  # fmt: skip

    def lookup(self, ids: list[int]) -> int:
        assert self.namespace is not None
        return int(self.api.reply("POST", "/lookup", {**self.namespace, "tokens": ids})["hit_tokens"])

    def _engine(self, status: dict[str, Any]) -> dict[str, Any] | None:
        """The namespace ``/lookup`` needs for vLLM's model, or None while the server has not seen it. Rank 0: the
        scheduler looks up rank 0's chunks."""
        engines = [e for e in status.get("engines", []) if isinstance(e, dict) and e.get("rank") == 0]
        for name in self.cache_names:
            found = [e for e in engines if e.get("model") == name]
            if len(found) > 1:
                layouts = ", ".join(str(e.get("layout")) for e in found)
                raise WarmError(
                    f"{self.api.name} holds {name} under several layouts ({layouts}): which one vLLM uses cannot "
                    "be told; drop --server-url / --admin-url to send every prompt"
                )
            if found:
                layout = found[0].get("layout_meta")
                if not isinstance(layout, dict):
                    raise WarmError(f"{self.api.name} lists no layout_meta for its engines: is it another version?")
                return {"model": name, "layout": layout, "world_size": found[0].get("world_size", 1), "rank": 0}
        return None


def run(args: argparse.Namespace, config: KVTierConfig, prompts: list[Prompt]) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request on the operator's terminal
    vllm_url, admin_url = _url(args.vllm, "--vllm"), _admin_url(args.admin_url, config)
    token = config.auth_token() if admin_url else None
    try:
        with contextlib.ExitStack() as stack:
            timeout = httpx.Timeout(REQUEST_TIMEOUT_SEC, connect=TIMEOUT_SEC)
            vllm_client = stack.enter_context(httpx.Client(base_url=vllm_url, timeout=timeout))
            vllm = VLLM(Api(vllm_client, f"vLLM at {vllm_url}"), args.model)
            server = None
            if admin_url:
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                admin = stack.enter_context(httpx.Client(base_url=admin_url, headers=headers, timeout=TIMEOUT_SEC))
                server = CacheServer(Api(admin, f"the kvtier server at {admin_url}"), vllm.cache_names)
            warmed, refusals = warm(vllm, server, prompts, args.concurrency)
    except WarmError as exc:
        print(f"kvtier warm: {exc}", file=sys.stderr)
        return 1
    return _report(warmed, refusals, server)


def _report(warmed: Warmed, refusals: list[Outcome], server: CacheServer | None) -> int:
    """Print the refusals and the summary; the exit status (1 if a prompt was refused, or none reached the server)."""
    for outcome in refusals:
        print(f"kvtier warm: prompt {outcome.n}: vLLM refused it: {outcome.reason}", file=sys.stderr)
    if server is None:
        refused = f"; {warmed.refused} refused by vLLM" if warmed.refused else ""
        print(f"sent {warmed.sent} prompts to vLLM{refused}; none skipped: no kvtier server to ask what is cached "
              "(--server-url or --admin-url)")  # fmt: skip
        return 1 if warmed.refused else 0
    print(summary(warmed, server.chunk_size))
    if warmed.sent and not warmed.stored_tokens:
        lost = f"vLLM computed {warmed.sent} prompts but none of their KV reached {server.api.name}"
        print(f"kvtier warm: {lost}: does its connector store into it (kv_role kv_both or kv_producer)?",
              file=sys.stderr)  # fmt: skip
        return 1
    return 1 if warmed.refused else 0


def warm(
    vllm: VLLM, server: CacheServer | None, prompts: list[Prompt], concurrency: int
) -> tuple[Warmed, list[Outcome]]:
    """Send each prompt not cached yet, ``concurrency`` at a time, with a progress line; the tally and the
    prompts vLLM refused."""
    done, refusals = Warmed(), []
    progress = Progress(len(prompts))

    def tally(outcome: Outcome) -> None:
        done.prompts += 1
        done.stored_tokens += outcome.stored_tokens
        if outcome.kind == "cached":
            done.cached += 1
        elif outcome.kind == "too_short":
            done.too_short += 1
        elif outcome.kind == "refused":
            done.refused += 1
            refusals.append(outcome)
        progress.advance()

    pending = list(enumerate(prompts, 1))
    try:
        # The server names the model's layout (which /lookup needs) only once the connector has asked it about a
        # prompt: on a server that has not seen the model, prompts go one at a time until one went through vLLM.
        while server is not None and server.namespace is None and pending:
            tally(_warm_one(vllm, server, *pending.pop(0)))
        with ThreadPoolExecutor(concurrency) as pool:
            futures = [pool.submit(_warm_one, vllm, server, n, prompt) for n, prompt in pending]
            try:
                for future in as_completed(futures):
                    tally(future.result())
            finally:
                for future in futures:  # after a WarmError, what has not started yet never will
                    future.cancel()
    finally:
        progress.close()
    return done, sorted(refusals, key=lambda o: o.n)


def _warm_one(vllm: VLLM, server: CacheServer | None, n: int, prompt: Prompt) -> Outcome:
    """Send prompt ``n`` unless the server has it up to its last full chunk; count what vLLM's store added."""
    try:
        ids = vllm.token_ids(prompt)
        before = 0
        if server is not None:
            cacheable = len(ids) - len(ids) % server.chunk_size
            if cacheable == 0:
                return Outcome(n, "too_short")
            if server.namespace is not None:
                before = server.lookup(ids)
                if before >= cacheable:
                    return Outcome(n, "cached")
        vllm.complete(ids)
    except Refused as exc:
        return Outcome(n, "refused", reason=str(exc))
    if server is None:
        return Outcome(n, "sent")
    if server.namespace is None:
        server.find_engine()
    return Outcome(n, "sent", stored_tokens=max(0, server.lookup(ids) - before))


def _url(text: str, flag: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise SystemExit(f"kvtier warm: {flag} {text!r}: expected http://HOST:PORT")
    # OpenAI clients are given vLLM's URL with /v1; the paths here carry it themselves.
    return text.rstrip("/").removesuffix("/v1")


def _admin_url(flag: str | None, config: KVTierConfig) -> str | None:
    """The kvtier server's admin API: ``--admin-url``, else the host of ``server_url`` at ``http_port``."""
    if flag:
        return _url(flag, "--admin-url")
    if not config.server_url:
        return None
    url = config.server_url if "://" in config.server_url else f"tcp://{config.server_url}"
    host = urlsplit(url).hostname or config.http_host
    return f"http://{f'[{host}]' if ':' in host else host}:{config.http_port}"


def _reason(response: httpx.Response) -> str:
    """The error message of a reply: vLLM's ``{"error": {"message"}}``, the admin API's ``{"error"}``, or the body."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict):
        error = error.get("message")
    return str(error or response.text[:300] or response.reason_phrase)
