"""``kvtier warm --prompts FILE``: compute and store the KV of common prompts before traffic arrives.

Two ways. By default the prompts run through the model with transformers (``--model DIR``, default the local
SmolLM2) into the cache the configuration names: a ``kvtier server`` (``--server-url``), or an engine's own disk or
remote tier (memory alone would be gone when the command exits, so that is refused). With ``--vllm URL`` they are
sent to a running vLLM whose kvtier connector stores them (:mod:`kvtier.cli.warm_vllm`). A prompt already cached
up to its last full chunk is skipped, so running the command again does only what is missing. The file is JSON
Lines, one prompt a line: ``{"text": ...}``, ``{"messages": [...]}`` (through the tokenizer's chat template),
``{"tokens": [...]}`` or a JSON string.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from kvtier.cli.demo import with_server_chunk_size
from kvtier.cli.model import load_model, positive
from kvtier.config import KVTierConfig

#: One line's prompt: ("text", str), ("messages", list of chat messages) or ("tokens", list of token ids).
Prompt = tuple[str, Any]


@dataclasses.dataclass
class Warmed:
    prompts: int = 0
    cached: int = 0  # already cached up to their last full chunk
    too_short: int = 0  # shorter than one chunk: nothing of them can be cached
    refused: int = 0  # refused by vLLM (too long for it, a chat its template rejects)
    stored_tokens: int = 0

    @property
    def sent(self) -> int:
        """Prompts computed (by the model here, or by vLLM)."""
        return self.prompts - self.cached - self.too_short - self.refused


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", required=True, type=Path, help="JSON Lines: text, messages or tokens per line")
    parser.add_argument("--model", help="a transformers model directory (default: the local SmolLM2); with --vllm, "
                        "the served model name (default: the one vLLM serves)")  # fmt: skip
    parser.add_argument("--dtype", help="the dtype to run the model in, its KV's dtype (default: float32; not with "
                        "--vllm, which runs the model in its own)")  # fmt: skip
    vllm = parser.add_argument_group("sending the prompts to a running vLLM with kvtier's connector")
    vllm.add_argument("--vllm", metavar="URL", help="vLLM's OpenAI API server, e.g. http://127.0.0.1:8000")
    vllm.add_argument("--concurrency", type=positive, default=4, help="requests in flight at once (default: 4)")
    vllm.add_argument("--admin-url", metavar="URL", help="the admin API of the kvtier server vLLM's connector uses, "
                      "asked what is cached (default with --server-url: http://<its host>:<http_port>)")  # fmt: skip


def run(args: argparse.Namespace, config: KVTierConfig) -> int:
    prompts = [prompt_of(item, n) for n, item in enumerate(_read(args.prompts), 1)]
    if args.vllm:
        if args.dtype:
            raise SystemExit("kvtier warm: --dtype is for the model run here; vLLM runs its model in its own dtype")
        from kvtier.cli import warm_vllm

        return warm_vllm.run(args, config, prompts)
    if args.admin_url:
        raise SystemExit("kvtier warm: --admin-url is for --vllm (here --server-url names the server)")
    if not (config.server_url or config.local_disk or config.remote_url):
        print("kvtier warm: nothing would outlive this command: set --server-url, --local-disk or --remote-url, "
              "or send the prompts to vLLM with --vllm URL", file=sys.stderr)  # fmt: skip
        return 2
    from kvtier.integrations.transformers import CachedCausalLM

    model, tokenizer = load_model(args.model, args.dtype or "float32", "warm")
    config = with_server_chunk_size(config, "warm")
    with CachedCausalLM(model, config=config, tokenizer=tokenizer) as lm:
        warmed = warm(lm, [_token_ids(tokenizer, prompt) for prompt in prompts])
        if hasattr(lm.backend, "engine"):
            lm.backend.engine.flush(None)  # an engine's own slower tiers are written in the background
    print(summary(warmed, config.chunk_size))
    return 0


def warm(lm: Any, prompts: list[list[int]]) -> Warmed:
    """Prefill each prompt not yet cached up to its last full chunk, with a progress line on stderr."""
    done = Warmed()
    progress = Progress(len(prompts))
    for ids in prompts:
        _prefill_missing(lm, ids, done)
        progress.advance()
    progress.close()
    return done


def _prefill_missing(lm: Any, ids: list[int], done: Warmed) -> None:
    done.prompts += 1
    cacheable = len(ids) - len(ids) % lm.config.chunk_size
    if cacheable == 0:
        done.too_short += 1
        return
    cached = lm.backend.lookup(ids)
    if cached >= cacheable:
        done.cached += 1
        return
    lm.prefill(ids)
    done.stored_tokens += cacheable - cached


def summary(warmed: Warmed, chunk_size: int) -> str:
    """The closing line both ways print: what was stored, skipped and refused."""
    short = f"; {warmed.too_short} shorter than a chunk ({chunk_size} tokens)" if warmed.too_short else ""
    refused = f"; {warmed.refused} refused by vLLM" if warmed.refused else ""
    return (f"warmed {warmed.sent} prompts ({warmed.stored_tokens} tokens stored); {warmed.cached} were cached "
            f"already{short}{refused}")  # fmt: skip


class Progress:
    """``kvtier warm: 12/40 prompts`` on stderr: rewritten in place on a terminal, one line at the end otherwise
    (a log file wants no redrawn bar, and no progress library is among kvtier's dependencies)."""

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.total, self.done = total, 0
        self.stream = stream or sys.stderr  # looked up now: tests and callers may have replaced sys.stderr
        self.live = self.stream.isatty()
        if self.live:
            self._show()

    def advance(self) -> None:
        self.done += 1
        if self.live:
            self._show()

    def close(self) -> None:
        if not self.live:
            self._show()
        self.stream.write("\n")
        self.stream.flush()

    def _show(self) -> None:
        back = "\r" if self.live else ""
        self.stream.write(f"{back}kvtier warm: {self.done}/{self.total} prompts")
        self.stream.flush()


def _read(path: Path) -> list[Any]:
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise SystemExit(f"kvtier warm: --prompts {path}: {exc}") from None
    items = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                items.append(json.loads(line))
            except ValueError as exc:
                raise SystemExit(f"kvtier warm: {path} line {n}: not JSON ({exc})") from None
    return items


def prompt_of(item: Any, n: int) -> Prompt:
    """Prompt ``n`` of the file: a string or ``{"text"}``, ``{"messages"}`` or ``{"tokens"}``."""
    if isinstance(item, str):
        return "text", item
    if isinstance(item, dict) and isinstance(item.get("text"), str):
        return "text", item["text"]
    if isinstance(item, dict) and isinstance(item.get("messages"), list):
        return "messages", item["messages"]
    tokens = item.get("tokens") if isinstance(item, dict) else None
    if isinstance(tokens, list) and tokens and all(isinstance(t, int) and 0 <= t < 2**32 for t in tokens):
        return "tokens", tokens
    raise SystemExit(f"kvtier warm: prompt {n}: expected a string, or an object with text, messages or tokens")


def _token_ids(tokenizer: Any, prompt: Prompt) -> list[int]:
    """A prompt's token ids through the tokenizer (chat messages through its template, no generation prompt)."""
    kind, value = prompt
    if kind == "text":
        return list(tokenizer(value).input_ids)
    if kind == "messages":
        return list(tokenizer.apply_chat_template(value, tokenize=True, return_dict=False))
    return list(value)
