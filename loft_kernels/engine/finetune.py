"""The fine-tuning job: train a ticket (pruned model) densely into a resumable run directory."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable, Optional

from torch import nn

from ..data import Dataset
from ..io import atomic_write_text
from ..tickets.tracker import TrainingDiverged
from .checkpoints import RunCheckpoints, write_metrics
from .config import TrainConfig
from .loop import fit
from .model_files import save_model
from .trainers import DenseTrainer


def finetune_run(out, *, model: nn.Module, spec: dict, groups, kept: dict, ratio: float, dataset: Dataset,
                 cfg: TrainConfig, seed: int, device, resume: bool = False, progress: bool = False,
                 log: Optional[Callable[[str], None]] = None, checkpoint_every: Optional[int] = None,
                 keep_checkpoints: int = 2) -> dict:
    """Fine-tune the pruned `model` (a ticket) into `out`, resumable; returns the summary.

    Files: metrics.json/csv and a checkpoint set in checkpoints/ after every
    epoch (and every `checkpoint_every` steps; see `RunCheckpoints`), then
    model.pt (the fine-tuned ticket with its kept indices and ratio) and
    summary.json. resume=True continues from the newest checkpoint.
    """
    out = Path(out)
    if resume and (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    trainer = DenseTrainer(model, dataset, cfg, seed=seed, device=device)
    ckpts = RunCheckpoints(out, trainer, every=checkpoint_every, keep=keep_checkpoints)
    at = ckpts.restore() if resume else None
    start, start_batch, partial, history = 0, 0, None, []
    if at is not None:
        start, start_batch, partial, history = at["epoch"], at["batch"], at["partial"], at["extra"]["history"]
    t0 = time.perf_counter()
    done = {"history": history}

    def on_epoch(epoch: int, hist: list) -> bool:
        done["history"] = hist
        write_metrics(out, hist)
        if not math.isfinite(hist[-1]["train_loss"]):  # before a checkpoint a resume would start from
            raise TrainingDiverged(f"fine-tuning epoch {epoch}: the training loss is {hist[-1]['train_loss']} "
                                   f"(the training diverged; a lower learning rate may help)")
        ckpts.save(epoch=epoch, batch=0, partial=None, extra={"history": hist})
        if log is not None:
            log(f"fine-tune epoch {epoch}/{cfg.epochs}: loss {hist[-1]['train_loss']:.4f}  "
                f"test acc {hist[-1]['test_acc']:.2f}%")
        return False

    history = fit(trainer, epochs=cfg.epochs, start_epoch=start, history=history, on_epoch=on_epoch,
                  progress=progress, start_batch=start_batch, partial=partial,
                  on_step=ckpts.on_step(lambda: {"history": done["history"]}))
    summary = {"ratio": ratio, "epochs": cfg.epochs, "test_acc": history[-1]["test_acc"],
               "test_loss": history[-1]["test_loss"], "best_test_acc": max(r["test_acc"] for r in history),
               "seconds": time.perf_counter() - t0}
    save_model(out / "model.pt", trainer.model, spec, groups, kept=kept, ratio=ratio)
    write_metrics(out, history)
    atomic_write_text(json.dumps(summary, indent=2) + "\n", out / "summary.json")
    return summary
