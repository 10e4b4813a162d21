"""The argument parser of every command line in the package: a usage error is one line and exit status 2."""
from __future__ import annotations

import argparse


class Parser(argparse.ArgumentParser):
    """argparse's parser, but an error prints `<prog>: error: <message>` alone, not the usage block above it.

    Subparsers made by `add_subparsers` are of the same class, so every
    subcommand answers the same way.
    """

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the options)\n")

