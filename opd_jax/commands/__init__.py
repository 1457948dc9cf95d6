"""The ``opd-jax`` command line: one module per command (``add_parser``, ``run``), shared flags in
:mod:`opd_jax.commands.flags`. The library never imports this package."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from opd_jax import __version__
from opd_jax.commands import demo, eval as evaluate, flags, plan, train, verify

# In the order `opd-jax --help` lists them.
COMMANDS = {"verify": verify, "train": train, "demo": demo, "eval": evaluate, "plan": plan}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opd-jax",
        description="On-policy distillation with f-divergences: stop-gradient OPD and the unbiased OPD+.",
    )
    parser.add_argument("--version", action="version", version=f"opd-jax {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS.values():
        command.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    flags.apply_config_file(parser, argv)  # --config's flag keys become those flags' defaults
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return COMMANDS[args.command].run(args)

