"""How a command of the command line is declared: name, help, arguments and handler, as data.

Every command (training or not) is a :class:`CliCommand`; ``apps/cli.py`` builds the parser from the list of them,
so adding one is one declaration beside its handler.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Arg:
    flags: tuple[str, ...]
    options: dict  # argparse's keyword arguments


def arg(*flags: str, **options) -> Arg:
    return Arg(flags, options)


@dataclass(frozen=True)
class CliCommand:
    name: str
    help: str
    handler: Callable[[argparse.Namespace], int | None] | None = None  # None: a group of subcommands
    args: tuple[Arg, ...] = ()
    description: str | None = None
    epilog: Callable[[], str] | None = None  # built with the parser
    raw: bool = False  # description and epilog keep their line breaks
    subcommands: tuple[CliCommand, ...] = ()

    def add_to(self, subparsers) -> None:
        formatter = argparse.RawDescriptionHelpFormatter if self.raw else argparse.HelpFormatter
        parser = subparsers.add_parser(self.name, help=self.help, description=self.description,
                                       epilog=self.epilog() if self.epilog else None, formatter_class=formatter)
        for argument in self.args:
            parser.add_argument(*argument.flags, **argument.options)
        if self.subcommands:
            tools = parser.add_subparsers(dest="tool", required=True, metavar="TOOL")
            for sub in self.subcommands:
                sub.add_to(tools)
        else:
            parser.set_defaults(handler=self.handler)
