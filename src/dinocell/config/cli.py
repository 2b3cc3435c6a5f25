"""Command-line glue shared by every subcommand: ``--config FILE`` plus ``key=value`` overrides anywhere
on the line.  Flags that map onto a schema's keys (``extract-volumes``, ``embed``) carry no argparse
default: a flag not given keeps its dataclass default, so every default is written once.
"""

from __future__ import annotations

from typing import Any

from dinocell.config.engine import load
from dinocell.config.schema import Config


def allow_intermixed(parser: Any) -> Any:
    """Let ``key=value`` overrides come before and after options (``--config x a=b --max-steps 3 c=d``).

    Plain argparse stops filling positionals once an option follows them; intermixed parsing does not.
    The subparser's class is swapped for a subclass, so the top-level parser is unchanged.
    """
    base = type(parser)

    class Intermixed(base):  # type: ignore[misc, valid-type]
        _inside = False

        def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
            if self._inside:  # parse_known_intermixed_args calls parse_known_args itself
                return super().parse_known_args(args, namespace)
            self._inside = True
            try:
                return self.parse_known_intermixed_args(args, namespace)
            finally:
                self._inside = False

    parser.__class__ = Intermixed
    return parser


def add_config_arguments(parser: Any) -> None:
    """``--config FILE`` and ``key=value`` overrides (anywhere on the line), shared by every subcommand."""
    parser.add_argument("--config", default=None, help="experiment YAML (defaults when omitted)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. optim.lr=1e-4 data.channels=[DNA,RNA]")
    allow_intermixed(parser)


def config_from_args(args: Any, extra: list[str] | None = None) -> Config:
    """Build the config from parsed ``--config``/overrides (plus overrides the command adds)."""
    return load(Config, args.config, list(args.overrides or []) + list(extra or []))
