"""The fine-tuning job: train a ticket (pruned model) densely into a resumable run directory."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional

from torch import nn

from ..data import Dataset
from ..io import atomic_write_text
from .checkpoints import load_run, save_run, write_metrics
from .config import TrainConfig
from .loop import fit
from .model_files import save_model
from .trainers import DenseTrainer


def finetune_run(out, *, model: nn.Module, spec: dict, groups, kept: dict, ratio: float, dataset: Dataset,
                 cfg: TrainConfig, seed: int, device, resume: bool = False, progress: bool = False,
                 log: Optional[Callable[[str], None]] = None) -> dict:
    """Fine-tune the pruned `model` (a ticket) into `out`, resumable; returns the summary.

    Files: metrics.json/csv and checkpoint.pt after every epoch, then model.pt
    (the fine-tuned ticket with its kept indices and ratio) and summary.json.
    """
    out = Path(out)
    if resume and (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    trainer = DenseTrainer(model, dataset, cfg, seed=seed, device=device)
    ckpt = out / "checkpoint.pt"
    start, history = 0, []
    if resume and ckpt.is_file():
        start, extra = load_run(ckpt, trainer)
        history = extra["history"]
    t0 = time.perf_counter()

    def on_epoch(epoch: int, hist: list) -> bool:
        write_metrics(out, hist)
        save_run(ckpt, epoch=epoch, trainer=trainer, extra={"history": hist})
        if log is not None:
            log(f"fine-tune epoch {epoch}/{cfg.epochs}: loss {hist[-1]['train_loss']:.4f}  "
                f"test acc {hist[-1]['test_acc']:.2f}%")
        return False

    history = fit(trainer, epochs=cfg.epochs, start_epoch=start, history=history, on_epoch=on_epoch,
                  progress=progress)
    summary = {"ratio": ratio, "epochs": cfg.epochs, "test_acc": history[-1]["test_acc"],
               "test_loss": history[-1]["test_loss"], "best_test_acc": max(r["test_acc"] for r in history),
               "seconds": time.perf_counter() - t0}
    save_model(out / "model.pt", trainer.model, spec, groups, kept=kept, ratio=ratio)
    write_metrics(out, history)
    atomic_write_text(json.dumps(summary, indent=2) + "\n", out / "summary.json")
    return summary
