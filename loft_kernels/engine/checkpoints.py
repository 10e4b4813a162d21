"""Run files: resumable checkpoints (trainer state, RNG, history) and per-epoch metrics, written atomically."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Callable

from ..elastic import ElasticCheckpoint, rng_state, set_rng_state
from ..io import CheckpointError, atomic_save, atomic_write_text, load_checkpoint
from .trainers import Trainer


# -------------------------------------------------------- run checkpoints ----
def _trainer_state(trainer: Trainer, **position) -> dict:
    return {"trainer": trainer.state_dict(), "rng": rng_state(), **position}


def _restore(trainer: Trainer, state: dict, where: str, position: tuple) -> None:
    missing = [k for k in ("trainer", "rng", *position) if k not in state]
    if missing:  # e.g. a checkpoint of the same format written by another program (ElasticCheckpoint's own)
        raise CheckpointError(f"{where} is not a checkpoint of a loft_kernels training run: it has no "
                              f"{', '.join(map(repr, missing))}")
    trainer.load_state_dict(state["trainer"])
    set_rng_state(state["rng"])


def save_run(path, *, epoch: int, trainer: Trainer, extra: dict) -> None:
    """Everything to continue after epoch `epoch` (1-based count of finished epochs), written atomically."""
    atomic_save({"format": 1, **_trainer_state(trainer, epoch=int(epoch), extra=extra)}, path)


def load_run(path, trainer: Trainer) -> tuple[int, dict]:
    """Restore `trainer` and the RNG from `save_run`'s file; returns (finished epochs, extra)."""
    try:
        state = load_checkpoint(path, map_location=trainer.device)
    except FileNotFoundError:
        raise FileNotFoundError(f"no checkpoint to resume from: {str(path)!r} does not exist") from None
    if not isinstance(state, dict) or state.get("format") != 1:
        raise CheckpointError(f"{str(path)!r} is not a loft_kernels run checkpoint")
    _restore(trainer, state, repr(str(path)), ("epoch", "extra"))
    return int(state["epoch"]), state["extra"]


class RunCheckpoints:
    """A run's resumable checkpoint sets in <out>/checkpoints (see `loft_kernels.elastic`).

    One set after every epoch and, with every=STEPS, mid-epoch at the first
    sync boundary after each STEPS steps; the newest `keep` sets are kept.
    Every rank of a distributed run writes its own file of each set.
    """

    def __init__(self, out, trainer: Trainer, *, every: int | None = None, keep: int = 2):
        self.trainer = trainer
        self.elastic = ElasticCheckpoint(Path(out) / "checkpoints", every=every, keep=keep,
                                         distributed=trainer.cfg.distributed)

    def step_of(self, epoch: int, batch: int) -> int:
        return epoch * self.trainer.steps_per_epoch + batch

    def save(self, *, epoch: int, batch: int, partial: dict | None, extra: dict) -> None:
        """Save the position `batch` batches into `epoch` (0-based), with the epoch's running sums `partial`."""
        self.elastic.save(self.step_of(epoch, batch),
                          _trainer_state(self.trainer, epoch=epoch, batch=batch, partial=partial, extra=extra))

    def restore(self) -> dict | None:
        """Load the newest complete set into the trainer and the RNG; its position and extra, or None."""
        found = self.elastic.load_latest(map_location=self.trainer.device)
        if found is None:
            return None
        step, state = found
        _restore(self.trainer, state, f"the checkpoint set of step {step} in {str(self.elastic.directory)!r}",
                 ("epoch", "batch", "partial", "extra"))
        return {"step": step, "epoch": state["epoch"], "batch": state["batch"], "partial": state["partial"],
                "extra": state["extra"]}

    def on_step(self, extra: Callable[[], dict]) -> Callable[[int, int, dict], None]:
        """A `train_epoch` on_step callback saving mid-epoch sets when due (epoch ends are saved by the caller)."""
        def maybe_save(epoch: int, batch: int, partial: dict) -> None:
            step = self.step_of(epoch, batch)
            if batch < self.trainer.steps_per_epoch and self.trainer.at_sync_boundary() and \
                    self.elastic.due(step):
                self.save(epoch=epoch, batch=batch, partial=partial, extra=extra())
        return maybe_save


def write_metrics(out, rows: list[dict], stem: str = "metrics") -> None:
    """<stem>.json (list of per-epoch dicts) and <stem>.csv (one row per epoch), both rewritten atomically."""
    out = Path(out)
    atomic_write_text(json.dumps(rows, indent=2) + "\n", out / f"{stem}.json")
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
    atomic_write_text(buf.getvalue(), out / f"{stem}.csv")
