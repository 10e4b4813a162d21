"""`loft finetune`: train a ticket (the pruned model) densely, from its pruned weights or rewound.

By default the ticket is fine-tuned from the pruned pretrained weights (the
LoFT paper). --rewind-from MODEL_FILE re-initialises the pruned structure
from another checkpoint of the same pretraining run (init.pt: the initial
weights; epoch_<eee>.pt, e in three digits: those of epoch e), cut by the ticket's kept filters.
SGD with cosine learning-rate annealing. Writes to --out: config.json,
metrics.json/metrics.csv per epoch, a checkpoint set in checkpoints/ after
every epoch (for --resume), and at the end model.pt (the fine-tuned ticket)
and summary.json.
"""
from __future__ import annotations

import argparse

import torch

from .. import engine
from ..io import CheckpointError
from ..tickets import rewind
from . import _common as U
from .pretrain import add_train_args, train_config
from .prune import model_file

HELP = "fine-tune a ticket from `loft prune` (or rewind it to earlier weights and retrain)"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("finetune", help=HELP, description=HELP + ".\n\n" + __doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ticket", required=True, help="a `loft prune` output directory (its ticket.pt) or a ticket file")
    p.add_argument("--rewind-from", default=None,
                   help="full-size model file of the same run (init.pt, epoch_<eee>.pt) to take the weights from")
    U.add_data_model(p, model=False)
    add_train_args(p, epochs=15, lr=0.05)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    U.add_common(p)
    return p


def run(args) -> int:
    cfg = train_config(args, schedule="cosine")
    src = model_file(args.ticket, "--ticket", "ticket.pt")
    rew = model_file(args.rewind_from, "--rewind-from", "init.pt") if args.rewind_from else None
    out_text = args.out or U.default_out("finetune")
    U.check_out_free(out_text, resume=args.resume)
    device = U.resolve_device(args.device)
    try:
        obj = engine.load_model_file(src, "--ticket")
        pruned = engine.ticket_model(obj, f"--ticket {str(src)!r}")
        groups = engine.groups_from_list(obj["groups"])
        if rew is not None:
            source = engine.load_model_file(rew, "--rewind-from")
            if source["spec"] != obj["spec"] or source["groups"] != obj["groups"]:
                raise U.CLIError(f"--rewind-from {str(rew)!r} is a different model than the ticket's "
                                 f"(spec or filter groups differ)")
            full, _ = engine.full_model(source, f"--rewind-from {str(rew)!r}")  # refuses a ticket, a misfit file
            pruned = rewind(pruned, obj["kept"], groups, full)
    except (CheckpointError, FileNotFoundError) as e:
        raise U.CLIError(str(e)) from None
    dataset = U.load_dataset(args)
    want, shape = obj["spec"]["kwargs"], obj["spec"]["input_shape"]
    if (dataset.in_channels, dataset.num_classes) != (want["in_channels"], want["num_classes"]):
        raise U.CLIError(f"--dataset {args.dataset} has {dataset.in_channels} channels and {dataset.num_classes} "
                         f"classes, the ticket was built for {want['in_channels']} and {want['num_classes']}")
    if list(dataset.image_size) != list(shape[1:]):
        raise U.CLIError(f"--dataset {args.dataset} has {'x'.join(map(str, dataset.image_size))} images, the ticket "
                         f"was drawn from a model trained on {'x'.join(map(str, shape[1:]))} ones")
    config = {"command": "finetune", "ticket": str(src), "rewind_from": None if rew is None else str(rew),
              "dataset": args.dataset, "data_dir": args.data_dir, "train": cfg.to_dict(), "seed": args.seed,
              "device": str(device)}
    if args.resume:
        U.check_same_config(out_text, config, ("ticket", "rewind_from", "dataset", "train", "seed"))
    out = U.prepare_out(out_text, resume=args.resume)
    if not args.resume:
        U.write_config(out, config)
    torch.manual_seed(args.seed)
    s = engine.finetune_run(out, model=pruned, spec=obj["spec"], groups=groups, kept=obj["kept"],
                            ratio=float(obj["ratio"]), dataset=dataset, cfg=cfg, seed=args.seed, device=device,
                            resume=args.resume, progress=U.show_progress(args.quiet),
                            log=None if args.quiet else print)
    U.say(args.quiet, f"fine-tuned ticket (ratio {s['ratio']:g}): test acc {s['test_acc']:.2f}% "
                      f"after {s['epochs']} epochs ({s['seconds']:.1f}s)")
    return 0
