"""Elastic checkpoints: every rank saves at a sync boundary; a restarted job resumes from the newest complete set.

Under `torchrun --max-restarts N` a dead rank makes torchrun stop and restart
every rank of the job. To continue instead of starting over, each rank writes
its own checkpoint file at the same steps, and on start the ranks agree on the
newest step for which *every* rank's file exists (the newest complete set).
Layout, one folder per step::

    <directory>/step-0000000120/rank0-of-2.pt
    <directory>/step-0000000120/rank1-of-2.pt

Each file is written atomically (see `loft_kernels.io`), so a rank killed while
writing leaves its previous files intact and the set of that step incomplete.
Ranks find the complete sets from what each can see itself (gathered with one
collective), so the directory may be local to each node or shared. After a
save the ranks meet at a barrier and then delete their own files of all but
the newest `keep` steps: a set is only deleted once a newer one is complete.

Sets are not re-sharded: a directory whose newest checkpoint was written by a
job of another world size is refused with an error naming both sizes, on every
rank (resuming an older set of this size, or none, would silently lose work).

`ElasticCheckpoint.resume`/`maybe_save` make this one call each in a user's
own training loop (model, optimizer, data position and RNG); the engine uses
`save`/`load_latest` with its trainers' state.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from . import _checks as C
from .io import CheckpointError, atomic_save, load_checkpoint
from .training.collectives import all_gather_int_lists

_STEP_DIR = re.compile(r"^step-(\d+)$")
_RANK_FILE = re.compile(r"^rank\d+-of-(\d+)\.pt$")


def restart_count() -> int:
    """How often torchrun has restarted this job (0 outside torchrun or on the first attempt)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def rng_state() -> dict:
    """The global torch RNG state (and CUDA's where present), for a checkpoint."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` captured (tensors may have been loaded onto any device)."""
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in state["cuda"]])


@dataclass
class Position:
    """Where a resumed loop continues: `batch` batches of `epoch` are done, `step` optimizer steps in all."""
    epoch: int = 0
    batch: int = 0
    step: int = 0
    extra: dict = field(default_factory=dict)
    resumed: bool = False


class ElasticCheckpoint:
    """Checkpoint sets of every rank in `directory`, the newest `keep` kept.

    rank/world default to those of the initialised default process group (0/1
    without torch.distributed; distributed=False forces a single-process set
    even inside a distributed job); every method that takes part in finding
    or pruning sets is collective: call it on every rank.
    """

    def __init__(self, directory, *, every: int | None = None, keep: int = 2, rank: int | None = None,
                 world: int | None = None, distributed: bool | None = None):
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"directory must be a str or os.PathLike, got {type(directory).__name__}")
        self.directory = Path(directory)
        self.every = None if every is None else C.positive_int(every, "every")
        self.keep = C.positive_int(keep, "keep")
        initialised = dist.is_available() and dist.is_initialized()
        if distributed and not initialised:
            raise ValueError("distributed=True needs torch.distributed initialised (init_process_group first)")
        self.distributed = initialised if distributed is None else bool(distributed)
        self.rank = C.non_negative_int(rank if rank is not None else (dist.get_rank() if self.distributed else 0),
                                       "rank")
        self.world = C.positive_int(world if world is not None else
                                    (dist.get_world_size() if self.distributed else 1), "world")
        if self.rank >= self.world:
            raise ValueError(f"rank must lie in 0..{self.world - 1}, got {self.rank}")
        self.last_saved: int | None = None

    # ------------------------------------------------------------ files ----
    def path(self, step: int) -> Path:
        """This rank's file of `step`."""
        return self.directory / f"step-{step:010d}" / f"rank{self.rank}-of-{self.world}.pt"

    def _step_dirs(self):
        """(step, folder) of every step folder in the directory."""
        if not self.directory.is_dir():
            return
        for d in self.directory.iterdir():
            m = _STEP_DIR.match(d.name)
            if m and d.is_dir():
                yield int(m.group(1)), d

    def own_steps(self) -> list[int]:
        """Steps for which this rank's file exists (what this rank sees, no collective)."""
        return sorted(step for step, d in self._step_dirs() if (d / f"rank{self.rank}-of-{self.world}.pt").is_file())

    def _other_world(self) -> tuple[int, int]:
        """(step, world size) of the newest checkpoint file written by a job of another world size, or (-1, 0)."""
        found = [(step, int(m.group(1))) for step, d in self._step_dirs() for f in d.iterdir()
                 if (m := _RANK_FILE.match(f.name)) and int(m.group(1)) != self.world]
        return max(found, default=(-1, 0))

    def complete_steps(self) -> list[int]:
        """Steps whose set is complete on every rank (collective when distributed)."""
        return self._survey()[0]

    def _survey(self) -> tuple[list[int], tuple[int, int]]:
        """The complete steps and the newest other-world checkpoint any rank sees (one collective)."""
        mine, other = self.own_steps(), self._other_world()
        if not (self.distributed and self.world > 1):
            return mine, other
        everyone = all_gather_int_lists([*other, *mine])
        common = set(everyone[0][2:]).intersection(*(e[2:] for e in everyone[1:]))
        return sorted(common), max(tuple(e[:2]) for e in everyone)

    # ------------------------------------------------------ save / load ----
    def save(self, step: int, state: dict) -> Path:
        """Write this rank's `state` for `step` atomically; then (collective) prune sets beyond the newest `keep`."""
        step = C.non_negative_int(step, "step")
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        path = atomic_save({"format": "loft-elastic-1", "step": step, "rank": self.rank, "world": self.world,
                            "state": state}, self.path(step))
        self.last_saved = step
        if self.distributed and self.world > 1:
            dist.barrier()  # every rank has written `step` before anyone deletes an older set
        self._prune()
        return path

    def _prune(self) -> None:
        for old in self.own_steps()[:-self.keep]:
            self.path(old).unlink(missing_ok=True)
            try:  # the last rank to leave a step removes its folder; rmdir refuses a folder still in use
                self.path(old).parent.rmdir()
            except OSError:
                pass

    def load_latest(self, map_location=None) -> tuple[int, dict] | None:
        """(step, this rank's state) of the newest complete set, or None when there is none (collective).

        Sets are not re-sharded: when the newest checkpoint in the directory was
        written by a job of another world size, a CheckpointError names both
        sizes (every rank raises it) rather than silently starting over or
        resuming an older set.
        """
        steps, (other_step, other_world) = self._survey()
        if other_step > (steps[-1] if steps else -1):
            ours = f"; its newest set of world size {self.world} is step {steps[-1]}" if steps else ""
            raise CheckpointError(f"checkpoint directory {str(self.directory)!r} holds checkpoints of a job of world "
                                  f"size {other_world} (newest at step {other_step}), but this job has world size "
                                  f"{self.world}{ours}; checkpoint sets cannot be resumed at another world size: "
                                  f"restart with {other_world} ranks or use another directory")
        if not steps:
            return None
        step = steps[-1]
        path = self.path(step)
        obj = load_checkpoint(path, map_location=map_location)
        if not isinstance(obj, dict) or obj.get("format") != "loft-elastic-1" or obj.get("step") != step:
            raise CheckpointError(f"checkpoint {str(path)!r} is not an elastic checkpoint of step {step}")
        self.last_saved = step
        return step, obj["state"]

    # ------------------------------------------------ one call per loop ----
    def resume(self, model: torch.nn.Module, optimizer=None, map_location=None) -> Position:
        """Restore model, optimizer and RNG from the newest complete set; where to continue (collective).

        Returns Position() (epoch 0, batch 0, step 0, resumed=False) when no
        complete set exists, so a first run and a restarted one share one loop.
        """
        found = self.load_latest(map_location=map_location)
        if found is None:
            return Position()
        step, state = found
        model.load_state_dict(state["model"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        return Position(epoch=state["epoch"], batch=state["batch"], step=step, extra=state["extra"], resumed=True)

    def due(self, step: int, optimizer=None) -> bool:
        """True when `every` steps have passed since the last save and `optimizer` is at a sync boundary.

        A LoFT optimizer (or simulator) is at a sync boundary when its
        `step_in_round` is 0 (right after a sync); any other optimizer always is.
        """
        if self.every is None:
            return False
        boundary = getattr(optimizer, "step_in_round", 0) == 0
        return boundary and step - (self.last_saved or 0) >= self.every

    def maybe_save(self, model: torch.nn.Module, optimizer=None, *, step: int, epoch: int, batch: int,
                   extra: dict | None = None) -> bool:
        """Save model, optimizer, RNG and the data position (`batch` batches of `epoch` done) when `due`.

        Call after every optimizer step, on every rank, with the count of steps so far.
        """
        if not self.due(step, optimizer):
            return False
        self.save(step, {"model": model.state_dict(),
                         "optimizer": None if optimizer is None else optimizer.state_dict(),
                         "rng": rng_state(), "epoch": int(epoch), "batch": int(batch), "extra": dict(extra or {})})
        return True
