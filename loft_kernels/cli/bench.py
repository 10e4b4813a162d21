"""`loft bench`: the ratio benchmark runner of loft_kernels.benchmarks (its own options; see `loft bench --help`)."""
from __future__ import annotations

import argparse
import importlib

from ._common import CLIError

HELP = "run the ratio benchmarks (arguments go to loft_kernels.benchmarks.runner; try `loft bench --help`)"


def add_parser(sub) -> argparse.ArgumentParser:
    # No options of our own: everything after `bench`, --help included, belongs to the runner.
    p = sub.add_parser("bench", help=HELP, add_help=False, description=HELP)
    p.add_argument("argv", nargs=argparse.REMAINDER)
    return p


def run(args) -> int:
    try:
        runner = importlib.import_module("loft_kernels.benchmarks.runner")
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("loft_kernels.benchmarks"):
            raise CLIError("the benchmark runner (loft_kernels.benchmarks.runner) is not installed in this "
                           "version of loft_kernels") from None
        raise
    return int(runner.main(list(args.argv)) or 0)
