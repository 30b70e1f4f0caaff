"""Text to token ids for the admin API's explain (the dashboard's "paste a prompt" box).

The cache works on token ids; a person has text. The server tokenizes with the model's own ``tokenizer.json``
(the ``tokenizers`` library, without transformers) when the engine's model name is a local model directory, which
is how vLLM and kvtier's own commands name local models. Otherwise the caller must send token ids.
"""

from __future__ import annotations

import threading
from functools import lru_cache
from pathlib import Path
from typing import Any

from kvtier.protocol import ProtocolError

_lock = threading.Lock()


def tokenize(model: str, text: str) -> list[int]:
    """The token ids of ``text`` as the model's tokenizer encodes a prompt; ProtocolError if there is none here."""
    with _lock:  # one tokenizer object per model, loaded once
        tokenizer = _tokenizer(model)
    return list(tokenizer.encode(text).ids)


@lru_cache(maxsize=8)
def _tokenizer(model: str) -> Any:
    path = Path(model) / "tokenizer.json"
    if not path.is_file():
        raise ProtocolError(f"no tokenizer for model {model!r} on this server (not a model directory): send tokens")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ProtocolError("the tokenizers package is not installed on this server: send tokens") from None
    return Tokenizer.from_file(str(path))
