"""`bsldm-fast`: the command line. It parses arguments and calls the library; no logic lives here.

Each subcommand is a module of this package with `add_parser(subparsers)`, which registers the
subcommand and sets `func`, the function that runs it and returns the exit code.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .. import __version__
from . import build_engine, convert, eval, export, formats, serve, suppress, tune

COMMANDS = (suppress, convert, eval, export, build_engine, formats, serve, tune)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bsldm-fast",
        description="Fast BS-LDM bone suppression for chest X-rays (Sun et al., IEEE JBHI 2025).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)
