"""The tensors every dataset is held as, normalised by its training split's per-channel statistics."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class Dataset:
    name: str
    train_x: Tensor          # [N, C, H, W] float32, normalised
    train_y: Tensor          # [N] int64
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]  # per-channel statistics of the raw training images
    std: tuple[float, ...]
    augment: bool            # whether random crop + flip is the standard training augmentation here


def normalised(name, train_x, train_y, test_x, test_y, num_classes, augment) -> Dataset:
    var, mean = torch.var_mean(train_x, dim=(0, 2, 3), unbiased=False)
    std = var.sqrt().clamp_min(1e-8)
    shape = (1, -1, 1, 1)
    for x in (train_x, test_x):  # in place: CIFAR-10 as float32 is 0.7 GB, no second copy
        x.sub_(mean.view(shape)).div_(std.view(shape))
    return Dataset(name, train_x, train_y.long(), test_x, test_y.long(), num_classes, train_x.shape[1],
                   tuple(train_x.shape[2:]), tuple(mean.tolist()), tuple(std.tolist()), augment)




def stratified_subset(dataset: Dataset, n: int, *, seed: int = 0, split: str = "train") -> Dataset:
    """`dataset` with `n` images of `split` ("train" or "test"), the same share of each class, drawn by `seed`.

    Each class gets n * (its share of the split), rounded so the total is n; the
    other split is kept whole. The normalisation statistics stay those of the
    full training split.
    """
    if not isinstance(dataset, Dataset):
        raise TypeError(f"dataset must be a loft_kernels Dataset, got {type(dataset).__name__}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    x, y = getattr(dataset, f"{split}_x"), getattr(dataset, f"{split}_y")
    total = y.shape[0]
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= total:
        raise ValueError(f"n must be an int in [1, {total}] (the {split} images of {dataset.name}), got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if n == total:
        return dataset
    g = torch.Generator().manual_seed(seed)
    counts = torch.bincount(y, minlength=dataset.num_classes)
    share = counts.double() * n / total
    quota = share.floor().long()
    # hand the rounding remainder to the classes with the largest fractional parts
    quota[(share - quota).argsort(descending=True, stable=True)[:n - int(quota.sum())]] += 1
    picked = []
    for c in range(dataset.num_classes):
        members = (y == c).nonzero().flatten()
        picked.append(members[torch.randperm(len(members), generator=g)[:int(quota[c])]])
    order = torch.cat(picked).sort().values  # keep the file order
    return replace(dataset, **{f"{split}_x": x[order], f"{split}_y": y[order]})
