"""Datasets that need no files: scikit-learn's bundled digits and a generated, learnable synthetic set."""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from .. import _checks as C
from .._optional import require
from ._base import Dataset, normalised


def digits() -> Dataset:
    """scikit-learn's bundled 8x8 digits (the `digits` extra installs scikit-learn)."""
    load_digits = require("sklearn.datasets").load_digits
    train_test_split = require("sklearn.model_selection").train_test_split

    bunch = load_digits()  # bundled with scikit-learn: no download
    x = bunch.images.astype(np.float32)[:, None]  # [1797, 1, 8, 8], values 0..16
    y = bunch.target.astype(np.int64)
    tr_x, te_x, tr_y, te_y = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    return normalised("digits", torch.from_numpy(tr_x), torch.from_numpy(tr_y), torch.from_numpy(te_x),
                       torch.from_numpy(te_y), 10, augment=False)


def synthetic(seed: int, n_train: int = 512, n_test: int = 256, num_classes: int = 4, image_size: int = 8,
               in_channels: int = 1, noise: float = 1.0) -> Dataset:
    n_train, n_test = C.positive_int(n_train, "n_train"), C.positive_int(n_test, "n_test")
    num_classes = C.positive_int(num_classes, "num_classes", minimum=2)
    image_size, in_channels = C.positive_int(image_size, "image_size"), C.positive_int(in_channels, "in_channels")
    if isinstance(noise, bool) or not isinstance(noise, numbers.Real) or not 0 <= noise < math.inf:
        raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(num_classes, in_channels, image_size, image_size, generator=g)

    def split(n):
        y = torch.arange(n) % num_classes  # balanced classes, shuffled
        y = y[torch.randperm(n, generator=g)]
        x = patterns[y] + float(noise) * torch.randn(n, in_channels, image_size, image_size, generator=g)
        return x, y

    (tr_x, tr_y), (te_x, te_y) = split(n_train), split(n_test)
    return normalised("synthetic", tr_x, tr_y, te_x, te_y, num_classes, augment=False)


