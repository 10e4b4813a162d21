"""`loft groups`: the filter groups of a zoo model, and why every other conv/linear is not one.

Prints what `lk.explain_groups` finds on the model built for --dataset (its
input shape and class count), marks the groups that --policy/--include/--exclude
select for LoFT, and with --json writes the same as data.
"""
from __future__ import annotations

import argparse
import json

import torch

from ..io import atomic_write_text
from ..training import explain_groups, select_groups
from ..training.discovery import TRACERS
from . import _common as U

HELP = "list a model's filter groups (what LoFT partitions and prunes) and why the other layers are not groups"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("groups", help=HELP, description=HELP + ".\n\n" + __doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    U.add_data_model(p)
    p.add_argument("--tracer", default="auto", choices=TRACERS,
                   help="auto: torch.fx, or the autograd graph of one forward when fx cannot trace (default)")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the groups and reasons to FILE")
    p.add_argument("--seed", type=U.seed_arg, default=0, help="random seed of the model's initial weights")
    return p


def run(args) -> int:
    if args.json:
        U.check_output_file(args.json, "--json")
    dataset = U.load_dataset(args)
    spec = U.make_spec(args, dataset)  # checks --model/--width/--policy/--include/--exclude
    torch.manual_seed(args.seed)
    from ..models import get_model
    model = get_model(spec["model"], **spec["kwargs"])
    report = explain_groups(model, torch.zeros(2, *spec["input_shape"]), tracer=args.tracer)
    chosen = {g.name for g in select_groups(report.groups, spec["policy"], spec["include"], spec["exclude"])}
    print(report)
    print(f"selected by --policy {spec['policy']}"
          + (f" --include {args.include}" if args.include else "") + (f" --exclude {args.exclude}" if args.exclude
                                                                        else "")
          + f": {len(chosen)} of {len(report.groups)} group(s): {', '.join(sorted(chosen)) or '-'}")
    if args.json:
        data = {"model": spec["model"], "kwargs": spec["kwargs"], "tracer": report.tracer,
                "groups": [dict(g.to_dict(), selected=g.name in chosen) for g in report.groups],
                "not_groups": report.reasons}
        try:
            atomic_write_text(json.dumps(data, indent=2) + "\n", args.json)
        except OSError as e:
            raise U.CLIError(f"--json: cannot write {args.json!r} ({e.strerror or e})") from None
    return 0
