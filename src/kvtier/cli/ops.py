"""Operator commands against a running ``kvtier server``'s admin API (LMCache's operator commands, kvtier's names):

- ``kvtier ping``: is it up, and how long does an answer take;
- ``kvtier status``: tiers (use, capacity, chunks), hit rate, clients, the models it serves;
- ``kvtier lookup``: how much of a prompt (token ids, or text with a tokenizer) is cached, and in which tier;
- ``kvtier explain``: each part of a prompt: the tier serving it, or why none does (the miss reasons);
- ``kvtier clear``: remove every chunk, or one tenant's.

``--url`` is the admin URL (default: ``http_host``:``http_port`` of the configuration); the bearer token is the
configuration's ``server_auth_token`` / ``server_auth_token_file``, as the server reads it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any

import httpx

from kvtier.config import KVTierConfig

TIMEOUT_SEC = 10.0


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--url", help="the server's admin URL (default: http://<http_host>:<http_port>)")
    parser.add_argument("--json", action="store_true", help="print the server's reply as JSON")
    if command in ("lookup", "explain"):
        parser.add_argument("--model", required=True, help="the model name the engine uses")
        parser.add_argument("--layout", required=True, metavar="L,H,D[,DTYPE]",
                            help="layers, KV heads, head dim and dtype of the model's KV (dtype: float16)")  # fmt: skip
        source = parser.add_mutually_exclusive_group(required=True)
        source.add_argument("--tokens", help="token ids, comma-separated, or @FILE holding a JSON list")
        source.add_argument("--text", help="a prompt to tokenize (needs --tokenizer)")
        parser.add_argument("--tokenizer", help="a transformers tokenizer directory, for --text")
        parser.add_argument("--cache-salt", default="", help="the tenant's salt")
    if command == "clear":
        parser.add_argument("--cache-salt", help="only this tenant's chunks")


def run(args: argparse.Namespace, config: KVTierConfig) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request on the operator's terminal
    url = (args.url or f"http://{config.http_host}:{config.http_port}").rstrip("/")
    token = config.auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=TIMEOUT_SEC) as client:
            return COMMANDS[args.command](client, args)
    except httpx.HTTPError as exc:
        print(f"kvtier {args.command}: {url}: {exc or type(exc).__name__}", file=sys.stderr)
        return 1


def _reply(response: httpx.Response, command: str) -> dict[str, Any] | None:
    """The JSON reply, or None after printing the server's error."""
    if response.status_code != 200:
        try:
            reason = response.json().get("error", response.text)
        except ValueError:
            reason = response.text
        print(f"kvtier {command}: {response.status_code}: {reason}", file=sys.stderr)
        return None
    return response.json()  # type: ignore[no-any-return]


def _ping(client: httpx.Client, args: argparse.Namespace) -> int:
    started = time.perf_counter()
    response = client.get("/healthcheck")
    elapsed_ms = (time.perf_counter() - started) * 1e3
    reply = _reply(response, "ping")
    if reply is None:
        return 1
    shown = f"{reply['status']} in {elapsed_ms:.1f} ms"
    print(json.dumps({**reply, "ms": round(elapsed_ms, 2)}) if args.json else shown)
    return 0


def _status(client: httpx.Client, args: argparse.Namespace) -> int:
    reply = _reply(client.get("/status"), "status")
    if reply is None:
        return 1
    if args.json:
        print(json.dumps(reply, indent=1))
        return 0
    metrics = reply["metrics"]
    asked, hit = metrics.get("kvtier_lookup_tokens_total", 0), metrics.get("kvtier_lookup_hit_tokens_total", 0)
    print(f"kvtier {reply['version']}, up {reply['uptime_sec']:.0f} s, chunk size {reply['chunk_size']}, "
          f"{int(reply['clients'])} clients")  # fmt: skip
    for name, tier in reply["tiers"].items():
        capacity = tier["capacity_bytes"]
        share = f" ({tier['used_bytes'] / capacity:.0%})" if capacity else ""
        print(f"  {name:10s} {tier['used_bytes'] / 2**20:10.1f} MiB of {capacity / 2**20:.1f}{share}, "
              f"{tier['chunks']} chunks")  # fmt: skip
    print(f"  lookup hit rate: {hit / asked:.1%} of {asked:.0f} tokens" if asked else "  no lookups yet")
    for engine in reply["engines"]:
        print(f"  serving {engine['model']} ({engine['layout']}, rank {engine['rank']} of {engine['world_size']})")
    return 0


def _ask_about_prompt(client: httpx.Client, args: argparse.Namespace, path: str) -> dict[str, Any] | int:
    """The server's reply about the prompt the arguments give, or the exit status once it is printed (``--json``)
    or refused."""
    body = {"model": args.model, "layout": _layout(args.layout), "tokens": _tokens(args), "cache_salt": args.cache_salt}
    reply = _reply(client.post(path, json=body), args.command)
    if reply is None:
        return 1
    if args.json:
        print(json.dumps(reply))
        return 0
    return reply


def _lookup(client: httpx.Client, args: argparse.Namespace) -> int:
    reply = _ask_about_prompt(client, args, "/lookup")
    if isinstance(reply, int):
        return reply
    tiers = ", ".join(f"{n} from {tier}" for tier, n in reply["tier_tokens"].items()) or "nothing cached"
    print(f"{reply['hit_tokens']} of {reply['total_tokens']} tokens cached ({tiers}; chunks of {reply['chunk_size']})")
    return 0


def _explain(client: httpx.Client, args: argparse.Namespace) -> int:
    reply = _ask_about_prompt(client, args, "/explain")
    if isinstance(reply, int):
        return reply
    print(f"{reply['hit_tokens']} of {reply['total_tokens']} tokens cached (chunks of {reply['chunk_size']})")
    for start, end, tier, reason, detail in _runs(reply["chunks"]):
        where = f"cached in {tier}" if reason is None else f"miss: {reason}" + (f" ({detail})" if detail else "")
        print(f"  tokens {start:>7}-{end:<7} {where}")
    return 0


def _runs(chunks: list[dict[str, Any]]) -> list[tuple[int, int, str | None, str | None, str]]:
    """Consecutive chunks with the same tier and reason as one range (the first chunk's detail)."""
    runs: list[tuple[int, int, str | None, str | None, str]] = []
    for c in chunks:
        if runs and runs[-1][2:4] == (c["tier"], c["reason"]) and runs[-1][1] == c["start"]:
            runs[-1] = (runs[-1][0], c["end"], *runs[-1][2:])
        else:
            runs.append((c["start"], c["end"], c["tier"], c["reason"], c["detail"]))
    return runs


def _clear(client: httpx.Client, args: argparse.Namespace) -> int:
    body = {"cache_salt": args.cache_salt} if args.cache_salt is not None else None
    reply = _reply(client.post("/clear", json=body), "clear")
    if reply is None:
        return 1
    print(json.dumps(reply) if args.json else f"cleared {reply['cleared_chunks']} chunks")
    return 0


COMMANDS = {"ping": _ping, "status": _status, "lookup": _lookup, "explain": _explain, "clear": _clear}
HELP = {
    "ping": "check that a server answers, and how fast",
    "status": "a server's tiers, capacity, hit rate, clients and models",
    "lookup": "how much of a prompt a server has cached, and where",
    "explain": "each part of a prompt: where a server has it cached, or why not",
    "clear": "remove every chunk from a server, or one tenant's",
}


def _layout(text: str) -> dict[str, Any]:
    parts = text.split(",")
    if len(parts) not in (3, 4) or not all(p.strip().isdigit() for p in parts[:3]):
        raise SystemExit(f"kvtier: --layout {text!r}: expected LAYERS,KV_HEADS,HEAD_DIM[,DTYPE]")
    layout: dict[str, Any] = dict(zip(("num_layers", "num_kv_heads", "head_dim"), map(int, parts[:3]), strict=False))
    if len(parts) == 4:
        layout["dtype"] = parts[3].strip()
    return layout


def _tokens(args: argparse.Namespace) -> list[int]:
    if args.text is not None:
        if not args.tokenizer:
            raise SystemExit(f"kvtier {args.command}: --text needs --tokenizer DIR")
        from transformers import AutoTokenizer

        return list(AutoTokenizer.from_pretrained(args.tokenizer)(args.text).input_ids)
    text = args.tokens
    try:
        if text.startswith("@"):
            with open(text[1:]) as f:
                tokens = json.load(f)
        else:
            tokens = [int(t) for t in text.split(",") if t.strip()]
    except (OSError, ValueError) as exc:
        raise SystemExit(f"kvtier {args.command}: --tokens: {exc}") from None
    if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
        raise SystemExit(f"kvtier {args.command}: --tokens must be a list of token ids")
    return tokens
