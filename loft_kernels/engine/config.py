"""How to train: `TrainConfig` (method, LoFT settings, SGD hyper-parameters), checked on construction."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch

from .. import _checks as C
from ..training.simulator import EXECUTIONS

METHODS = ("dense", "loft")
SCHEDULES = ("constant", "cosine")
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")


def resolve_memory_format(name: str, device) -> torch.memory_format:
    """The layout a trainer puts its model's 4-D tensors and its image batches in.

    "auto" is channels-last on a CPU, where every model of the zoo measured trained
    faster in it (docs/kernels.md, "Memory format"), and the contiguous layout on any
    other device, where it has not been measured.
    """
    if not isinstance(name, str) or name not in MEMORY_FORMATS:
        raise ValueError(f"memory_format must be one of {MEMORY_FORMATS}, got {name!r}")
    if name == "auto":
        name = "channels_last" if torch.device(device).type == "cpu" else "contiguous"
    return torch.channels_last if name == "channels_last" else torch.contiguous_format


@dataclass(frozen=True)
class TrainConfig:
    """How to train: method ("dense" or "loft"), LoFT settings and the SGD hyper-parameters.

    workers/distributed/sync_every/state apply to "loft" (S workers simulated in
    one process, or one process per worker under torchrun with distributed=True).
    schedule: "constant" learning rate (the official LoFT pretraining) or
    "cosine" annealing to 0 over `epochs` (fine-tuning). execution: how simulated
    workers run (`LoftSimulator`'s execution; the same results either way).
    memory_format: the layout of the model's 4-D tensors and of the batches
    (`resolve_memory_format`; "auto": channels-last on a CPU).
    """
    method: str = "dense"
    epochs: int = 10
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "constant"
    workers: int = 1
    distributed: bool = False
    sync_every: int = 15
    state: str = "reset"
    max_steps: Optional[int] = None  # stop every epoch after this many steps (smoke runs of big recipes)
    execution: str = "auto"
    memory_format: str = "auto"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.execution not in EXECUTIONS:
            raise ValueError(f"execution must be one of {EXECUTIONS}, got {self.execution!r}")
        if self.memory_format not in MEMORY_FORMATS:
            raise ValueError(f"memory_format must be one of {MEMORY_FORMATS}, got {self.memory_format!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        C.positive_int(self.epochs, "epochs")
        C.positive_int(self.batch_size, "batch_size")
        C.positive_int(self.workers, "workers")
        C.positive_int(self.sync_every, "sync_every")
        for name in ("lr", "momentum", "weight_decay"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.lr == 0:
            raise ValueError("lr must be > 0")
        if self.max_steps is not None:
            C.positive_int(self.max_steps, "max_steps")
        if self.state not in ("reset", "keep"):
            raise ValueError(f"state must be 'reset' or 'keep', got {self.state!r}")
        if self.method == "dense" and (self.workers != 1 or self.distributed):
            raise ValueError("workers/distributed apply to method='loft' only; dense training is one worker")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
