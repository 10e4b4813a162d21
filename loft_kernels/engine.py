"""Training and evaluation loops: dense, LoFT simulated in one process, LoFT with torch.distributed ranks.

A `Trainer` owns a model and whatever steps it (an SGD optimizer, a
`LoftSimulator`, or a `LoftOptimizer` on this rank) and trains one epoch at a
time on a seeded `BatchLoader`; LoFT trainers sync at the end of every epoch
(`finalize()`), so after `train_epoch` the model is the full pretrained model
(the thing the tracker snapshots and evaluation measures). `fit` runs the
epoch loop with snapshots, metrics and a checkpoint after every epoch;
`save_run`/`load_run` hold everything a killed run needs to continue exactly
(model, optimizer or simulator state, the RNG, the tracker, the history):
batches depend only on (seed, epoch, worker, batch), so a run resumed at an
epoch boundary sees the same data as an uninterrupted one.

Model files (`save_model`/`load_model`) carry a `spec` (zoo name and
constructor arguments, group policy, input shape) so the CLI can rebuild the
architecture, its filter groups and, for tickets, the pruned structure.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import functools
import io
import itertools
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import _checks as C
from .data import BatchLoader, Dataset
from .io import atomic_save, atomic_write_text, load_checkpoint
from .models import get_model
from .tickets import FilterTracker, detect_emergence, prune
from .training import FilterGroup, LoftOptimizer, LoftSimulator, convert, dense

METHODS = ("dense", "loft")
SCHEDULES = ("constant", "cosine")


# ---------------------------------------------------------------- config ----
@dataclass(frozen=True)
class TrainConfig:
    """How to train: method ("dense" or "loft"), LoFT settings and the SGD hyper-parameters.

    workers/distributed/sync_every/state apply to "loft" (S workers simulated in
    one process, or one process per worker under torchrun with distributed=True).
    schedule: "constant" learning rate (the official LoFT pretraining) or
    "cosine" annealing to 0 over `epochs` (fine-tuning).
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

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
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


# ----------------------------------------------------------------- models ----
def build_model(spec: dict) -> tuple[nn.Module, list[FilterGroup]]:
    """The zoo model `spec` describes, converted (Loft layers in its filter groups), and the groups.

    spec: {"model": zoo name, "kwargs": constructor arguments, "input_shape": [C, H, W],
    "policy": "all" | "paper", "include": patterns or None, "exclude": patterns or None}.
    Initial weights come from torch's global RNG: seed it first for a reproducible model.
    """
    if not isinstance(spec, dict) or not {"model", "kwargs", "input_shape", "policy"} <= set(spec):
        raise ValueError("spec must be a dict with model, kwargs, input_shape, policy (see build_model)")
    model = get_model(spec["model"], **spec["kwargs"])
    example = torch.zeros(2, *spec["input_shape"])
    return convert(model, example, spec["policy"], spec.get("include"), spec.get("exclude"))


def model_spec(name: str, dataset: Dataset, *, width: float = 1.0, policy: str = "all",
               include=None, exclude=None) -> dict:
    return {"model": name, "kwargs": {"num_classes": dataset.num_classes, "in_channels": dataset.in_channels,
                                      "width": float(width)},
            "input_shape": [dataset.in_channels, *dataset.image_size], "policy": policy,
            "include": list(include) if include else None, "exclude": list(exclude) if exclude else None}


def groups_to_list(groups) -> list[dict]:
    return [{"name": g.name, "conv_a": g.conv_a, "norms": list(g.norms), "conv_b": g.conv_b, "n": int(g.n)}
            for g in groups]


def groups_from_list(items) -> list[FilterGroup]:
    return [FilterGroup(d["name"], d["conv_a"], tuple(d["norms"]), d["conv_b"], int(d["n"])) for d in items]


def save_model(path, model: nn.Module, spec: dict, groups, **extra) -> None:
    """A model file: spec, groups, state_dict and `extra` (e.g. kept indices of a ticket), written atomically."""
    atomic_save({"spec": spec, "groups": groups_to_list(groups),
                 "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, **extra}, path)


def load_model_file(path, what: str = "model file") -> dict:
    try:
        obj = load_checkpoint(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist") from None
    except Exception as exc:  # a truncated or foreign file
        raise ValueError(f"{what} {str(path)!r} is not a loft_kernels model file: {type(exc).__name__}: {exc}") \
            from None
    if not isinstance(obj, dict) or not {"spec", "groups", "state_dict"} <= set(obj):
        raise ValueError(f"{what} {str(path)!r} is not a loft_kernels model file (needs spec, groups, state_dict); "
                         f"use a model.pt written by `loft pretrain` or a ticket.pt written by `loft prune`")
    return obj


def full_model(obj: dict) -> tuple[nn.Module, list[FilterGroup]]:
    """The full-size model of a model file, weights loaded."""
    model, groups = build_model(obj["spec"])
    model.load_state_dict(obj["state_dict"])
    return model, groups_from_list(obj["groups"])


def ticket_model(obj: dict) -> nn.Module:
    """The pruned model of a ticket file (`save_model(..., kept=..., ratio=...)`), weights loaded."""
    if "kept" not in obj or "ratio" not in obj:
        raise ValueError("this model file is not a ticket (no kept filters): use the ticket.pt written by "
                         "`loft prune`")
    pruned = pruned_skeleton(obj["spec"], groups_from_list(obj["groups"]), obj["kept"], float(obj["ratio"]))
    pruned.load_state_dict(obj["state_dict"])
    return pruned


def pruned_skeleton(spec: dict, groups, kept: dict, ratio: float) -> nn.Module:
    """The architecture of a ticket drawn at `ratio` keeping `kept` (load the ticket's state_dict into it)."""
    model, _ = build_model(spec)
    # Scores that rank exactly the kept filters first make `prune` rebuild that structure.
    scores = {}
    for g in groups:
        s = torch.zeros(g.n)
        s[kept[g.name].long()] = 1.0
        scores[g.name] = s
    pruned, got = prune(model, groups, ratio, criterion=scores)
    for g in groups:
        if not torch.equal(got[g.name], kept[g.name].long().sort().values):
            raise ValueError(f"kept: group {g.name!r} keeps {len(kept[g.name])} of {g.n} filters, "
                             f"not what ratio {ratio} keeps")
    return pruned


# ------------------------------------------------------------- evaluation ----
def cross_entropy(outputs, targets):
    return F.cross_entropy(outputs, targets)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, device=None, batch_size: int = 500) -> dict:
    """{"loss": mean cross-entropy, "acc": accuracy in percent} of the full model (all filters) in eval mode."""
    C.tensor(x, "x", ndim=4, floating=True)
    C.tensor(y, "y", ndim=1)
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"x and y must hold the same non-zero number of samples, got {x.shape[0]} and {y.shape[0]}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    try:
        with dense(model):
            for i in range(0, x.shape[0], batch_size):
                xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
                out = model(xb)
                loss_sum += float(F.cross_entropy(out, yb, reduction="sum"))
                correct += int((out.argmax(1) == yb).sum())
    finally:
        model.train(was_training)
    return {"loss": loss_sum / x.shape[0], "acc": 100.0 * correct / x.shape[0]}


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
        self.model, self.dataset, self.cfg, self.seed, self.device = model, dataset, cfg, seed, torch.device(device)
        self.loader = BatchLoader(dataset.train_x, dataset.train_y, cfg.batch_size, seed=seed,
                                  augment=dataset.augment, workers=workers, device=self.device)
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

    def train_epoch(self, epoch: int, *, progress: bool = False) -> dict:
        """Train epoch `epoch` (0-based); returns {"train_loss", "train_acc", "lr", "seconds"}."""
        self.model.train()
        t0 = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        iters = itertools.islice(self._batches(epoch), self.steps_per_epoch)
        for b, batch in enumerate(_progress(iters, progress, self.steps_per_epoch, f"epoch {epoch + 1}")):
            lr = self.lr_at(epoch * self.steps_per_epoch + b)
            self._set_lr(lr)
            ls, c, n = self._step(batch)
            loss_sum, correct, seen = loss_sum + ls, correct + c, seen + n
        self._end_epoch()
        return {"train_loss": loss_sum / max(seen, 1), "train_acc": 100.0 * correct / max(seen, 1), "lr": lr,
                "seconds": time.perf_counter() - t0}

    def comm_stats(self) -> Optional[dict]:
        return None

    # subclasses: _optimizers, _batches, _step -> (loss sum, correct, samples), _end_epoch, state_dict, load_state_dict
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

    def _batches(self, epoch):
        return self.loader.epoch(epoch)

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
                                 seed=seed, state=cfg.state)

    def _optimizers(self):
        return self.sim.optimizers

    def _batches(self, epoch):
        return zip(*(self.loader.epoch(epoch, worker=s) for s in range(self.cfg.workers)))

    def _step(self, batches):
        stats = [0, 0]

        def loss_fn(out, y):  # also counts correct predictions of every worker
            stats[0] += int((out.detach().argmax(1) == y).sum())
            stats[1] += len(y)
            return F.cross_entropy(out, y)

        losses = self.sim.step(list(batches), loss_fn)
        return sum(float(loss) * len(b[1]) for loss, b in zip(losses, batches)), stats[0], stats[1]

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

    def _batches(self, epoch):
        return self.loader.epoch(epoch, worker=self.rank)

    def _step(self, batch):
        return _sgd_step(self.model, self.optimizer, batch)

    def train_epoch(self, epoch, *, progress=False):
        row = super().train_epoch(epoch, progress=progress)
        # Training loss/accuracy of the whole step = mean over ranks (every rank saw its own shard).
        t = torch.tensor([row["train_loss"], row["train_acc"]], dtype=torch.float64, device=_comm_device())
        dist.all_reduce(t)
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


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def make_trainer(model: nn.Module, groups, dataset: Dataset, cfg: TrainConfig, *, seed: int, device) -> Trainer:
    if cfg.method == "dense":
        return DenseTrainer(model, dataset, cfg, seed=seed, device=device)
    if cfg.distributed:
        return DistributedLoftTrainer(model, groups, dataset, cfg, seed=seed, device=device)
    return SimulatedLoftTrainer(model, groups, dataset, cfg, seed=seed, device=device)


def init_distributed(device_text: str = "auto") -> tuple[int, int, torch.device]:
    """Join the torchrun job from its environment: (rank, world size, this rank's device).

    gloo on CPU, NCCL on GPU (cuda:LOCAL_RANK). Raises ValueError outside torchrun.
    """
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ValueError(f"--distributed needs the torchrun environment (missing {', '.join(missing)}); "
                         f"launch with: torchrun --nproc_per_node S -m loft_kernels pretrain --distributed ...")
    use_cuda = torch.cuda.is_available() if device_text == "auto" else device_text.startswith("cuda")
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


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


def fit(trainer: Trainer, *, epochs: int, start_epoch: int = 0, history: Optional[list] = None,
        tracker=None, on_epoch: Optional[Callable[[int, list], bool]] = None, progress: bool = False) -> list[dict]:
    """Train epochs start_epoch+1 .. epochs; after each: evaluate, snapshot `tracker` (tag = epoch), call on_epoch.

    on_epoch(epoch, history) runs after the snapshot, with the new row already
    appended to history (write metrics, checkpoint), and returns True to stop
    early (e.g. when a ticket emerged). Returns the history (one row per
    finished epoch, those of `history` first).
    """
    history = list(history or [])
    ds = trainer.dataset
    for e in range(start_epoch, epochs):
        row = {"epoch": e + 1, **trainer.train_epoch(e, progress=progress)}
        test = evaluate(trainer.model, ds.test_x, ds.test_y, device=trainer.device)
        row.update(test_loss=test["loss"], test_acc=test["acc"])
        stats = trainer.comm_stats()
        if stats is not None:
            row["comm_bytes_sent"] = int(stats["bytes_sent"])
        if tracker is not None:
            tracker.snapshot(e + 1)
        history.append(row)
        if on_epoch is not None and on_epoch(e + 1, history):
            break
    return history


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: BatchLoader, *, epoch: int = 0) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics of the full model from one pass over `loader`.

    A LoFT worker's conv_b sums only its 1/S of the input channels (no 1/S
    rescaling, as in the official code), so the running statistics of the layers
    after it describe sub-model activations; the full model's are about S times
    larger. One forward pass in train mode (cumulative averages, no gradients)
    measures the full model's. Modifies `model` in place and returns it.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m, m.momentum) for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the pass
    model.train()
    try:
        with dense(model):
            for x, _ in loader.epoch(epoch):
                model(x)
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.train(was_training)
    return model


# ------------------------------------------------------- resumable runs ----
PRETRAIN_FILES = ("config.json", "metrics.json", "metrics.csv", "checkpoint.pt", "init.pt", "epoch_<e>.pt",
                  "model.pt", "tracker.pt", "summary.json")


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


def emergence_epochs(tracker: FilterTracker, opts: dict) -> dict:
    """{"footrule": epoch or None, "mask": epoch or None}: where each criterion fired over the snapshots so far.

    opts: {"mask_ratio", "footrule_threshold", "footrule_window"} (see `lk.detect_emergence`).
    """
    if len(tracker) == 0:
        return {"footrule": None, "mask": None}
    return {"footrule": detect_emergence(tracker, "footrule", threshold=opts["footrule_threshold"],
                                         window=opts["footrule_window"]),
            "mask": detect_emergence(tracker, "mask", ratio=opts["mask_ratio"])}


DEFAULT_EMERGENCE = {"mask_ratio": 0.5, "footrule_threshold": 0.1, "footrule_window": 3}


def _all_ranks_sum(value: int) -> int:
    t = torch.tensor([int(value)], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t)
    return int(t.item())


def pretrain_run(out, *, dataset: Dataset, spec: dict, cfg: TrainConfig, seed: int, device,
                 emergence: Optional[dict] = None, stop_at: Optional[str] = None, keep_epochs=(),
                 resume: bool = False, progress: bool = False, log: Optional[Callable[[str], None]] = None) -> dict:
    """Pretrain the model of `spec` on `dataset` into directory `out`, resumable; returns the summary.

    The tracker snapshots the filter scores of the initial weights (tag 0)
    and after every epoch (tag = epoch). Files (rank 0 writes all but its own
    checkpoint): init.pt (initial weights), epoch_<e>.pt for e in keep_epochs, metrics.json/csv and
    checkpoint.pt (checkpoint.rank<r>.pt when distributed) after every epoch,
    and at the end model.pt, tracker.pt (filter scores of every epoch) and
    summary.json. With resume=True an existing checkpoint is continued (a
    finished run just returns its summary). stop_at ("footrule" or "mask")
    ends training at the epoch that criterion fires. Every rank of a
    distributed run calls this with the same arguments.
    """
    out = Path(out)
    emergence = {**DEFAULT_EMERGENCE, **(emergence or {})}
    if stop_at is not None and stop_at not in ("footrule", "mask"):
        raise ValueError(f"stop_at must be None, 'footrule' or 'mask', got {stop_at!r}")
    if resume and (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    rank = dist.get_rank() if cfg.distributed else 0
    torch.manual_seed(seed)  # the initial weights: identical on every rank and for every method
    model, groups = build_model(spec)
    if rank == 0 and not (out / "init.pt").is_file():
        save_model(out / "init.pt", model, spec, groups, epoch=0)
    trainer = make_trainer(model, groups, dataset, cfg, seed=seed, device=device)
    tracker = FilterTracker(trainer.model, groups)
    ckpt = out / (f"checkpoint.rank{rank}.pt" if cfg.distributed else "checkpoint.pt")
    start, history, seconds = 0, [], 0.0
    if resume and ckpt.is_file():
        start, extra = load_run(ckpt, trainer)
        history, seconds = extra["history"], extra["seconds"]
        tracker.load_state_dict(extra["tracker"])
    else:
        # Epoch 0 = the initial weights: the footrule's first distance F(1, 0) is the big early reshuffle
        # (the poster's curves start at 30-60), which the relative emergence threshold is a fraction of.
        tracker.snapshot(0)
    if cfg.distributed and resume and _all_ranks_sum(start) != start * dist.get_world_size():
        raise ValueError(f"resume: the ranks' checkpoints in {str(out)!r} are at different epochs (a rank was killed "
                         f"while writing); start the run again without resuming")
    found = emergence_epochs(tracker, emergence)
    t_start = time.perf_counter() - seconds

    def on_epoch(epoch: int, hist: list) -> bool:
        nonlocal found
        row = hist[-1]
        found = emergence_epochs(tracker, emergence)
        row["emerged_footrule"], row["emerged_mask"] = found["footrule"], found["mask"]
        if rank == 0:
            if epoch in keep_epochs:
                save_model(out / f"epoch_{epoch:03d}.pt", trainer.model, spec, groups, epoch=epoch)
            write_metrics(out, hist)
        save_run(ckpt, epoch=epoch, trainer=trainer,
                 extra={"history": hist, "seconds": time.perf_counter() - t_start, "tracker": tracker.state_dict()})
        if log is not None:
            fired = "".join(f"  [{c} criterion fired]" for c, e in found.items() if e == epoch)
            log(f"epoch {epoch}/{cfg.epochs}: loss {row['train_loss']:.4f}  test acc {row['test_acc']:.2f}%  "
                f"({row['seconds']:.1f}s){fired}")
        return stop_at is not None and found[stop_at] is not None

    if stop_at is None or found[stop_at] is None:
        history = fit(trainer, epochs=cfg.epochs, start_epoch=start, history=history, tracker=tracker,
                      on_epoch=on_epoch, progress=progress)
    seconds = time.perf_counter() - t_start
    stats = trainer.comm_stats()
    recal = evaluate(recalibrate_bn(copy.deepcopy(trainer.model), trainer.loader), dataset.test_x, dataset.test_y,
                     device=trainer.device)
    mean_epoch = sum(r["seconds"] for r in history) / len(history)
    summary = {
        "method": "dense" if cfg.method == "dense" else f"loft-{cfg.workers}",
        "seed": seed, "epochs_planned": cfg.epochs, "epochs_run": len(history),
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
            _all_ranks_sum(stats["bytes_sent"]) if cfg.distributed else int(stats["bytes_sent"]) * cfg.workers),
        "groups": [g.name for g in groups],
        "samples_per_epoch": trainer.samples_per_epoch,
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
    model, groups = full_model(load_model_file(out / "model.pt", "pretrained model"))
    tracker = FilterTracker(model, groups)
    try:
        tracker.load_state_dict(load_checkpoint(out / "tracker.pt"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{str(out / 'tracker.pt')!r} does not exist; {str(out)!r} must be the output "
                                f"directory of a finished pretraining run") from None
    return model, groups, tracker


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
