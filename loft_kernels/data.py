"""Datasets held as tensors, never downloaded, and a seeded, sharded batch loader.

`get_dataset(name, data_dir=None, ...)` returns a `Dataset` (normalised float32
images [N, C, H, W], int64 labels, metadata):
- "digits": scikit-learn's bundled 8x8 handwritten digits (1,797 images,
  10 classes, 1 channel); a fixed stratified 80/20 split (random_state 0).
- "cifar10" / "cifar100": read from `data_dir` in the standard python-pickle
  layout (cifar10: data_batch_1..5, test_batch with b'data', b'labels';
  cifar100: train, test with b'data', b'fine_labels'). `data_dir` may also be
  the folder that holds the extracted `cifar-10-batches-py` / `cifar-100-python`.
  The pickles are read with an unpickler that admits only numpy arrays.
- "synthetic": generated, learnable (a random pattern per class plus noise).

Every dataset is normalised per channel by the training split's mean and std.
`BatchLoader` deals mini-batches deterministically from (seed, epoch, worker,
batch): LoFT's S workers get disjoint shards of each epoch's permutation, and a
run resumed mid-epoch sees exactly the batches (and augmentations) it would
have seen.
"""
from __future__ import annotations

import math
import numbers
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import _checks as C
from .io import atomic_write

DATASETS = ("digits", "cifar10", "cifar100", "synthetic")
_CIFAR = {  # name -> (train files, test file, label key, classes, standard sub-folder)
    "cifar10": ([f"data_batch_{i}" for i in range(1, 6)], "test_batch", b"labels", 10, "cifar-10-batches-py"),
    "cifar100": (["train"], "test", b"fine_labels", 100, "cifar-100-python"),
}


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


def _normalised(name, train_x, train_y, test_x, test_y, num_classes, augment) -> Dataset:
    var, mean = torch.var_mean(train_x, dim=(0, 2, 3), unbiased=False)
    std = var.sqrt().clamp_min(1e-8)
    shape = (1, -1, 1, 1)
    for x in (train_x, test_x):  # in place: CIFAR-10 as float32 is 0.7 GB, no second copy
        x.sub_(mean.view(shape)).div_(std.view(shape))
    return Dataset(name, train_x, train_y.long(), test_x, test_y.long(), num_classes, train_x.shape[1],
                   tuple(train_x.shape[2:]), tuple(mean.tolist()), tuple(std.tolist()), augment)


# ----------------------------------------------------------------- digits ----
def _digits() -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()  # bundled with scikit-learn: no download
    x = bunch.images.astype(np.float32)[:, None]  # [1797, 1, 8, 8], values 0..16
    y = bunch.target.astype(np.int64)
    tr_x, te_x, tr_y, te_y = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    return _normalised("digits", torch.from_numpy(tr_x), torch.from_numpy(tr_y), torch.from_numpy(te_x),
                       torch.from_numpy(te_y), 10, augment=False)


# ------------------------------------------------------------------ CIFAR ----
class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts/lists/bytes/numbers and numpy arrays, nothing else (no code from the file runs)."""
    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
                ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch file")
        return super().find_class(module, name)


def _cifar_dir(data_dir, name: str) -> Path:
    if data_dir is None:
        raise ValueError(f"data_dir is required for dataset {name!r} (datasets are never downloaded)")
    if not isinstance(data_dir, (str, os.PathLike)):
        raise TypeError(f"data_dir must be a str or os.PathLike, got {type(data_dir).__name__}")
    train, test, _, _, sub = _CIFAR[name]
    root = Path(data_dir)
    for cand in (root, root / sub):
        if all((cand / f).is_file() for f in (*train, test)):
            return cand
    missing = [f for f in (*train, test) if not (root / f).is_file()]
    raise FileNotFoundError(f"data_dir {str(root)!r} is not a {name} directory in the python-pickle layout: "
                            f"expected files {', '.join((*train, test))} (in it or in {sub}/); "
                            f"missing {', '.join(missing)}")


def _read_batch(path: Path, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    what = f"{path} must be a pickled dict with b'data' (uint8 [n, 3072]) and {label_key!r} ({num_classes} classes)"
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as exc:
        raise ValueError(f"cannot read {path}: {type(exc).__name__}: {exc}; {what}") from None
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"{what}; found {keys}")
    data, labels = np.asarray(batch[b"data"]), np.asarray(batch[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{what}; b'data' is {data.dtype} with shape {data.shape}")
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{what}; labels have shape {labels.shape} (dtype {labels.dtype}) for {len(data)} images")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{what}; labels range over [{labels.min()}, {labels.max()}]")
    return data, labels.astype(np.int64)


def _cifar(name: str, data_dir) -> Dataset:
    train_files, test_file, label_key, classes, _ = _CIFAR[name]
    root = _cifar_dir(data_dir, name)
    parts = [_read_batch(root / f, label_key, classes) for f in train_files]
    test = _read_batch(root / test_file, label_key, classes)

    def images(data):  # rows are 1024 red, 1024 green, 1024 blue values, each 32 x 32 row-major
        return torch.from_numpy(data).reshape(-1, 3, 32, 32).float()

    train_x = images(np.concatenate([p[0] for p in parts]))
    if train_x.shape[0] == 0:
        raise ValueError(f"{root} holds no training images")
    train_y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    return _normalised(name, train_x, train_y, images(test[0]), torch.from_numpy(test[1]), classes, augment=True)


# -------------------------------------------------------------- synthetic ----
def _synthetic(seed: int, n_train: int = 512, n_test: int = 256, num_classes: int = 4, image_size: int = 8,
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
    return _normalised("synthetic", tr_x, tr_y, te_x, te_y, num_classes, augment=False)


def get_dataset(name: str, data_dir=None, *, seed: int = 0, **options) -> Dataset:
    """Load dataset `name` (one of DATASETS) as tensors; see the module docstring.

    data_dir: required for cifar10/cifar100 only. seed and options
    (n_train, n_test, num_classes, image_size, in_channels, noise) apply to
    "synthetic" only; digits and CIFAR splits are fixed.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a dataset name string, got {type(name).__name__}")
    if name not in DATASETS:
        raise ValueError(f"name must be one of {DATASETS}, got {name!r}")
    seed = C.positive_int(seed, "seed", minimum=0)
    if name == "synthetic":
        return _synthetic(seed, **_only(options, ("n_train", "n_test", "num_classes", "image_size", "in_channels",
                                                  "noise"), name))
    _only(options, (), name)
    if name == "digits":
        return _digits()
    return _cifar(name, data_dir)


def _only(options: dict, allowed: tuple, name: str) -> dict:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"options {unknown} do not apply to dataset {name!r}" +
                        (f"; it accepts {list(allowed)}" if allowed else ""))
    return options


# ----------------------------------------------------------- augmentation ----
def random_crop_flip(x: Tensor, generator: torch.Generator, padding: int = 4) -> Tensor:
    """Standard CIFAR augmentation on a batch [N, C, H, W]: random crop after zero padding, then random h-flip.

    Zero padding is applied to the normalised images (i.e. the mean colour).
    Offsets and flips are drawn from `generator` (a CPU torch.Generator), so
    the result is a function of the generator's state, on any device.
    """
    C.tensor(x, "x", ndim=4)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    padding = C.positive_int(padding, "padding", minimum=0)
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
    """

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False, augment: bool = False, workers: int = 1, device=None):
        C.tensor(x, "x", ndim=4, floating=True)
        C.tensor(y, "y", ndim=1)
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"y must have one label per image ({x.shape[0]}), got {y.shape[0]}")
        for flag, value in (("shuffle", shuffle), ("drop_last", drop_last), ("augment", augment)):
            if not isinstance(value, bool):
                raise TypeError(f"{flag} must be a bool, got {type(value).__name__}")
        self.x, self.y = x, y
        self.batch_size = C.positive_int(batch_size, "batch_size")
        self.seed = C.positive_int(seed, "seed", minimum=0)
        self.workers = C.positive_int(workers, "workers")
        self.shuffle, self.drop_last, self.augment = shuffle, drop_last, augment
        self.device = None if device is None else torch.device(device)
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
        epoch = C.positive_int(epoch, "epoch", minimum=0)
        worker = C.positive_int(worker, "worker", minimum=0)
        if worker >= self.workers:
            raise ValueError(f"worker must lie in [0, {self.workers}), got {worker}")
        start = C.positive_int(start, "start", minimum=0)
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
            yield xb, yb


# ------------------------------------------------------- fake CIFAR files ----
def _atomic_pickle(obj, path: Path) -> None:
    # protocol 2, as the original python-2 CIFAR files
    atomic_write(path, lambda f: pickle.dump(obj, f, protocol=2))


def write_fake_cifar(directory, n_train: int, n_test: int, num_classes: int = 10, *, seed: int = 0) -> Path:
    """Write a tiny CIFAR-format directory (for tests and CI of the CIFAR recipes); returns its path.

    num_classes 10 writes cifar10's data_batch_1..5 + test_batch (+ batches.meta),
    100 writes cifar100's train + test (+ meta). Images are 32x32x3 uint8: a
    per-class colour and stripe pattern plus noise, so a model can learn them.
    """
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory must be a str or os.PathLike, got {type(directory).__name__}")
    n_train, n_test = C.positive_int(n_train, "n_train"), C.positive_int(n_test, "n_test")
    if isinstance(num_classes, bool) or num_classes not in (10, 100):
        raise ValueError(f"num_classes must be 10 (cifar10) or 100 (cifar100), got {num_classes!r}")
    seed = C.positive_int(seed, "seed", minimum=0)
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 216, size=(num_classes, 3, 1, 1))
    stripes = (np.arange(32)[None, :] * (1 + np.arange(num_classes)[:, None] % 7)) % 32 < 16  # [classes, 32]

    def make(n):
        labels = rng.permutation(np.arange(n) % num_classes)
        img = base[labels] + 30 * stripes[labels][:, None, None, :] + rng.normal(0, 20, size=(n, 3, 32, 32))
        return np.clip(img, 0, 255).astype(np.uint8).reshape(n, 3072), [int(v) for v in labels]

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    if num_classes == 10:
        data, labels = make(n_train)
        for i, part in enumerate(np.array_split(np.arange(n_train), 5), 1):
            _atomic_pickle({b"batch_label": f"training batch {i} of 5".encode(), b"data": data[part],
                            b"labels": [labels[j] for j in part]}, root / f"data_batch_{i}")
        data, labels = make(n_test)
        _atomic_pickle({b"batch_label": b"testing batch 1 of 1", b"data": data, b"labels": labels},
                       root / "test_batch")
        _atomic_pickle({b"label_names": [f"class{i}".encode() for i in range(10)]}, root / "batches.meta")
    else:
        for split, n in (("train", n_train), ("test", n_test)):
            data, labels = make(n)
            _atomic_pickle({b"data": data, b"fine_labels": labels, b"coarse_labels": [v // 5 for v in labels]},
                           root / split)
        _atomic_pickle({b"fine_label_names": [f"class{i}".encode() for i in range(100)]}, root / "meta")
    return root
