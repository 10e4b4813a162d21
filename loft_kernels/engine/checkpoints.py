"""Run files: resumable checkpoints (trainer state, RNG, history) and per-epoch metrics, written atomically."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import torch

from ..io import atomic_save, atomic_write_text, load_checkpoint
from .trainers import Trainer


# -------------------------------------------------------- run checkpoints ----
def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_run(path, *, epoch: int, trainer: Trainer, extra: dict) -> None:
    """Everything to continue after epoch `epoch` (1-based count of finished epochs), written atomically."""
    atomic_save({"format": 1, "epoch": int(epoch), "trainer": trainer.state_dict(), "rng": _rng_state(),
                 "extra": extra}, path)


def load_run(path, trainer: Trainer) -> tuple[int, dict]:
    """Restore `trainer` and the RNG from `save_run`'s file; returns (finished epochs, extra)."""
    try:
        state = load_checkpoint(path, map_location=trainer.device)
    except FileNotFoundError:
        raise FileNotFoundError(f"no checkpoint to resume from: {str(path)!r} does not exist") from None
    if not isinstance(state, dict) or state.get("format") != 1:
        raise ValueError(f"{str(path)!r} is not a loft_kernels run checkpoint")
    trainer.load_state_dict(state["trainer"])
    _set_rng_state({k: (v.cpu() if isinstance(v, torch.Tensor) else [t.cpu() for t in v])
                    for k, v in state["rng"].items()})
    return int(state["epoch"]), state["extra"]


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
