"""``soda-nvs``: the command-line entry point.

Each subcommand lives in its own module under ``soda_diffusers/commands/`` and defines
``register(subparsers)``, which adds its parser and sets ``func`` (called with the parsed args).
Adding a command means adding a module: this file never changes.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from soda_diffusers import commands
from soda_diffusers.threads import set_wait_policy


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="soda-nvs", description="SODA novel view synthesis with Diffusers.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{module_info.name}")
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    set_wait_policy()  # before the commands' modules load torch
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError) as error:
        # Bad input is reported in one line naming the problem, not as a traceback.
        print(f"soda-nvs {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
