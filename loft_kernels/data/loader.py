"""Random crop + flip augmentation and a seeded, sharded batch loader."""
from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _checks as C


def random_crop_flip(x: Tensor, generator: torch.Generator, padding: int = 4) -> Tensor:
    """Standard CIFAR augmentation on a batch [N, C, H, W]: random crop after zero padding, then random h-flip.

    Zero padding is applied to the normalised images (i.e. the mean colour).
    Offsets and flips are drawn from `generator` (a CPU torch.Generator), so
    the result is a function of the generator's state, on any device.
    """
    C.tensor(x, "x", ndim=4)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    padding = C.non_negative_int(padding, "padding")
    n, _, h, w = x.shape
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=generator.device)
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=generator.device)
    flip = torch.rand(n, generator=generator, device=generator.device) < 0.5
    rows = oy[:, None] + torch.arange(h, device=generator.device)              # [N, H]
    base = torch.arange(w, device=generator.device)
    cols = ox[:, None] + torch.where(flip[:, None], w - 1 - base, base)         # [N, W]
    padded = F.pad(x, (padding, padding, padding, padding))
    dev = x.device
    return padded[torch.arange(n, device=dev)[:, None, None, None],
                  torch.arange(x.shape[1], device=dev)[None, :, None, None],
                  rows.to(dev)[:, None, :, None], cols.to(dev)[:, None, None, :]]


# ----------------------------------------------------------------- loader ----
def _generator(*key: int) -> torch.Generator:
    # SeedSequence mixes (seed, epoch, worker, batch) into independent streams.
    state = np.random.SeedSequence(list(key)).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


class BatchLoader:
    """Seeded mini-batches over tensors, with per-worker shards for LoFT.

    Epoch e draws one permutation from (seed, e) (identity if shuffle=False);
    worker s of `workers` takes every `workers`-th entry starting at s, all
    shards cut to the same length (N // workers) so workers stay in step. The
    augmentation of batch b comes from its own generator seeded by
    (seed, e, s, b), so `epoch(e, worker, start=b)` resumes mid-epoch exactly.
    Batches come in `memory_format` (e.g. `torch.channels_last`; None: as indexed).
    """

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False, augment: bool = False, workers: int = 1, device=None,
                 memory_format: Optional[torch.memory_format] = None):
        C.tensor(x, "x", ndim=4, floating=True)
        C.tensor(y, "y", ndim=1)
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"y must have one label per image ({x.shape[0]}), got {y.shape[0]}")
        for flag, value in (("shuffle", shuffle), ("drop_last", drop_last), ("augment", augment)):
            if not isinstance(value, bool):
                raise TypeError(f"{flag} must be a bool, got {type(value).__name__}")
        self.x, self.y = x, y
        self.batch_size = C.positive_int(batch_size, "batch_size")
        self.seed = C.non_negative_int(seed, "seed")
        self.workers = C.positive_int(workers, "workers")
        self.shuffle, self.drop_last, self.augment = shuffle, drop_last, augment
        self.device = None if device is None else torch.device(device)
        self.memory_format = C.memory_format(memory_format, "memory_format")
        self.shard_size = x.shape[0] // self.workers
        if self.shard_size == 0:
            raise ValueError(f"workers ({self.workers}) must not exceed the number of images ({x.shape[0]})")
        if drop_last and self.shard_size < self.batch_size:
            raise ValueError(f"batch_size ({self.batch_size}) exceeds the {self.shard_size} images per worker, "
                             "so drop_last=True would yield no batches")

    def __len__(self) -> int:
        """Batches per worker per epoch."""
        full, rest = divmod(self.shard_size, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def epoch(self, epoch: int, worker: int = 0, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield (images, labels) batches of `worker` in `epoch`, from batch index `start`."""
        epoch = C.non_negative_int(epoch, "epoch")
        worker = C.non_negative_int(worker, "worker")
        if worker >= self.workers:
            raise ValueError(f"worker must lie in [0, {self.workers}), got {worker}")
        start = C.non_negative_int(start, "start")
        if start > len(self):
            raise ValueError(f"start must be <= {len(self)} (batches per epoch), got {start}")
        n = self.x.shape[0]
        order = torch.randperm(n, generator=_generator(self.seed, epoch)) if self.shuffle else torch.arange(n)
        shard = order[worker::self.workers][:self.shard_size]
        return self._batches(shard, epoch, worker, start)

    def _batches(self, shard, epoch, worker, start):
        for b in range(start, len(self)):
            idx = shard[b * self.batch_size:(b + 1) * self.batch_size].to(self.x.device)
            xb, yb = self.x[idx], self.y[idx]
            if self.device is not None:
                xb, yb = xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True)
            if self.augment:
                xb = random_crop_flip(xb, _generator(self.seed, epoch, worker, b))
            if self.memory_format is not None:
                xb = xb.contiguous(memory_format=self.memory_format)
            yield xb, yb


