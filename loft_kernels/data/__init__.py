"""Datasets held as tensors, never downloaded, and a seeded, sharded batch loader.

`get_dataset(name, data_dir=None, ...)` returns a `Dataset` (normalised float32
images [N, C, H, W], int64 labels, metadata):
- "digits": scikit-learn's bundled 8x8 handwritten digits (1,797 images,
  10 classes, 1 channel); a fixed stratified 80/20 split (random_state 0).
- "mnist", "fashion-mnist", "kmnist": 28x28 grey images, 10 classes, read from
  `data_dir` in the standard idx layout (train-images-idx3-ubyte,
  train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte,
  each optionally .gz); fashion-mnist defaults to Debian's
  /usr/share/datasets/fashion-mnist/ (package dataset-fashion-mnist).
- "cifar10" / "cifar100": read from `data_dir` in the standard python-pickle
  layout (cifar10: data_batch_1..5, test_batch with b'data', b'labels';
  cifar100: train, test with b'data', b'fine_labels'). `data_dir` may also be
  the folder that holds the extracted `cifar-10-batches-py` / `cifar-100-python`.
  The pickles are read with an unpickler that admits only numpy arrays.
- "synthetic": generated, learnable (a random pattern per class plus noise).

Every dataset is normalised per channel by the training split's mean and std;
`stratified_subset` keeps a class-balanced part of the training split.
`BatchLoader` deals mini-batches deterministically from (seed, epoch, worker,
batch): LoFT's S workers get disjoint shards of each epoch's permutation, and a
run resumed mid-epoch sees exactly the batches (and augmentations) it would
have seen.
"""
from __future__ import annotations

from .. import _checks as C
from ._base import Dataset, stratified_subset
from .builtin import digits, synthetic
from .cifar import load_cifar, write_fake_cifar
from .idx import IDX_DATASETS, load_idx_dataset, read_idx, write_fake_idx, write_idx
from .loader import BatchLoader, random_crop_flip

DATASETS = ("digits", *IDX_DATASETS, "cifar10", "cifar100", "synthetic")
FILE_DATASETS = (*IDX_DATASETS, "cifar10", "cifar100")  # read from data_dir (fashion-mnist has a default)

__all__ = ["DATASETS", "FILE_DATASETS", "IDX_DATASETS", "Dataset", "BatchLoader", "get_dataset", "random_crop_flip",
           "read_idx", "stratified_subset", "write_fake_cifar", "write_fake_idx", "write_idx"]

_SYNTHETIC_OPTIONS = ("n_train", "n_test", "num_classes", "image_size", "in_channels", "noise")


def get_dataset(name: str, data_dir=None, *, seed: int = 0, **options) -> Dataset:
    """Load dataset `name` (one of DATASETS) as tensors; see the module docstring.

    data_dir: required for mnist, kmnist, cifar10 and cifar100; optional for
    fashion-mnist (default /usr/share/datasets/fashion-mnist). seed and options
    (n_train, n_test, num_classes, image_size, in_channels, noise) apply to
    "synthetic" only; the other splits are fixed.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a dataset name string, got {type(name).__name__}")
    if name not in DATASETS:
        raise ValueError(f"name must be one of {DATASETS}, got {name!r}")
    seed = C.non_negative_int(seed, "seed")
    if data_dir is not None and name in ("synthetic", "digits"):
        raise ValueError(f"data_dir does not apply to dataset {name!r} (it is "
                         f"{'generated' if name == 'synthetic' else 'embedded in scikit-learn'}), got {str(data_dir)!r}")
    if name == "synthetic":
        return synthetic(seed, **_only(options, _SYNTHETIC_OPTIONS, name))
    _only(options, (), name)
    if name == "digits":
        return digits()
    if name in IDX_DATASETS:
        return load_idx_dataset(name, data_dir)
    return load_cifar(name, data_dir)


def _only(options: dict, allowed: tuple, name: str) -> dict:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"options {unknown} do not apply to dataset {name!r}" +
                        (f"; it accepts {list(allowed)}" if allowed else ""))
    return options
