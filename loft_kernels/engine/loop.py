"""The epoch loop: train, evaluate, snapshot, hand each finished epoch to a callback."""
from __future__ import annotations

from typing import Callable, Optional

from .evaluation import evaluate
from .trainers import Trainer


def fit(trainer: Trainer, *, epochs: int, start_epoch: int = 0, history: Optional[list] = None,
        tracker=None, on_epoch: Optional[Callable[[int, list], bool]] = None, progress: bool = False,
        start_batch: int = 0, partial: Optional[dict] = None,
        on_step: Optional[Callable[[int, int, dict], None]] = None) -> list[dict]:
    """Train epochs start_epoch+1 .. epochs; after each: evaluate, snapshot `tracker` (tag = epoch), call on_epoch.

    on_epoch(epoch, history) runs after the snapshot, with the new row already
    appended to history (write metrics, checkpoint), and returns True to stop
    early (e.g. when a ticket emerged). Returns the history (one row per
    finished epoch, those of `history` first). A mid-epoch resume starts epoch
    start_epoch+1 at batch `start_batch` with the running sums `partial`;
    on_step is handed to `Trainer.train_epoch`.
    """
    history = list(history or [])
    ds = trainer.dataset
    for e in range(start_epoch, epochs):
        first = e == start_epoch
        row = {"epoch": e + 1, **trainer.train_epoch(e, progress=progress, start=start_batch if first else 0,
                                                     partial=partial if first else None, on_step=on_step)}
        test = evaluate(trainer.model, ds.test_x, ds.test_y, device=trainer.device, memory_format=trainer.memory_format)
        row.update(test_loss=test["loss"], test_acc=test["acc"])
        stats = trainer.comm_stats()
        if stats is not None:
            row["comm_bytes_sent"] = int(stats["bytes_sent"])
        if tracker is not None:
            tracker.snapshot(e + 1)  # ranks the full model also while a LoFT rank holds its compact sub-model
        history.append(row)
        if on_epoch is not None and on_epoch(e + 1, history):
            break
    return history
