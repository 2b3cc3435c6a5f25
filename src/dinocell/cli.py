"""``dinocell`` command line: each subcommand parses its arguments and calls one library function.

Subcommands live next to the code they drive (``dinocell.<pkg>.cli.register``) so that this file stays
a thin dispatcher.  User errors print one line and exit with status 2; nothing heavy (torch, timm) is
imported until a subcommand runs, so ``dinocell --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from dinocell.errors import UserError

COMMAND_MODULES = (
    "dinocell.data.cli",
    "dinocell.train.cli",
    "dinocell.evaluate.cli",
    "dinocell.extract.cli",
    "dinocell.segment.cli",
)


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line with exit code 2 (no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The full parser with every registered subcommand."""
    from dinocell import __version__

    parser = _Parser(prog="dinocell", description="DINOv3 for fluorescence microscopy (Cell Painting).")
    parser.add_argument("--version", action="version", version=f"dinocell {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (callable from tests)."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"dinocell: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dinocell: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
