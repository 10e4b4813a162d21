"""Trainers: dense SGD, LoFT simulated in one process, LoFT with one torch.distributed rank per worker.

A `Trainer` owns a model and whatever steps it (an SGD optimizer, a
`LoftSimulator`, or a `LoftOptimizer` on this rank) and trains one epoch at a
time on a seeded `BatchLoader`; LoFT trainers sync at the end of every epoch
(`finalize()`), so after `train_epoch` the model is the full pretrained model.
Batches depend only on (seed, epoch, worker, batch), so a run resumed at an
epoch boundary sees the same data as an uninterrupted one.
"""
from __future__ import annotations

import functools
import itertools
import math
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..data import BatchLoader, Dataset
from ..training import LoftOptimizer, LoftSimulator
from ..training.collectives import all_reduce, comm_device
from .config import TrainConfig, resolve_memory_format


# --------------------------------------------------------------- trainers ----
def _progress(iterable, enabled: bool, total: int, desc: str):
    if not enabled:
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


class Trainer:
    """Base: one epoch at a time on `dataset`'s training split; `model` is the full model after each epoch."""

    def __init__(self, model: nn.Module, dataset: Dataset, cfg: TrainConfig, *, seed: int, device: torch.device,
                 workers: int = 1):
        self.dataset, self.cfg, self.seed, self.device = dataset, cfg, seed, torch.device(device)
        self.memory_format = resolve_memory_format(cfg.memory_format, self.device)
        self.model = model.to(memory_format=self.memory_format)  # in place: the parameters keep their identity
        self.loader = BatchLoader(dataset.train_x, dataset.train_y, cfg.batch_size, seed=seed,
                                  augment=dataset.augment, workers=workers, device=self.device,
                                  memory_format=self.memory_format)
        self.steps_per_epoch = min(len(self.loader), cfg.max_steps or len(self.loader))
        # Samples all workers together consume per epoch (what GPipe would move through its stages).
        self.samples_per_epoch = min(self.loader.shard_size, self.steps_per_epoch * cfg.batch_size) * workers

    def lr_at(self, step: int) -> float:
        """Learning rate for global step `step` (0-based) of the whole run."""
        if self.cfg.schedule == "constant":
            return self.cfg.lr
        total = self.cfg.epochs * self.steps_per_epoch
        return 0.5 * self.cfg.lr * (1.0 + math.cos(math.pi * min(step, total) / total))

    def _set_lr(self, lr: float) -> None:
        for opt in self._optimizers():
            for group in opt.param_groups:
                group["lr"] = lr

    def train_epoch(self, epoch: int, *, progress: bool = False, start: int = 0, partial: Optional[dict] = None,
                    on_step: Optional[Callable[[int, int, dict], None]] = None) -> dict:
        """Train epoch `epoch` (0-based); returns {"train_loss", "train_acc", "lr", "seconds"}.

        start: batches of this epoch already trained (a mid-epoch resume) and
        partial their running sums {"loss_sum", "correct", "seen"}, so the
        epoch's row equals an uninterrupted one. on_step(epoch, batches done,
        running sums) runs after every step (mid-epoch checkpoints).
        """
        if not 0 <= start <= self.steps_per_epoch:
            raise ValueError(f"start must lie in 0..{self.steps_per_epoch}, got {start}")
        self.model.train()
        t0 = time.perf_counter()
        sums = dict(partial) if partial else {"loss_sum": 0.0, "correct": 0, "seen": 0}
        lr = self.lr_at(epoch * self.steps_per_epoch + max(start - 1, 0))
        iters = itertools.islice(self._batches(epoch, start), self.steps_per_epoch - start)
        bar = _progress(iters, progress, self.steps_per_epoch - start, f"epoch {epoch + 1}")
        for b, batch in enumerate(bar, start=start):
            lr = self.lr_at(epoch * self.steps_per_epoch + b)
            self._set_lr(lr)
            ls, c, n = self._step(batch)
            sums = {"loss_sum": sums["loss_sum"] + ls, "correct": sums["correct"] + c, "seen": sums["seen"] + n}
            if on_step is not None:
                on_step(epoch, b + 1, sums)
        self._end_epoch()
        seen = max(sums["seen"], 1)
        return {"train_loss": sums["loss_sum"] / seen, "train_acc": 100.0 * sums["correct"] / seen, "lr": lr,
                "seconds": time.perf_counter() - t0}

    def at_sync_boundary(self) -> bool:
        """True when no LoFT round is in flight: every worker holds the full synced model (checkpoint here)."""
        return True

    def comm_stats(self) -> Optional[dict]:
        return None

    # subclasses: _optimizers, _batches(epoch, start), _step -> (loss sum, correct, samples), _end_epoch,
    # state_dict, load_state_dict
    def _end_epoch(self) -> None:
        pass


def _sgd_step(model: nn.Module, optimizer, batch) -> tuple[float, int, int]:
    """One optimizer step on (x, y); returns (loss x samples, correct predictions, samples)."""
    x, y = batch
    out = model(x)
    loss = F.cross_entropy(out, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach()) * len(y), int((out.detach().argmax(1) == y).sum()), len(y)


def _sgd(cfg: TrainConfig) -> Callable:
    return functools.partial(torch.optim.SGD, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


class DenseTrainer(Trainer):
    """Plain SGD on one device (dense pretraining and fine-tuning)."""

    def __init__(self, model, dataset, cfg, *, seed, device):
        super().__init__(model.to(device), dataset, cfg, seed=seed, device=device)
        self.optimizer = _sgd(cfg)(self.model.parameters())

    def _optimizers(self):
        return [self.optimizer]

    def _batches(self, epoch, start):
        return self.loader.epoch(epoch, start=start)

    def _step(self, batch):
        return _sgd_step(self.model, self.optimizer, batch)

    def state_dict(self):
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, sd):
        self.model.load_state_dict(sd["model"])
        self.optimizer.load_state_dict(sd["optimizer"])


class SimulatedLoftTrainer(Trainer):
    """LoFT with `cfg.workers` workers simulated in one process (`LoftSimulator`); worker s trains on shard s."""

    def __init__(self, model, groups, dataset, cfg, *, seed, device):
        super().__init__(model.to(device), dataset, cfg, seed=seed, device=device, workers=cfg.workers)
        self.sim = LoftSimulator(self.model, groups, _sgd(cfg), workers=cfg.workers, sync_every=cfg.sync_every,
                                 seed=seed, state=cfg.state, execution=cfg.execution)

    def _optimizers(self):
        return self.sim.optimizers

    def _batches(self, epoch, start):
        return zip(*(self.loader.epoch(epoch, worker=s, start=start) for s in range(self.cfg.workers)))

    def at_sync_boundary(self):
        return self.sim.step_in_round == 0

    def _step(self, batches):
        calls = []

        def loss_fn(out, y):  # also counts correct predictions
            calls.append((int((out.detach().argmax(1) == y).sum()), len(y)))
            return F.cross_entropy(out, y)

        losses = self.sim.step(list(batches), loss_fn)
        # The simulator may call loss_fn before the step too (a no-grad trial run of a new batch shape):
        # the last S calls are the workers' training steps.
        stats = calls[-self.cfg.workers:]
        return (sum(float(loss) * len(b[1]) for loss, b in zip(losses, batches)), sum(c for c, _ in stats),
                sum(n for _, n in stats))

    def _end_epoch(self):
        self.sim.finalize()

    def comm_stats(self):
        return self.sim.comm_stats()

    def state_dict(self):
        return {"simulator": self.sim.state_dict()}

    def load_state_dict(self, sd):
        self.sim.load_state_dict(sd["simulator"])


class DistributedLoftTrainer(Trainer):
    """LoFT with one process per worker: this rank trains shard `rank` with a `LoftOptimizer`.

    torch.distributed must be initialised (see `init_distributed`) with world size = cfg.workers.
    """

    def __init__(self, model, groups, dataset, cfg, *, seed, device):
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("distributed=True needs torch.distributed initialised (run under torchrun)")
        if dist.get_world_size() != cfg.workers:
            raise ValueError(f"workers ({cfg.workers}) must equal the number of processes "
                             f"({dist.get_world_size()}); run with torchrun --nproc_per_node {cfg.workers}")
        super().__init__(model.to(device), dataset, cfg, seed=seed, device=device, workers=cfg.workers)
        self.rank = dist.get_rank()
        self.optimizer = LoftOptimizer(_sgd(cfg)(self.model.parameters()), self.model, groups, cfg.sync_every,
                                       seed, cfg.state)

    def _optimizers(self):
        return [self.optimizer]

    def _batches(self, epoch, start):
        return self.loader.epoch(epoch, worker=self.rank, start=start)

    def at_sync_boundary(self):
        return self.optimizer.step_in_round == 0

    def _step(self, batch):
        return _sgd_step(self.model, self.optimizer, batch)

    def train_epoch(self, epoch, **kwargs):
        row = super().train_epoch(epoch, **kwargs)
        # Training loss/accuracy of the whole step = mean over ranks (every rank saw its own shard).
        t = all_reduce(torch.tensor([row["train_loss"], row["train_acc"]], dtype=torch.float64, device=comm_device()))
        row["train_loss"], row["train_acc"] = (t / dist.get_world_size()).tolist()
        return row

    def _end_epoch(self):
        self.optimizer.finalize()

    def comm_stats(self):
        return self.optimizer.comm_stats()

    def state_dict(self):
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, sd):
        self.model.load_state_dict(sd["model"])
        self.optimizer.load_state_dict(sd["optimizer"])


def make_trainer(model: nn.Module, groups, dataset: Dataset, cfg: TrainConfig, *, seed: int, device) -> Trainer:
    if cfg.method == "dense":
        return DenseTrainer(model, dataset, cfg, seed=seed, device=device)
    if cfg.distributed:
        return DistributedLoftTrainer(model, groups, dataset, cfg, seed=seed, device=device)
    return SimulatedLoftTrainer(model, groups, dataset, cfg, seed=seed, device=device)
