"""`loft pretrain`: dense or LoFT pretraining with a filter tracker, checkpoints and early stopping at emergence.

Writes to --out: config.json; metrics.json/metrics.csv (one row per epoch);
checkpoints/step-<n>/rank<r>-of-<S>.pt after every epoch and every
--checkpoint-every steps (one file per rank, newest --keep-checkpoints kept)
for --resume; init.pt (initial weights, for rewinding);
epoch_<eee>.pt (epoch e, three digits) for each epoch in --keep-epochs; at the end model.pt (the
pretrained model), tracker.pt (filter scores of every epoch) and
summary.json (accuracy, emergence epochs, communication, time, resumes).

Under `torchrun --max-restarts N ... --distributed`, a restarted job resumes
by itself from the newest checkpoint that every rank completed.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch.distributed as dist

from .. import engine
from ..elastic import restart_count
from ..engine.config import MEMORY_FORMATS
from ..training.fingerprint import check_across_ranks
from ..training.simulator import EXECUTIONS
from . import _common as U

HELP = "pretrain a model densely or with LoFT (S simulated workers, or S processes under torchrun)"


def add_train_args(p: argparse.ArgumentParser, *, epochs, lr: float, batch_size: int = 24,
                   epochs_help: str = "epochs (default: %(default)s)") -> None:
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=epochs, help=epochs_help)
    g.add_argument("--batch-size", type=int, default=batch_size, help="mini-batch per worker (default: %(default)s)")
    g.add_argument("--lr", type=U.finite_float, default=lr, help="SGD learning rate (default: %(default)s)")
    g.add_argument("--momentum", type=U.finite_float, default=0.9, help="SGD momentum (default: %(default)s)")
    g.add_argument("--weight-decay", type=U.finite_float, default=5e-4, help="SGD weight decay (default: %(default)s)")
    g.add_argument("--memory-format", choices=MEMORY_FORMATS, default="auto",
                   help="layout of the model's conv tensors and of the image batches: auto is channels_last on a "
                        "CPU (measured faster there) and contiguous on a GPU (default: %(default)s)")


def add_loft_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LoFT")
    g.add_argument("--sync-every", type=int, default=engine.TrainConfig.sync_every, help="K: local steps per round (default: %(default)s)")
    g.add_argument("--state", choices=("reset", "keep"), default="reset",
                   help="optimizer state across rounds: reset (official code) or keep (default: %(default)s)")
    g.add_argument("--execution", choices=EXECUTIONS, default="auto",
                   help="how simulated workers run: one after another (loop), through one batched network "
                        "(batched; VGG/ResNet without dropout), or whichever measured faster for each batch shape "
                        "after the batched network matched the loop's gradients (auto); results are the same "
                        "(default: %(default)s)")
    add_emergence_args(g)


def emerged_words(found: dict) -> str:
    """"footrule at epoch 4, mask: not fired" for {"footrule": 4, "mask": None}."""
    return ", ".join(f"{c} at epoch {e}" if e is not None else f"{c}: not fired" for c, e in found.items())


def add_emergence_args(g) -> None:
    """The emergence criteria's settings (`g`: a parser or an argument group)."""
    g.add_argument("--mask-ratio", type=U.finite_float, default=0.5,
                   help="pruning ratio whose keep-masks the Early-Bird criterion compares (default: %(default)s)")
    g.add_argument("--footrule-threshold", type=U.finite_float, default=0.1,
                   help="footrule criterion: consecutive distance <= this fraction of the first one "
                        "(default: %(default)s)")
    g.add_argument("--footrule-window", type=int, default=3,
                   help="footrule criterion: for this many consecutive epochs (default: %(default)s)")


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("pretrain", help=HELP, description=HELP + ".\n\n" + __doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    U.add_data_model(p)
    add_train_args(p, epochs=20, lr=0.05)
    g = p.add_argument_group("workers")
    g.add_argument("--workers", type=int, default=1, help="S: 1 = dense training, S > 1 = LoFT-S (default: 1)")
    g.add_argument("--distributed", action="store_true",
                   help="one process per worker: run under `torchrun --nproc_per_node S` (gloo on CPU, NCCL on GPU)")
    add_loft_args(p)
    g = p.add_argument_group("snapshots and stopping")
    g.add_argument("--stop-at-emergence", choices=("footrule", "mask"), default=None,
                   help="end pretraining when this criterion declares the ticket emerged")
    g.add_argument("--keep-epochs", default=None,
                   help="comma-separated epochs whose weights to keep as epoch_<eee>.pt (for drawing/rewinding)")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint "
                   "(implied when torchrun restarts the job)")
    g.add_argument("--checkpoint-every", type=int, default=None, metavar="STEPS",
                   help="also checkpoint mid-epoch, at the first sync boundary after every STEPS steps "
                        "(default: at epoch ends only)")
    g.add_argument("--keep-checkpoints", type=int, default=2, metavar="K",
                   help="keep the newest K checkpoints (default: %(default)s)")
    U.add_common(p)
    return p


def train_config(args, workers: int = 1, distributed: bool = False, *, schedule: str = "constant",
                 epochs: int | None = None, lr: float | None = None,
                 weight_decay: float | None = None) -> engine.TrainConfig:
    """The TrainConfig of the training options (epochs/lr/weight decay overridable), with errors naming the options."""
    epochs = args.epochs if epochs is None else epochs
    lr = args.lr if lr is None else lr
    weight_decay = args.weight_decay if weight_decay is None else weight_decay
    U.check_positive(epochs, "--epochs")
    U.check_positive(args.batch_size, "--batch-size")
    sync_every, state = getattr(args, "sync_every", engine.TrainConfig.sync_every), getattr(args, "state", "reset")
    U.check_positive(sync_every, "--sync-every")
    if not (lr > 0 and math.isfinite(lr)):
        raise U.CLIError(f"the learning rate must be a finite number > 0, got {lr:g}")
    for name in ("momentum", "weight_decay"):
        if not getattr(args, name) >= 0:
            raise U.CLIError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name):g}")
    if not weight_decay >= 0:  # an override (the fine-tuning's) is checked, with its option's name, by its caller
        raise U.CLIError(f"the weight decay must be >= 0, got {weight_decay:g}")
    return engine.TrainConfig(method="dense" if workers == 1 else "loft", epochs=epochs,
                              batch_size=args.batch_size, lr=lr, momentum=args.momentum,
                              weight_decay=weight_decay, schedule=schedule, workers=workers,
                              distributed=distributed, sync_every=sync_every, state=state,
                              execution=getattr(args, "execution", "auto"),
                              memory_format=getattr(args, "memory_format", "auto"))


def emergence_options(args) -> dict:
    U.check_ratio(args.mask_ratio, "--mask-ratio")
    if not args.footrule_threshold >= 0:
        raise U.CLIError(f"--footrule-threshold must be >= 0, got {args.footrule_threshold:g}")
    U.check_positive(args.footrule_window, "--footrule-window")
    return {"mask_ratio": args.mask_ratio, "footrule_threshold": args.footrule_threshold,
            "footrule_window": args.footrule_window}


def _check_same_on_every_rank(args, config: dict, out_text: str, rank: int, world: int) -> None:
    """Every rank must run the same job: ranks with another batch size or epoch count would call mismatched
    collectives (gloo aborts), another checkpoint schedule would hang, another lr would train silently apart.
    One all_gather of the settings' hashes; every rank raises the same error. (The device is each rank's own
    GPU, and a data directory may sit elsewhere on another node.)"""
    settings = {**config, "checkpoint_every": args.checkpoint_every, "keep_checkpoints": args.keep_checkpoints,
                "out": out_text, "resume": bool(args.resume)}
    mine = {k: json.dumps(v, sort_keys=True, default=str) for k, v in settings.items() if k not in ("device", "data_dir")}
    try:
        check_across_ranks(mine, None, rank, world, what="--distributed", subject="the run's settings")
    except ValueError as e:
        raise U.CLIError(str(e)) from None


def run(args) -> int:
    workers = U.check_positive(args.workers, "--workers")
    if args.distributed and workers < 2:
        raise U.CLIError("--distributed needs --workers S >= 2 (and torchrun --nproc_per_node S)")
    cfg = train_config(args, workers, args.distributed)
    emergence = emergence_options(args)
    keep = U.parse_list(args.keep_epochs, int, "--keep-epochs") if args.keep_epochs else []
    if any(not 1 <= e <= args.epochs for e in keep):
        raise U.CLIError(f"--keep-epochs must lie in 1..{args.epochs} (the epochs), got {keep}")
    if args.checkpoint_every is not None:
        U.check_positive(args.checkpoint_every, "--checkpoint-every")
    U.check_positive(args.keep_checkpoints, "--keep-checkpoints")
    out_text = args.out or U.default_out("pretrain")
    # A torchrun restart continues the run the first attempt started (if it got as far as writing config.json).
    args.resume = args.resume or (restart_count() > 0 and (Path(out_text) / "config.json").is_file())
    U.check_out_free(out_text, resume=args.resume)
    dataset = U.load_dataset(args)
    spec = U.make_spec(args, dataset, workers=workers, workers_option=f"--workers {workers}")
    rank = 0
    if args.distributed:
        U.resolve_device(args.device)  # the same refusals as a single process (each rank takes cuda:LOCAL_RANK)
        try:
            rank, world, device = engine.init_distributed(args.device)
        except engine.NotUnderTorchrun as e:
            raise U.CLIError(str(e)) from None
        if world != workers:
            dist.destroy_process_group()
            raise U.CLIError(f"--workers {workers} but torchrun started {world} processes")
    else:
        device = U.resolve_device(args.device)
    try:
        config = {"command": "pretrain", "dataset": args.dataset, "data_dir": args.data_dir, "spec": spec,
                  "train": cfg.to_dict(), "seed": args.seed, "emergence": emergence,
                  "stop_at_emergence": args.stop_at_emergence, "keep_epochs": keep, "device": str(device)}
        out = Path(out_text)
        if args.distributed:
            _check_same_on_every_rank(args, config, out_text, rank, world)
        if args.resume:  # every rank checks (read-only), so a refusal never leaves the others waiting
            U.check_same_config(out_text, config, ("dataset", "spec", "train", "seed", "emergence",
                                                   "stop_at_emergence", "keep_epochs"))
        if rank == 0:
            out = U.prepare_out(out_text, resume=args.resume)
            if not args.resume:
                U.write_config(out, config)
        if args.distributed:
            dist.barrier()  # the output directory exists before any rank writes its checkpoint
        quiet = args.quiet or rank != 0
        summary = engine.pretrain_run(out, dataset=dataset, spec=spec, cfg=cfg, seed=args.seed, device=device,
                                      emergence=emergence, stop_at=args.stop_at_emergence, keep_epochs=keep,
                                      resume=args.resume, progress=U.show_progress(quiet),
                                      log=None if quiet else (lambda m: print(m, flush=True)),
                                      checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints)
        if rank == 0:
            _print_summary(summary, quiet=args.quiet)
        if args.distributed:
            dist.barrier()
        return 0
    finally:
        # Also on errors: a process leaving with its process group alive can abort in the backend's threads.
        if args.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _print_summary(s: dict, *, quiet: bool) -> None:
    if quiet:
        return
    print(f"pretrained {s['method']} for {s['epochs_run']} epochs in {s['seconds']:.1f}s: "
          f"test acc {s['final']['test_acc']:.2f}%")
    print(f"ticket emerged: {emerged_words(s['emerged_epoch'])}")
    if s["stop_at_emergence"]:
        print(f"stopped at emergence ({s['stop_at_emergence']}): saved {s['epochs_saved']} epochs, "
              f"~{s['seconds_saved']:.1f}s")
    if s["comm_bytes_total"] is not None:
        print(f"communication: {s['comm_bytes_total']} bytes over all ranks "
              f"({s['comm']['bytes_sent']} sent per rank, {s['comm']['syncs']} syncs)")
