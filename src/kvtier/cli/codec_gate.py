"""``kvtier codec-gate --model DIR --codec NAME``: measure a lossy codec on a model and record the result, which
lets engines of that model use the codec (``kvtier.codecs.gate``)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from kvtier.cli.model import load_model, positive
from kvtier.codecs.gate import BOUND, gate_file, save_record
from kvtier.config import KVTierConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="a transformers model directory (default: the local SmolLM2)")
    parser.add_argument("--model-name", help="the name engines use for it (default: the directory's model name)")
    parser.add_argument("--codec", required=True, help="the codec to measure (int8, int4, ...)")
    parser.add_argument("--dtype", default="bfloat16", help="the dtype to run the model (and hold its KV) in")
    parser.add_argument("--prompts", type=positive, default=6)
    parser.add_argument("--new-tokens", type=positive, default=24)


def run(args: argparse.Namespace, config: KVTierConfig) -> int:
    from kvtier.quality.codec_gate import measure

    model, tokenizer = load_model(args.model, args.dtype, "codec-gate")
    name = args.model_name or model.config._name_or_path
    record = measure(model, tokenizer, args.codec, name, prompts=args.prompts, new_tokens=args.new_tokens)
    save_record(gate_file(config), record)
    print(json.dumps({**asdict(record), "passed": record.passed, "bound": asdict(BOUND)}, indent=1))
    return 0 if record.passed else 1
