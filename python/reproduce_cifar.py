"""Reproduce LoFT's CIFAR experiments: PreActResNet-34 / ResNet-34 on CIFAR-10/100 with 2 and 4 workers.

One invocation is one row of the paper's table (see docs/algorithm.md): pretrain
with LoFT-S (or densely with --workers 1, the accuracy GPipe would reach, since
GPipe trains the dense model), draw tickets at the pruning ratios (50 % and
80 %: top filters of each group by L2 norm), fine-tune each ticket, and compare
the communication with GPipe on the same number of workers (communication
model of `lk.comm_cost`). Settings follow the official code: SGD, learning rate
0.1, momentum 0.9, weight decay 5e-4, K = 15 local steps per round, optimizer
state reset every round, the paper's partition policy (blocks >= 1 of stages
2-4). Epoch counts are options (defaults below), not claims about the paper's
schedule.

GPU users, one node with 4 GPUs (NCCL, one process per worker):

    torchrun --standalone --nproc_per_node 4 python/reproduce_cifar.py \\
        --dataset cifar10 --data-dir /data/cifar-10-batches-py --model preact_resnet34 --out runs/c10-pre34-loft4

    torchrun --standalone --nproc_per_node 2 python/reproduce_cifar.py --dataset cifar100 \\
        --data-dir /data/cifar-100-python --model resnet34 --out runs/c100-r34-loft2

    python python/reproduce_cifar.py --workers 1 --dataset cifar10 --data-dir ... --out runs/c10-pre34-dense

Without torchrun, --workers S > 1 simulates the S workers in one process
(same result as S processes, up to float rounding). The dataset is never
downloaded: --data-dir must hold the python-pickle files. --resume continues a
killed job; --max-steps N caps every epoch at N steps (smoke tests, CI).

Fault tolerance: with `torchrun --max-restarts N`, a job whose rank died is
restarted by torchrun and resumes by itself from the newest checkpoint every
rank completed; --checkpoint-every STEPS adds mid-epoch checkpoints (at a
sync boundary) so a crash loses at most STEPS steps:

    torchrun --standalone --max-restarts 3 --nproc_per_node 4 python/reproduce_cifar.py \\
        --dataset cifar10 --data-dir /data/cifar-10-batches-py --checkpoint-every 200 --out runs/c10-loft4

Writes to --out: pretrain/ (the `loft pretrain` files), ticket-<ratio>/ (the
`loft finetune` files), results.json and results.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from loft_kernels import engine, report
from loft_kernels.comm_model import comm_cost
from loft_kernels.data import get_dataset
from loft_kernels.elastic import restart_count
from loft_kernels.io import atomic_write_text
from loft_kernels.tickets import prune


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--dataset", choices=("cifar10", "cifar100"), default="cifar10")
    p.add_argument("--data-dir", required=True, help="CIFAR directory in the python-pickle layout")
    p.add_argument("--model", choices=("preact_resnet34", "resnet34"), default="preact_resnet34")
    p.add_argument("--width", type=float, default=1.0, help="width multiplier (1.0 = the paper's models)")
    p.add_argument("--workers", type=int, default=None,
                   help="S; under torchrun the number of processes (default), otherwise simulated (default 4)")
    p.add_argument("--policy", choices=("paper", "all"), default="paper")
    p.add_argument("--sync-every", type=int, default=15, help="K (default: 15)")
    p.add_argument("--state", choices=("reset", "keep"), default="reset")
    p.add_argument("--epochs", type=int, default=40, help="LoFT pretraining epochs (default: 40)")
    p.add_argument("--finetune-epochs", type=int, default=160, help="fine-tuning epochs per ticket (default: 160)")
    p.add_argument("--batch-size", type=int, default=128, help="per worker (default: 128)")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--finetune-lr", type=float, default=0.1, help="cosine-annealed (default: 0.1)")
    p.add_argument("--ratios", default="0.5,0.8")
    p.add_argument("--max-steps", type=int, default=None, help="cap every epoch at this many steps (smoke runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out (implied when torchrun --max-restarts restarts the job)")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="STEPS",
                   help="also checkpoint mid-epoch, at the first sync boundary after every STEPS steps")
    p.add_argument("--keep-checkpoints", type=int, default=2, metavar="K", help="keep the newest K (default: 2)")
    args = p.parse_args(argv)
    args.ratios = sorted(float(r) for r in args.ratios.split(","))
    if any(not 0 <= r < 1 for r in args.ratios):
        p.error(f"--ratios must lie in [0, 1), got {args.ratios}")
    if args.checkpoint_every is not None and args.checkpoint_every < 1:
        p.error(f"--checkpoint-every must be >= 1, got {args.checkpoint_every}")
    if args.keep_checkpoints < 1:
        p.error(f"--keep-checkpoints must be >= 1, got {args.keep_checkpoints}")
    args.resume = args.resume or restart_count() > 0  # a torchrun restart continues the same run
    return args


def main(argv=None) -> int:
    args = parse(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    distributed = world > 1
    workers = args.workers or (world if distributed else 4)
    if distributed and workers != world:
        raise SystemExit(f"--workers {workers} but torchrun started {world} processes")
    if distributed:
        rank, _, device = engine.init_distributed(args.device)
    else:
        rank = 0
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" \
            else torch.device(args.device)
    out = Path(args.out)
    data = get_dataset(args.dataset, args.data_dir)
    spec = engine.model_spec(args.model, data, width=args.width, policy=args.policy)
    pre_cfg = engine.TrainConfig(method="loft" if workers > 1 else "dense", epochs=args.epochs,
                                 batch_size=args.batch_size, lr=args.lr, workers=workers, distributed=distributed,
                                 sync_every=args.sync_every, state=args.state, max_steps=args.max_steps)
    ft_cfg = engine.TrainConfig(epochs=args.finetune_epochs, batch_size=args.batch_size, lr=args.finetune_lr,
                                schedule="cosine", max_steps=args.max_steps)
    say = print if rank == 0 else (lambda *a, **k: None)
    t0 = time.perf_counter()

    # 1. Pretraining: every rank (or the simulator's S workers).
    try:
        summary = engine.pretrain_run(out / "pretrain", dataset=data, spec=spec, cfg=pre_cfg, seed=args.seed,
                                      device=device, resume=args.resume, log=say,
                                      checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints)
        if distributed:
            dist.barrier()
    finally:
        if distributed:  # also on errors: never leave with a live process group (see the CLI's pretrain)
            dist.destroy_process_group()
    if distributed and rank != 0:
        return 0

    # 2. Tickets: drawn and fine-tuned on one device (rank 0).
    model, groups, _ = engine.load_pretrained(out / "pretrain")
    model = model.to(device)
    tickets = {}
    for ratio in args.ratios:
        pruned, kept = prune(model, groups, ratio)
        torch.manual_seed(args.seed)
        ft = engine.finetune_run(out / f"ticket-{report.ratio_key(ratio)}", model=pruned, spec=spec, groups=groups,
                                 kept=kept, ratio=ratio, dataset=data, cfg=ft_cfg, seed=args.seed, device=device,
                                 resume=args.resume, log=say, checkpoint_every=args.checkpoint_every,
                                 keep_checkpoints=args.keep_checkpoints)
        tickets[report.ratio_key(ratio)] = ft["test_acc"]

    # 3. Communication against GPipe with the same workers, same samples (the paper's "improv." column).
    example = data.train_x[:args.batch_size].to(device)
    samples = summary["epochs_run"] * summary["samples_per_epoch"]
    gpipe = int(comm_cost(model, example, "gpipe", workers, args.batch_size, samples).total_bytes) \
        if workers > 1 else None
    loft = summary["comm_bytes_total"]
    results = {"dataset": args.dataset, "model": args.model, "method": summary["method"], "workers": workers,
               "distributed": distributed, "no_prune": summary["final"]["test_acc"], "ticket": tickets,
               "comm_bytes": loft, "gpipe_comm_bytes": gpipe,
               "improvement": (gpipe / loft) if gpipe and loft else None,
               "emerged_epoch": summary["emerged_epoch"], "seconds": time.perf_counter() - t0,
               "resumes": summary["resumes"], "torchrun_restarts": restart_count(),
               "settings": {k: v for k, v in vars(args).items() if k not in ("resume",)}}
    atomic_write_text(json.dumps(results, indent=2) + "\n", out / "results.json")
    gb = lambda b: "n/a" if b is None else f"{b / 1e9:.2f}"  # noqa: E731
    row = (f"| {args.model} {args.dataset} ({results['no_prune']:.2f}) | {results['method']} | "
           + " | ".join(f"{tickets[k]:.2f}" for k in sorted(tickets, key=float, reverse=True))
           + f" | {gb(loft)} | {gb(gpipe)} | "
           + (f"{results['improvement']:.2f}x" if results["improvement"] else "n/a") + " |")
    head = ("| setting (no-prune acc.) | method | "
            + " | ".join(f"{float(k) * 100:g} %" for k in sorted(tickets, key=float, reverse=True))
            + " | comm (GB) | GPipe comm (GB) | improv. |")
    table = "\n".join([head, "|" + "---|" * (head.count("|") - 1), row]) + "\n"
    atomic_write_text(table, out / "results.md")
    say(table)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as e:  # bad settings or data: one clear line, no traceback
        print(f"reproduce_cifar.py: error: {e}", file=sys.stderr)
        sys.exit(2)
