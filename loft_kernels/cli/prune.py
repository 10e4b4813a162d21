"""`loft prune`: draw the ticket from a pretrained model (top filters by L2 norm) and cut the rest out.

Writes to --out: config.json; ticket.pt (the pruned model's weights with
the kept filter indices, for `loft finetune`); metrics.json/metrics.csv
(parameters and FLOPs before and after, measured inference speedup).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .. import engine
from ..io import CheckpointError
from ..ops import pruned_count
from ..tickets import draw
from . import _common as U

HELP = "draw a ticket: keep the top (1 - ratio) filters of each group by L2 norm, physically remove the rest"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("prune", help=HELP, description=HELP + ".\n\n" + __doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="pretrained model: a `loft pretrain` output directory (its model.pt) or a model file "
                        "(model.pt, epoch_<eee>.pt, init.pt)")
    p.add_argument("--ratio", type=U.finite_float, default=0.5, help="pruning ratio in [0, 1) (default: %(default)s)")
    p.add_argument("--speed-repeats", type=int, default=20,
                   help="repetitions of the inference-speedup measurement; 0 skips it (default: %(default)s)")
    U.add_common(p)
    return p


def model_file(path: str, what: str, default_name: str) -> Path:
    """A model file, or the `default_name` inside a directory; a clear CLIError if missing."""
    p = Path(path)
    if p.is_dir():
        p = p / default_name
    if not p.is_file():
        raise U.CLIError(f"{what}: {str(p)!r} does not exist")
    return p


def run(args) -> int:
    ratio = U.check_ratio(args.ratio, "--ratio")
    U.check_non_negative(args.speed_repeats, "--speed-repeats")
    src = model_file(args.checkpoint, "--checkpoint", "model.pt")
    out_text = args.out or U.default_out("prune")
    U.check_out_free(out_text, resumable=False)
    device = U.resolve_device(args.device)
    try:
        obj = engine.load_model_file(src, "--checkpoint")
        model, groups = engine.full_model(obj, f"--checkpoint {str(src)!r}")
    except (CheckpointError, FileNotFoundError) as e:
        raise U.CLIError(str(e)) from None
    too_small = [g.name for g in groups if g.n - pruned_count(g.n, ratio) < 1]
    if too_small:
        raise U.CLIError(f"--ratio {ratio:g} would remove every filter of group(s) {too_small}")
    model = model.to(device)
    example = torch.randn(8, *obj["spec"]["input_shape"], device=device)
    pruned, kept, metrics = draw(model, groups, ratio, example, speed_repeats=args.speed_repeats)
    out = U.prepare_out(out_text, resumable=False)
    U.write_config(out, {"command": "prune", "checkpoint": str(src), "ratio": ratio, "seed": args.seed,
                         "device": str(device), "speed_repeats": args.speed_repeats})
    engine.save_model(out / "ticket.pt", pruned, obj["spec"], groups, kept=kept, ratio=ratio, source=str(src))
    engine.write_metrics(out, [metrics])
    if not args.quiet:
        print(f"ticket at ratio {ratio:g}: params {metrics['params_before']} -> {metrics['params_after']}, "
              f"FLOPs {metrics['flops_before']} -> {metrics['flops_after']}"
              + (f", inference speedup {metrics['inference_speedup']:.2f}x (measured, noisy)"
                 if "inference_speedup" in metrics else ""))
        print(f"wrote {out / 'ticket.pt'}")
    return 0
