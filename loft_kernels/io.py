"""Checkpoint files: written atomically, loaded safely.

A checkpoint is written to a temporary file in the same directory, flushed to
disk and renamed over the target, so a crash mid-write never leaves a truncated
file where a good one was. The file gets the permissions a plain `open(path,
"w")` would give it: those of the file it replaces, or 0o666 less the umask. Loading uses `weights_only=True` and names the file
in every error: a missing path is a FileNotFoundError, anything else that makes
the file unreadable (a directory, truncation, a foreign format, a forbidden
pickled object) is a `CheckpointError`.
"""
from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

import torch


def atomic_write(path: str | os.PathLike, write, mode: str = "wb") -> Path:
    """Call `write(file)` on a temp file beside `path`, fsync it and rename it over `path`.

    The one implementation of atomic writing; the helpers below are thin uses of it.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    if not os.fspath(path):
        raise ValueError("path must name a file, got an empty path")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, mode) as f:
            if path.is_file():  # keep the permissions of the file being replaced, as open(path, "w") does
                os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _create_temp(path: Path) -> tuple[int, str]:
    """A new temp file beside `path`, created with mode 0o666 so the kernel applies the umask (mkstemp uses 0o600)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:  # another writer's temp file of the same name: draw another
            continue
    raise FileExistsError(f"no free temporary file name beside {str(path)!r}")


def existing_ancestor(path: str | os.PathLike) -> Path:
    """`path` (made absolute) if it exists, else its nearest existing parent."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: str | os.PathLike) -> None:
    """Fail now, with an OSError saying why, if `atomic_write(path, ...)` would fail for lack of a place to write.

    For commands that write their result only after long work: a directory or
    file in the way, or a folder that cannot be written (probed by creating and
    removing a temp file, so read-only filesystems and root are judged right).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path).absolute()
    if path.is_dir():
        raise IsADirectoryError(f"{str(path)!r} is a directory")
    base = existing_ancestor(path.parent)  # atomic_write creates the missing folders
    if not base.is_dir():
        raise NotADirectoryError(f"{str(base)!r} is a file, not a directory")
    try:
        fd, tmp = _create_temp(base / path.name)
    except OSError as exc:
        raise type(exc)(f"the folder {str(base)!r} is not writable ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(tmp)


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """torch.save `obj` to `path` atomically (temp file + fsync + rename)."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    """Write a text file atomically (reports, configs, metrics)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return atomic_write(path, lambda f: f.write(text), mode="w")


class CheckpointError(ValueError):
    """A checkpoint file exists but cannot be loaded; the message names the file and the cause."""


def load_checkpoint(path: str | os.PathLike, map_location=None):
    """torch.load with weights_only=True; errors name the file (see the module docstring)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    _check_map_location(map_location)
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is a directory, not a checkpoint file")
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if not path.is_file():  # a pipe or a device would block the reader or never end
        raise CheckpointError(f"checkpoint {str(path)!r} is not a regular file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        # torch reports a truncated or foreign file with whatever its unpickler hits first (EOFError, KeyError,
        # IndexError, struct.error, UnpicklingError, RuntimeError from the zip reader...), never naming the file.
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else "no detail"
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be loaded (truncated, not written by torch.save, "
                              f"or holding objects other than tensors and plain containers): "
                              f"{type(exc).__name__}: {detail}") from exc


def _check_map_location(value) -> None:
    """What torch.load accepts as map_location, checked before the file is read (its errors would blame the file)."""
    if value is None or isinstance(value, (torch.device, dict)) or callable(value):
        return
    if not isinstance(value, str):
        raise TypeError(f"map_location must be None, a device (str or torch.device), a dict or a callable, "
                        f"got {type(value).__name__}")
    try:
        torch.device(value)
    except RuntimeError:
        raise ValueError(f"map_location must name a device such as 'cpu' or 'cuda:0', got {value!r}") from None
