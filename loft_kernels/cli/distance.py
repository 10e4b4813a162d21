"""`loft distance`: filter-ranking distances of a pretraining run and when each criterion saw the ticket emerge.

Reads tracker.pt and model.pt of a `loft pretrain` output directory. Writes
to --out: config.json; metrics.json/metrics.csv (per epoch: footrule distance
to the reference snapshot, to the previous epoch, Early-Bird mask distance to
the previous epoch); distance.json (the per-group T x T footrule matrices and
the emergence epochs); footrule_to_final.png; footrule_heatmap_<group>.png.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .. import engine, report
from ..io import CheckpointError, atomic_write_text
from ..tickets import FilterTracker
from . import _common as U
from .pretrain import add_emergence_args, emerged_words, emergence_options

HELP = "filter-ranking distances (footrule, Early-Bird mask) of a pretraining run, and emergence epochs"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("distance", help=HELP, description=HELP + ".\n\n" + __doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a `loft pretrain` output directory (with tracker.pt, model.pt)")
    p.add_argument("--reference", default="final",
                   help="snapshot the footrule distance is measured to: final (default) or an epoch number")
    g = p.add_argument_group("emergence criteria")
    add_emergence_args(g)
    g.add_argument("--every", type=int, default=None, metavar="N",
                   help="judge only the snapshots of every N-th epoch (default: as the run was judged, which is "
                        "every S-th epoch for LoFT-S under loft run --loft-budget updates, else 1)")
    U.add_common(p)
    return p


def load_tracker(run_dir: Path) -> FilterTracker:
    """The FilterTracker of a pretraining output directory (scores of every epoch)."""
    try:
        return engine.load_pretrained(run_dir)[2]
    except (CheckpointError, FileNotFoundError) as e:
        raise U.CLIError(f"--run: {e}") from None


def distance_rows(tracker: FilterTracker, reference, mask_ratio: float) -> list[dict]:
    """One row per snapshot: footrule to `reference`, to the previous snapshot, mask distance to the previous."""
    to_ref = tracker.footrule_to(reference).total
    fm = tracker.footrule_matrix(reduce=True)
    mm = tracker.mask_distance_matrix(mask_ratio, reduce=True)
    rows = []
    for t, tag in enumerate(tracker.tags):
        rows.append({"epoch": tag, "footrule_to_reference": float(to_ref[t]),
                     "footrule_to_previous": float(fm[t, t - 1]) if t else None,
                     "mask_distance_to_previous": float(mm[t, t - 1]) if t else None})
    return rows


def _judged_every(run_dir: Path) -> int:
    """The epoch grid the run's own criteria used (its summary's emergence settings), else every epoch."""
    try:
        every = json.loads((run_dir / "summary.json").read_text())["emergence"].get("every", 1)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return 1
    return every if isinstance(every, int) and every >= 1 else 1


def run(args) -> int:
    opts = emergence_options(args)
    run_dir = Path(args.run)
    if not run_dir.is_dir():
        raise U.CLIError(f"--run: {args.run!r} is not a directory")
    out_text = args.out or U.default_out("distance")
    U.check_out_free(out_text, resumable=False)
    tracker = load_tracker(run_dir)
    if len(tracker) < 2:
        raise U.CLIError(f"--run: the tracker holds {len(tracker)} snapshot(s); distances need at least 2 epochs")
    if args.reference == "final":
        reference = tracker.tags[-1]
    else:
        try:
            reference = int(args.reference)
        except ValueError:
            raise U.CLIError(f"--reference must be 'final' or an epoch number, got {args.reference!r}") from None
        if reference not in tracker.tags:
            raise U.CLIError(f"--reference: epoch {reference} was not snapshotted; epochs are {tracker.tags}")
    rows = distance_rows(tracker, reference, opts["mask_ratio"])
    opts["every"] = U.check_positive(args.every, "--every") if args.every is not None else _judged_every(run_dir)
    found = engine.emergence_epochs(tracker, opts)
    out = U.prepare_out(out_text, resumable=False)
    U.write_config(out, {"command": "distance", "run": str(run_dir), "reference": reference, "emergence": opts,
                         "seed": args.seed})
    engine.write_metrics(out, rows)
    matrix = tracker.footrule_matrix()
    atomic_write_text(json.dumps({"epochs": tracker.tags, "groups": tracker.group_names, "reference": reference,
                                  "emerged_epoch": found, "footrule_matrix": matrix.tolist()}, indent=1) + "\n",
                      out / "distance.json")
    report.plot_lines({"footrule": [r["footrule_to_reference"] for r in rows]}, out / "footrule_to_final.png",
                      x={"footrule": tracker.tags}, title=f"footrule distance to epoch {reference}",
                      xlabel="epoch", ylabel="F(epoch, reference), summed over groups")
    report.plot_heatmaps({run_dir.name: matrix}, tracker.group_names, out, first_epoch=tracker.tags[0])
    if not args.quiet:
        for r in rows:
            print(f"epoch {r['epoch']:>3}: F to reference {r['footrule_to_reference']:8.3f}")
        print(f"ticket emerged: {emerged_words(found)}")
    return 0
