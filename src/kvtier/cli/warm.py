"""``kvtier warm --prompts FILE``: compute and store the KV of common prompts before traffic arrives.

The prompts run through the model with transformers (``--model DIR``, default the local SmolLM2) into the cache the
configuration names: a ``kvtier server`` (``--server-url``), or an engine's own disk or remote tier (memory alone
would be gone when the command exits, so that is refused). A prompt already cached up to its last full chunk is
skipped, so running the command again does only what is missing. The file is JSON Lines, one prompt a line:
``{"text": ...}``, ``{"messages": [...]}`` (through the tokenizer's chat template), ``{"tokens": [...]}`` or a JSON
string.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from kvtier.cli.demo import with_server_chunk_size
from kvtier.cli.model import load_model
from kvtier.config import KVTierConfig


@dataclasses.dataclass
class Warmed:
    prompts: int = 0
    cached: int = 0  # already cached up to their last full chunk
    too_short: int = 0  # shorter than one chunk: nothing of them can be cached
    stored_tokens: int = 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", required=True, type=Path, help="JSON Lines: text, messages or tokens per line")
    parser.add_argument("--model", help="a transformers model directory (default: the local SmolLM2)")
    parser.add_argument("--dtype", default="float32", help="the dtype to run the model in (its KV's dtype)")


def run(args: argparse.Namespace, config: KVTierConfig) -> int:
    if not (config.server_url or config.local_disk or config.remote_url):
        print("kvtier warm: nothing would outlive this command: set --server-url, --local-disk or --remote-url",
              file=sys.stderr)  # fmt: skip
        return 2
    from kvtier.integrations.transformers import CachedCausalLM

    items = _read(args.prompts)
    model, tokenizer = load_model(args.model, args.dtype, "warm")
    prompts = [_token_ids(tokenizer, item, n) for n, item in enumerate(items, 1)]
    config = with_server_chunk_size(config, "warm")
    with CachedCausalLM(model, config=config, tokenizer=tokenizer) as lm:
        warmed = warm(lm, prompts)
        if hasattr(lm.backend, "engine"):
            lm.backend.engine.flush(None)  # an engine's own slower tiers are written in the background
    short = f"; {warmed.too_short} shorter than a chunk ({config.chunk_size} tokens)" if warmed.too_short else ""
    print(f"warmed {warmed.prompts - warmed.cached - warmed.too_short} prompts ({warmed.stored_tokens} tokens "
          f"stored); {warmed.cached} were cached already{short}")  # fmt: skip
    return 0


def warm(lm: Any, prompts: list[list[int]]) -> Warmed:
    """Prefill each prompt not yet cached up to its last full chunk; a progress bar on stderr."""
    from tqdm import tqdm

    done = Warmed()
    chunk = lm.config.chunk_size
    for ids in tqdm(prompts, desc="kvtier warm", unit="prompt", file=sys.stderr):
        done.prompts += 1
        cacheable = len(ids) - len(ids) % chunk
        if cacheable == 0:
            done.too_short += 1
            continue
        cached = lm.backend.lookup(ids)
        if cached >= cacheable:
            done.cached += 1
            continue
        lm.prefill(ids)
        done.stored_tokens += cacheable - cached
    return done


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


def _token_ids(tokenizer: Any, item: Any, n: int) -> list[int]:
    """One prompt's token ids: a string or ``{"text"}``, ``{"messages"}`` (chat template) or ``{"tokens"}``."""
    if isinstance(item, str):
        item = {"text": item}
    if isinstance(item, dict) and isinstance(item.get("text"), str):
        return list(tokenizer(item["text"]).input_ids)
    if isinstance(item, dict) and isinstance(item.get("messages"), list):
        return list(tokenizer.apply_chat_template(item["messages"], tokenize=True, return_dict=False))
    tokens = item.get("tokens") if isinstance(item, dict) else None
    if isinstance(tokens, list) and tokens and all(isinstance(t, int) and 0 <= t < 2**32 for t in tokens):
        return tokens
    raise SystemExit(f"kvtier warm: prompt {n}: expected a string, or an object with text, messages or tokens")
