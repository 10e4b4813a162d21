"""The pretraining job: a resumable run directory with metrics, tracker snapshots, emergence and a summary."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..data import Dataset
from ..elastic import restart_count
from ..io import CheckpointError, atomic_save, atomic_write_text, load_checkpoint
from ..tickets import FilterTracker, detect_emergence
from ..training import FilterGroup
from .checkpoints import RunCheckpoints, write_metrics
from .config import TrainConfig
from .distributed import all_ranks_sum
from .evaluation import evaluate, recalibrate_bn
from .loop import fit
from .model_files import build_model, full_model, load_model_file, save_model
from .trainers import make_trainer


def emergence_epochs(tracker: FilterTracker, opts: dict) -> dict:
    """{"footrule": epoch or None, "mask": epoch or None}: where each criterion fired over the snapshots so far.

    opts: {"mask_ratio", "footrule_threshold", "footrule_window"} (see `lk.detect_emergence`), and optionally
    "every": judge only the snapshots of every `every`-th epoch (the initial weights included), so that a run of
    k times the epochs of another, each doing 1/k of its updates, is judged on the same grid.
    """
    if len(tracker) == 0:
        return {"footrule": None, "mask": None}
    keep = [i for i, tag in enumerate(tracker.tags) if tag % opts.get("every", 1) == 0]
    pick = lambda m: m[keep][:, keep]  # noqa: E731
    fired = {"footrule": detect_emergence(pick(tracker.footrule_matrix(reduce=True)), "footrule",
                                          threshold=opts["footrule_threshold"], window=opts["footrule_window"]),
             "mask": detect_emergence(pick(tracker.mask_distance_matrix(opts["mask_ratio"], reduce=True)), "mask")}
    return {c: None if i is None else tracker.tags[keep[i]] for c, i in fired.items()}


DEFAULT_EMERGENCE = {"mask_ratio": 0.5, "footrule_threshold": 0.1, "footrule_window": 3}


def pretrain_run(out, *, dataset: Dataset, spec: dict, cfg: TrainConfig, seed: int, device,
                 emergence: Optional[dict] = None, stop_at: Optional[str] = None, keep_epochs=(),
                 resume: bool = False, progress: bool = False, log: Optional[Callable[[str], None]] = None,
                 checkpoint_every: Optional[int] = None, keep_checkpoints: int = 2) -> dict:
    """Pretrain the model of `spec` on `dataset` into directory `out`, resumable; returns the summary.

    The tracker snapshots the filter scores of the initial weights (tag 0)
    and after every epoch (tag = epoch). Files (rank 0 writes all but its own
    checkpoint files): init.pt (initial weights), epoch_<eee>.pt (e in three digits) for e in
    keep_epochs, metrics.json/csv after every epoch, checkpoint sets in
    checkpoints/ (see `RunCheckpoints`: after every epoch and, with
    checkpoint_every=STEPS, mid-epoch at a sync boundary; the newest
    keep_checkpoints kept), and at the end model.pt, tracker.pt (filter
    scores of every epoch) and summary.json. With resume=True, or when
    torchrun restarted the job, the newest complete checkpoint set is
    continued, mid-epoch included, replaying exactly the same batches (a
    finished run just returns its summary); the summary lists every resume.
    stop_at ("footrule" or "mask") ends training at the epoch that criterion
    fires. Every rank of a distributed run calls this with the same arguments.
    """
    out = Path(out)
    emergence = {**DEFAULT_EMERGENCE, **(emergence or {})}
    if stop_at is not None and stop_at not in ("footrule", "mask"):
        raise ValueError(f"stop_at must be None, 'footrule' or 'mask', got {stop_at!r}")
    resume = resume or restart_count() > 0
    if resume and (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    rank = dist.get_rank() if cfg.distributed else 0
    torch.manual_seed(seed)  # the initial weights: identical on every rank and for every method
    model, groups = build_model(spec)
    if rank == 0 and not (out / "init.pt").is_file():
        save_model(out / "init.pt", model, spec, groups, epoch=0)
    trainer = make_trainer(model, groups, dataset, cfg, seed=seed, device=device)
    tracker = FilterTracker(trainer.model, groups)
    ckpts = RunCheckpoints(out, trainer, every=checkpoint_every, keep=keep_checkpoints)
    at = ckpts.restore() if resume else None
    start, start_batch, partial, history, seconds, resumes = 0, 0, None, [], 0.0, []
    if at is not None:
        start, start_batch, partial = at["epoch"], at["batch"], at["partial"]
        history, seconds, resumes = at["extra"]["history"], at["extra"]["seconds"], at["extra"]["resumes"]
        tracker.load_state_dict(at["extra"]["tracker"])
        resumes = resumes + [{"step": at["step"], "epoch": start, "batch": start_batch,
                              "torchrun_restart": restart_count(), "time": time.time()}]
        if log is not None:
            log(f"resumed from the checkpoint at step {at['step']} (epoch {start + 1}, batch {start_batch}; "
                f"torchrun restart {restart_count()})")
    else:
        # Epoch 0 = the initial weights: the footrule's first distance F(1, 0) is the big early reshuffle
        # (the poster's curves start at 30-60), which the relative emergence threshold is a fraction of.
        tracker.snapshot(0)
    found = emergence_epochs(tracker, emergence)
    t_start = time.perf_counter() - seconds
    done = {"history": history}  # the finished epochs' rows, for mid-epoch checkpoints

    def extra(hist: list) -> dict:
        return {"history": hist, "seconds": time.perf_counter() - t_start, "tracker": tracker.state_dict(),
                "resumes": resumes}

    def on_epoch(epoch: int, hist: list) -> bool:
        nonlocal found
        done["history"] = hist
        row = hist[-1]
        found = emergence_epochs(tracker, emergence)
        row["emerged_footrule"], row["emerged_mask"] = found["footrule"], found["mask"]
        if rank == 0:
            if epoch in keep_epochs:
                save_model(out / f"epoch_{epoch:03d}.pt", trainer.model, spec, groups, epoch=epoch)
            write_metrics(out, hist)
        ckpts.save(epoch=epoch, batch=0, partial=None, extra=extra(hist))
        if log is not None:
            fired = "".join(f"  [{c} criterion fired]" for c, e in found.items() if e == epoch)
            log(f"epoch {epoch}/{cfg.epochs}: loss {row['train_loss']:.4f}  test acc {row['test_acc']:.2f}%  "
                f"({row['seconds']:.1f}s){fired}")
        return stop_at is not None and found[stop_at] is not None

    if stop_at is None or found[stop_at] is None:
        history = fit(trainer, epochs=cfg.epochs, start_epoch=start, history=history, tracker=tracker,
                      on_epoch=on_epoch, progress=progress, start_batch=start_batch, partial=partial,
                      on_step=ckpts.on_step(lambda: extra(done["history"])))
    seconds = time.perf_counter() - t_start
    stats = trainer.comm_stats()
    with torch.random.fork_rng(devices=[]):  # a full-size copy (state_dict is full-size even mid-round)
        full_copy = build_model(spec)[0].to(trainer.device, memory_format=trainer.memory_format)
    full_copy.load_state_dict(trainer.model.state_dict())
    recal = evaluate(recalibrate_bn(full_copy, trainer.loader), dataset.test_x, dataset.test_y,
                     device=trainer.device, memory_format=trainer.memory_format)
    mean_epoch = sum(r["seconds"] for r in history) / len(history)
    summary = {
        "method": "dense" if cfg.method == "dense" else f"loft-{cfg.workers}",
        "seed": seed, "train": cfg.to_dict(), "epochs_planned": cfg.epochs, "epochs_run": len(history),
        "final": {k: history[-1][k] for k in ("train_loss", "train_acc", "test_loss", "test_acc")},
        "test_acc_bn_recalibrated": recal["acc"],
        "emerged_epoch": found, "emergence": emergence, "stop_at_emergence": stop_at,
        "epochs_saved": cfg.epochs - len(history),
        # The skipped epochs never ran, so their time is estimated from this run's mean epoch time.
        "seconds_saved": (cfg.epochs - len(history)) * mean_epoch,
        "seconds": seconds,
        "comm": stats,
        # Bytes on the wire over all ranks (the paper's convention); each LoFT rank sends the same amount.
        "comm_bytes_total": None if stats is None else (
            all_ranks_sum(stats["bytes_sent"]) if cfg.distributed else int(stats["bytes_sent"]) * cfg.workers),
        "groups": [g.name for g in groups],
        "samples_per_epoch": trainer.samples_per_epoch,
        # Every continuation from a checkpoint (after a kill, or a torchrun restart of the job).
        "resumes": resumes, "torchrun_restarts": restart_count(),
    }
    if rank == 0:
        save_model(out / "model.pt", trainer.model, spec, groups, epoch=len(history))
        atomic_save(tracker.state_dict(), out / "tracker.pt")
        write_metrics(out, history)
        atomic_write_text(json.dumps(summary, indent=2) + "\n", out / "summary.json")
    return summary


def load_pretrained(out) -> tuple[nn.Module, list[FilterGroup], FilterTracker]:
    """(model, groups, tracker) of a finished `pretrain_run` directory."""
    out = Path(out)
    model, groups = full_model(load_model_file(out / "model.pt", "pretrained model"), str(out / "model.pt"))
    tracker = FilterTracker(model, groups)
    try:
        state = load_checkpoint(out / "tracker.pt")
    except FileNotFoundError:
        raise FileNotFoundError(f"{str(out / 'tracker.pt')!r} does not exist; {str(out)!r} must be the output "
                                f"directory of a finished pretraining run") from None
    try:
        tracker.load_state_dict(state)
    except (ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{str(out / 'tracker.pt')!r} does not hold the filter scores of "
                              f"{str(out / 'model.pt')!r}: {exc}") from None
    return model, groups, tracker
