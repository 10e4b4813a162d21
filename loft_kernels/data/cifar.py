"""CIFAR-10/100 in the standard python-pickle layout (read without running code from the files), and tiny fakes."""
from __future__ import annotations

import io
import math
import os
import pickle
import pickletools
from pathlib import Path

import numpy as np
import torch

from .. import _checks as C
from ..io import atomic_write
from ._base import Dataset, normalised

_CIFAR = {  # name -> (train files, test file, label key, classes, standard sub-folder)
    "cifar10": ([f"data_batch_{i}" for i in range(1, 6)], "test_batch", b"labels", 10, "cifar-10-batches-py"),
    "cifar100": (["train"], "test", b"fine_labels", 100, "cifar-100-python"),
}


_NUMPY_RECONSTRUCT = np.empty(0).__reduce__()[0]  # numpy's own array rebuilder, whatever module holds it


class _NdarrayName:
    """What a batch file gets for `numpy.ndarray`: a name to pass to numpy's rebuilder, not a constructor to call
    (numpy.ndarray(shape, dtype, buffer, offset, strides) would let a few bytes pose as gigabytes)."""

    def __call__(self, *args, **kwargs):
        raise pickle.UnpicklingError("numpy.ndarray(...) calls are not allowed in a CIFAR batch file (only "
                                     "arrays pickled by numpy)")


_NDARRAY = _NdarrayName()


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts/lists/bytes/numbers and numpy arrays, nothing else (no code from the file runs).

    Every array is either a view of bytes from the file or, through numpy's
    rebuilder, allocated against a budget of `budget` bytes (the file's size),
    so a small file cannot make the loader allocate much more than itself.
    """
    _REBUILDERS = {"numpy.core.multiarray", "numpy._core.multiarray"}
    _FROMBUFFER = {"numpy.core.numeric", "numpy._core.numeric"}

    def __init__(self, file, budget: int):
        super().__init__(file, encoding="bytes")
        self._budget = budget

    def find_class(self, module, name):
        if (module, name) == ("numpy", "ndarray"):
            return _NDARRAY
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        if (module, name) == ("_codecs", "encode"):  # how protocol 2 stores bytes under Python 3
            return _latin1
        if (module, name) in (("__builtin__", "bytes"), ("builtins", "bytes")):  # ... and an empty bytes
            return _empty_bytes
        if name == "_reconstruct" and module in self._REBUILDERS:
            return self._reconstruct
        if name == "_frombuffer" and module in self._FROMBUFFER:  # a view of bytes read from the file
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch file")

    def _reconstruct(self, subtype, shape, dtype):
        if subtype is not _NDARRAY:
            raise pickle.UnpicklingError("numpy's array rebuilder may only rebuild numpy.ndarray")
        if not isinstance(shape, tuple) or not all(type(d) is int and d >= 0 for d in shape):
            raise pickle.UnpicklingError(f"an array shape must be a tuple of sizes >= 0, got {shape!r}")
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        self._budget -= nbytes
        if self._budget < 0:  # numpy itself always rebuilds from an empty array and fills it from the file
            raise pickle.UnpicklingError(f"an array of shape {shape} and dtype {dtype} ({nbytes} bytes) is more "
                                         f"than the file can describe")
        return _NUMPY_RECONSTRUCT(np.ndarray, shape, dtype)


def _check_opcodes(raw: bytes) -> None:
    """Refuse a pickle whose opcodes would make the unpickler allocate what the file does not hold.

    Walking the opcodes checks every counted length against the bytes present
    (the unpickler allocates the announced length before reading), and a memo
    index must not exceed the opcodes so far (the unpickler grows its memo to
    the index: a 10-byte file could otherwise claim gigabytes).
    """
    for count, (op, arg, _) in enumerate(pickletools.genops(io.BytesIO(raw))):
        if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and arg > count:
            raise pickle.UnpicklingError(f"memo index {arg} at opcode {count} is out of range")


def _latin1(text, encoding):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode is only allowed for latin1 text, got {encoding!r}")
    return text.encode("latin1")


def _empty_bytes(*args):
    if args:  # bytes(n) would allocate n bytes the file never held
        raise pickle.UnpicklingError("bytes(...) with arguments is not allowed in a CIFAR batch file")
    return b""


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
        raw = path.read_bytes()
        _check_opcodes(raw)
        batch = _ArrayUnpickler(io.BytesIO(raw), budget=len(raw)).load()
    except Exception as exc:
        raise ValueError(f"cannot read {path}: {type(exc).__name__}: {exc}; {what}") from None
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        keys = sorted(map(repr, batch)) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"{what}; found {keys}")
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        found = f"{data.dtype} with shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{what}; b'data' is {found}")
    labels = _labels(batch[label_key], num_classes, what)
    if len(labels) != len(data):
        raise ValueError(f"{what}; there are {len(labels)} labels for {len(data)} images")
    return data, labels


def _labels(labels, num_classes: int, what: str) -> np.ndarray:
    """The int64 array of a list of ints (the CIFAR layout) or a 1-D integer array in [0, num_classes)."""
    if isinstance(labels, np.ndarray):
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{what}; the labels are {labels.dtype} with shape {labels.shape}, not a list of ints "
                             f"or a 1-D integer array")
    elif not isinstance(labels, list):
        raise ValueError(f"{what}; the labels are a {type(labels).__name__}, not a list of ints")
    else:  # nothing nested: numpy would otherwise expand shared sublists or fail past 64 levels
        bad = next((i for i, v in enumerate(labels) if type(v) is not int), None)
        if bad is not None:
            raise ValueError(f"{what}; the labels hold a {type(labels[bad]).__name__} at index {bad}, not an int")
    if len(labels):
        lo, hi = (int(labels.min()), int(labels.max())) if isinstance(labels, np.ndarray) else (min(labels),
                                                                                                 max(labels))
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"{what}; labels range over [{lo}, {hi}]")
    return np.asarray(labels).astype(np.int64)


def load_cifar(name: str, data_dir) -> Dataset:
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
    return normalised(name, train_x, train_y, images(test[0]), torch.from_numpy(test[1]), classes, augment=True)


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
    seed = C.non_negative_int(seed, "seed")
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
