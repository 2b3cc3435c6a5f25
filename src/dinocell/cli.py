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
import time
import warnings
from collections.abc import Sequence

from dinocell.errors import UserError
from dinocell.paths import DiskFullError, is_disk_full, remove_temp_files

COMMAND_MODULES = (
    "dinocell.data.cli",
    "dinocell.train.cli",
    "dinocell.evaluate.cli",
    "dinocell.extract.cli",
    "dinocell.segment.cli",
)


#: Third-party deprecation notices a dinocell user can do nothing about, as (message regex, category).
#: Targeted by message, so every other warning (ours, or a library's about the user's data) still shows.
THIRD_PARTY_NOISE: tuple[tuple[str, type[Warning]], ...] = (
    # Lightning's own pytree helper instantiates torch's deprecated LeafSpec on every fit
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
)


def silence_third_party_noise() -> None:
    """Install the :data:`THIRD_PARTY_NOISE` filters (at the CLI entry, never on import of the library)."""
    for message, category in THIRD_PARTY_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)


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
    silence_third_party_noise()
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    start = time.time()
    try:
        _check_positive(args)
        if args.command in ACTION_DESTS and getattr(args, ACTION_DESTS[args.command], None) is None:
            # `dinocell segment` alone is a usage error: usage on stderr, exit 2 (not help on stdout)
            print(f"{_subparser(parser, args.command).format_usage().rstrip()}\n"
                  f"dinocell {args.command}: error: choose an ACTION", file=sys.stderr)
            return 2
        if args.command in STRICT_CHANNEL_MAP_COMMANDS:
            from dinocell.data.channels import refuse_assumed_channel_map

            with refuse_assumed_channel_map(args.command):
                return int(args.func(args) or 0)
        return int(args.func(args) or 0)
    except DiskFullError as e:
        _clean_after_disk_full(args, start)
        print(f"dinocell: error: {e}", file=sys.stderr)
        return 2
    except UserError as e:
        print(f"dinocell: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a writer we do not wrap (torch.save, safetensors, pyarrow) hit a full disk
        if not is_disk_full(e):
            raise
        _clean_after_disk_full(args, start)
        where = getattr(e, "filename", None)
        reason = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
        print(f"dinocell: error: no space left on the disk{f' to write {where}' if where else ''} "
              f"({reason}); free some space or write elsewhere (earlier complete files are untouched)",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dinocell: interrupted", file=sys.stderr)
        return 130


#: Numeric options that only make sense above zero, whichever command has them (argparse destinations).
POSITIVE_OPTIONS = ("batch_size", "chunk_size", "fields", "limit", "max_steps", "n", "null_size", "plates", "size",
                    "tile", "steps_per_s")


def _check_positive(args: argparse.Namespace) -> None:
    """``--limit 0``, ``--fields -1``, ``--batch-size 0``... are one line, before anything runs (they used to
    run on empty input, loop forever or fail deep inside with a traceback)."""
    for dest in POSITIVE_OPTIONS:
        v = getattr(args, dest, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not v > 0:
            raise UserError(f"--{dest.replace('_', '-')} must be greater than 0, got {v}")


#: Commands whose outputs carry channel names for good: an assumed channel map is refused there.
STRICT_CHANNEL_MAP_COMMANDS = frozenset({"pretrain", "embed", "extract-fields", "segment"})
#: Commands made of actions, and the argparse destination of their action.
ACTION_DESTS = {"data": "data_command", "segment": "segment_command"}


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and name in action.choices:
            return action.choices[name]
    return parser


#: argparse destinations that name a command's output (folder or file).
OUTPUT_ARGS = ("output_dir", "out", "out_dir")


def _clean_after_disk_full(args: argparse.Namespace, start: float) -> None:
    """Remove the ``*.tmp`` files this command wrote into its outputs before the disk filled."""
    outputs = [v for k in OUTPUT_ARGS if isinstance(v := getattr(args, k, None), str)]
    for f in remove_temp_files(outputs, start):
        logging.getLogger("dinocell").info("removed the partial file %s", f)


if __name__ == "__main__":
    sys.exit(main())
