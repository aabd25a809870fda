"""The ``attnlab`` command.

Each feature module that has a subcommand defines ``add_cli(subparsers)``, which adds its
parser and sets ``func`` (called with the parsed args; returns an exit code). This file
only lists those modules, so adding a command touches one line here.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# module path -> the subcommands it registers (listed so `--help` works even if one fails to import)
COMMAND_MODULES: list[str] = [
    "attnlab.generate",  # generate
    "attnlab.cli_models",  # presets, convert
    "attnlab.cost",  # cost
    "attnlab.train",  # train
    "attnlab.evaluate",  # eval
    "attnlab.diagnostics",  # diagnose
    "attnlab.compare",  # compare
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnlab",
        description="Efficient attention: tested ops, hybrid models, and a lab measuring cost and recall.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"attnlab {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
