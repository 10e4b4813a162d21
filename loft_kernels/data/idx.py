"""MNIST, Fashion-MNIST and KMNIST from the four standard idx files (optionally gzip-compressed).

A directory holds train-images-idx3-ubyte, train-labels-idx1-ubyte,
t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte, each possibly with a .gz
suffix (Debian's dataset-fashion-mnist ships the .gz files in
/usr/share/datasets/fashion-mnist/, the default directory for fashion-mnist).
Every file is checked completely (gzip stream, magic number, dimensions,
length, label range, image/label counts) before any tensor is built, so a bad
file gives an error naming it and nothing half-loaded is returned.
"""
from __future__ import annotations

import contextlib
import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from .. import _checks as C
from ..io import atomic_write
from ._base import Dataset, normalised

IDX_DATASETS = ("mnist", "fashion-mnist", "kmnist")
DEFAULT_DIRS = {"fashion-mnist": "/usr/share/datasets/fashion-mnist"}
HOW_TO_GET = {"fashion-mnist": "install Debian/Ubuntu's package (as root: apt-get install -y dataset-fashion-mnist), "
                               "which puts them in /usr/share/datasets/fashion-mnist/, or pass that directory"}
IMAGE_SIZE, NUM_CLASSES = (28, 28), 10
SPLITS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_UBYTE = 0x08  # the idx element-type code of unsigned bytes


def _locate(root: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    return None


def idx_dir(name: str, data_dir) -> Path:
    """The directory of dataset `name` that holds all four idx files, or a clear error saying what is missing."""
    if data_dir is None:
        if name not in DEFAULT_DIRS:
            raise ValueError(f"data_dir is required for dataset {name!r} (datasets are never downloaded): a directory "
                             f"with the four idx files {', '.join(s for pair in SPLITS.values() for s in pair)} "
                             f"(each optionally .gz)")
        data_dir = DEFAULT_DIRS[name]
        if not Path(data_dir).is_dir():
            raise FileNotFoundError(f"{name}: no data_dir given and the default {data_dir} does not exist; the data "
                                    f"are never downloaded: {HOW_TO_GET[name]} as data_dir (--data-dir)")
    if not isinstance(data_dir, (str, os.PathLike)):
        raise TypeError(f"data_dir must be a str or os.PathLike, got {type(data_dir).__name__}")
    root = Path(data_dir)
    stems = [s for pair in SPLITS.values() for s in pair]
    missing = [s for s in stems if _locate(root, s) is None]
    if missing:
        hint = f"; to get them, {HOW_TO_GET[name]}" if name in HOW_TO_GET else " (datasets are never downloaded)"
        raise FileNotFoundError(f"data_dir {str(root)!r} is not a {name} directory in the idx layout: expected "
                                f"{', '.join(stems)} (each optionally .gz); missing {', '.join(missing)}{hint}")
    return root


_GZIP_MAGIC = b"\x1f\x8b"
_DEFLATE_MAX_RATIO = 1032  # deflate never expands a byte stream more than 1032-fold
_CHUNK = 1 << 20
_TRAILING_COUNTED = 1 << 20  # trailing bytes are counted this far, then reported as "more than"


@contextlib.contextmanager
def _open_idx(path: Path):
    """(file, compressed): the gzip stream if the file starts with the gzip magic, whatever its name; else the file.

    Errors of the gzip stream (bad header, corrupt data, cut short, wrong
    checksum) become a ValueError naming the file.
    """
    with open(path, "rb") as f:
        compressed = f.read(2) == _GZIP_MAGIC
        f.seek(0)
        if not compressed and path.suffix == ".gz":
            raise ValueError(f"{path} is not a gzip file (it does not start with the gzip magic bytes 1f 8b)")
        try:
            if compressed:
                with gzip.GzipFile(fileobj=f, mode="rb") as g:
                    yield g, True
            else:
                yield f, False
        except (OSError, EOFError, zlib.error) as exc:
            if not compressed:
                raise
            raise ValueError(f"{path} is not a valid gzip file ({type(exc).__name__}: {exc})") from None


def _read_up_to(f, n: int) -> bytearray:
    """At most n bytes of f, read in chunks: memory follows what the file holds, not what it claims."""
    buf = bytearray()
    while len(buf) < n:
        chunk = f.read(min(_CHUNK, n - len(buf)))
        if not chunk:
            break
        buf += chunk
    return buf


def read_idx(path, ndim: int, item_shape: tuple[int, ...] = ()) -> np.ndarray:
    """The uint8 array of an idx file with `ndim` dimensions whose trailing ones equal `item_shape`.

    Raises ValueError naming the file for a bad gzip stream, wrong magic number
    or element type, wrong dimensions, truncated data or trailing bytes. The
    header is checked first (a claim no file of this size can hold is refused
    at once) and never more than the data it announces is decompressed, plus at
    most 1 MiB to count trailing bytes, so a small file that claims or expands
    to gigabytes is refused without using that memory.
    """
    path = Path(path)
    size = path.stat().st_size
    with _open_idx(path) as (f, compressed):
        head = _read_up_to(f, 4 + 4 * ndim)
        dims, header = _check_header(path, head, ndim, item_shape)
        count = math.prod(dims)
        shape = f"{' x '.join(map(str, dims))} = " if ndim > 1 else ""
        # Claims no file of this size can hold are refused before reading any data.
        limit = size * _DEFLATE_MAX_RATIO if compressed else size - header
        if count > limit:
            if compressed:
                raise ValueError(f"{path} announces {shape}{count} bytes of data in its header, more than a "
                                 f"{size}-byte gzip file can hold (deflate expands at most {_DEFLATE_MAX_RATIO}-fold)")
            raise ValueError(f"{path} is truncated: its header announces {shape}{count} bytes of data but it holds "
                             f"{limit}")
        data = _read_up_to(f, count)
        if len(data) < count:
            raise ValueError(f"{path} is truncated: its header announces {shape}{count} bytes of data but it holds "
                             f"{len(data)}")
        # Reading on to the end also checks the gzip checksum; a plain file's size says it exactly.
        extra = len(_read_up_to(f, _TRAILING_COUNTED + 1)) if compressed else size - header - count
    if extra:
        many = f"more than {_TRAILING_COUNTED}" if extra > _TRAILING_COUNTED else str(extra)
        raise ValueError(f"{path} has {many} bytes after the {count} bytes of data its header announces")
    return np.frombuffer(data, np.uint8).reshape(dims)


def _check_header(path: Path, head: bytes, ndim: int, item_shape) -> tuple[tuple[int, ...], int]:
    """The dimensions in the idx header `head` and the header's length, or a ValueError naming the fault."""
    want = (_UBYTE << 8) | ndim
    if len(head) < 4:
        raise ValueError(f"{path} is too short ({len(head)} bytes) for an idx header")
    magic = int.from_bytes(head[:4], "big")
    if magic != want:
        raise ValueError(f"{path} has the wrong magic number {magic:#010x}; expected {want:#010x} "
                         f"(an idx file of unsigned bytes with {ndim} dimension{'s' * (ndim > 1)})")
    header = 4 + 4 * ndim
    if len(head) < header:
        raise ValueError(f"{path} is truncated: {len(head)} bytes, shorter than its {header}-byte header")
    dims = struct.unpack(f">{ndim}I", head[4:header])
    if tuple(dims[1:]) != tuple(item_shape):
        raise ValueError(f"{path} has dimensions {' x '.join(map(str, dims))}; expected N"
                         + "".join(f" x {d}" for d in item_shape))
    return dims, header


def _split(root: Path, split: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    images_path, labels_path = (_locate(root, s) for s in SPLITS[split])
    images = read_idx(images_path, 3, IMAGE_SIZE)
    labels = read_idx(labels_path, 1)
    if len(images) != len(labels):
        raise ValueError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels")
    if len(images) == 0:
        raise ValueError(f"{images_path} holds no images")
    if labels.max() >= num_classes:
        bad = int(np.argmax(labels >= num_classes))
        raise ValueError(f"{labels_path} has label {int(labels[bad])} at index {bad}; labels must lie in "
                         f"[0, {num_classes})")
    return images, labels


def load_idx_dataset(name: str, data_dir=None) -> Dataset:
    """Dataset `name` (one of IDX_DATASETS) from the idx files in `data_dir` (see the module docstring)."""
    root = idx_dir(name, data_dir)
    (tr_x, tr_y), (te_x, te_y) = (_split(root, s, NUM_CLASSES) for s in SPLITS)

    def tensors(x, y):
        return torch.from_numpy(x.astype(np.float32)).unsqueeze(1), torch.from_numpy(y.astype(np.int64))

    return normalised(name, *tensors(tr_x, tr_y), *tensors(te_x, te_y), NUM_CLASSES, augment=False)


def write_idx(path, array: np.ndarray, *, compress: bool | None = None) -> Path:
    """Write a uint8 array as an idx file (gzip-compressed if compress, default: when `path` ends in .gz)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    array = np.asarray(array)
    if array.dtype != np.uint8 or not 1 <= array.ndim <= 255:
        raise ValueError(f"array must be a uint8 array with 1 to 255 dimensions, got {array.dtype} "
                         f"with shape {array.shape}")
    path = Path(path)
    data = struct.pack(f">I{array.ndim}I", (_UBYTE << 8) | array.ndim, *array.shape) + array.tobytes()
    if path.suffix == ".gz" if compress is None else compress:
        data = gzip.compress(data, mtime=0)
    return atomic_write(path, lambda f: f.write(data))


def write_fake_idx(directory, n_train: int, n_test: int, *, compress: bool = True, seed: int = 0) -> Path:
    """Write a tiny learnable MNIST-layout directory (28x28 images, 10 classes); returns its path.

    Each class is a bright horizontal bar at its own height plus noise, so a
    small model can learn it. For tests and CI of the idx loaders and the CLI.
    """
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory must be a str or os.PathLike, got {type(directory).__name__}")
    n_train, n_test = C.positive_int(n_train, "n_train"), C.positive_int(n_test, "n_test")
    rng = np.random.default_rng(C.non_negative_int(seed, "seed"))
    root = Path(directory)
    suffix = ".gz" if compress else ""
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.permutation(np.arange(n) % NUM_CLASSES).astype(np.uint8)
        images = rng.normal(40, 25, size=(n, *IMAGE_SIZE))
        for i, c in enumerate(labels):
            images[i, 2 + 2 * int(c):4 + 2 * int(c), 4:24] += 180
        images_stem, labels_stem = SPLITS[split]
        write_idx(root / (images_stem + suffix), np.clip(images, 0, 255).astype(np.uint8))
        write_idx(root / (labels_stem + suffix), labels)
    return root
