"""The `loft` command line (also `python -m loft_kernels`).

Subcommands: pretrain, prune, finetune, distance, groups, run (the main job), bench.
`loft <subcommand> --help` documents each. User errors (bad values, missing
or unreadable files, unknown names, an unusable --out) print one
`loft <subcommand>: error: ...` line and exit with status 2, before anything
is written to --out where they can be found up front; so does a training whose
settings made it diverge. Everything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import sys

from .._argparse import Parser
from .._optional import missing_message
from ..io import CheckpointError
from ..tickets.tracker import TrainingDiverged
from ._common import CLIError

_COMMANDS = ("pretrain", "prune", "finetune", "distance", "groups", "run", "bench")


def _module(name: str):
    # Import on demand: `loft bench` should not pay for the training stack and vice versa.
    import importlib
    return importlib.import_module(f"{__name__}.{'run_job' if name == 'run' else name}")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="loft", description="LoFT: find lottery tickets through filter-wise training.",
        epilog="Start with `loft run` (the main job on the embedded digits dataset); `loft run --quick` is a "
               "two-minute version.")
    sub = p.add_subparsers(dest="command", metavar="{" + ",".join(_COMMANDS) + "}")
    sub.required = True
    for name in _COMMANDS:
        _module(name).add_parser(sub)
    return p


def _parse_and_run(argv: list[str]) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)  # argparse exits 2 on bad types and values
    if unknown:  # named by the subcommand that was given them, not by `loft`
        subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
        subcommands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    return _module(args.command).run(args)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        # Everything after `bench` (--help included) belongs to the benchmark runner.
        command, run = "bench", (lambda: _module("bench").run(argparse.Namespace(argv=argv[1:])))
    else:
        command, run = (argv[0] if argv else "loft"), (lambda: _parse_and_run(argv))
    try:
        return int(run() or 0)
    except (CLIError, CheckpointError, TrainingDiverged) as e:  # user input (options, files), or settings that
        # made the training diverge
        print(f"loft {command}: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:  # an optional dependency (plots, digits) that is not installed
        hint = missing_message(e.name or "")
        if hint is None:
            raise
        print(f"loft {command}: error: {hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"loft {command}: interrupted", file=sys.stderr)
        return 130
