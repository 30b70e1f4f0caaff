"""``kvtier proxy``: the prefill/decode disaggregation proxy (:mod:`kvtier.integrations.vllm.proxy`) in front of
vLLM OpenAI servers: prefillers with kvtier's connector as ``kv_producer``, decoders as ``kv_consumer``, both on
the same kvtier server (``docs/disaggregation.md``).

    kvtier proxy --prefiller http://127.0.0.1:8100 --decoder http://127.0.0.1:8200 --port 8000
"""

from __future__ import annotations

import argparse
import logging
from urllib.parse import urlsplit

DEFAULT_PREFILL_TIMEOUT_SEC = 30.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prefiller", action="append", required=True, type=instance_url, metavar="URL",
                        help="a prefiller's OpenAI API (vLLM, kv_role kv_producer); repeat for several")  # fmt: skip
    parser.add_argument("--decoder", action="append", required=True, type=instance_url, metavar="URL",
                        help="a decoder's OpenAI API (vLLM, kv_role kv_consumer); repeat for several")  # fmt: skip
    parser.add_argument("--port", type=int, required=True, help="the port the proxy listens on")
    parser.add_argument("--host", default="127.0.0.1", help="the address it listens on (default: 127.0.0.1)")
    parser.add_argument("--prefill-timeout", type=float, default=DEFAULT_PREFILL_TIMEOUT_SEC, metavar="SEC",
                        help="a prefill taking longer is skipped: the decoder computes the prompt "
                        f"(default: {DEFAULT_PREFILL_TIMEOUT_SEC:g})")  # fmt: skip


def instance_url(text: str) -> str:
    """An argparse type: an ``http://`` or ``https://`` URL with a host, without a trailing slash."""
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"expected http://HOST:PORT, got {text!r}")
    return text.rstrip("/")


def run(args: argparse.Namespace) -> int:
    # Imported here, not with the parser: FastAPI and uvicorn would slow down every other kvtier command's start.
    import uvicorn

    from kvtier.integrations.vllm.proxy import Proxy, server_config

    if args.prefill_timeout <= 0:
        raise SystemExit("kvtier proxy: --prefill-timeout must be positive")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # its line per upstream call; the proxy logs its own
    proxy = Proxy(args.prefiller, args.decoder, args.prefill_timeout)
    logging.getLogger("kvtier.proxy").info(
        "kvtier proxy on http://%s:%d: prefillers %s, decoders %s",
        args.host, args.port, ", ".join(args.prefiller), ", ".join(args.decoder),
    )  # fmt: skip
    uvicorn.Server(server_config(proxy, args.host, args.port)).run()
    return 0
