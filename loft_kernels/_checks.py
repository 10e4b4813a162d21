"""Argument validation shared by every public function.

Each helper raises TypeError (wrong kind of object or dtype) or ValueError
(wrong value, shape, range) with a message that names the argument, so callers
learn which of their inputs is wrong and what was expected.
"""
from __future__ import annotations

import contextlib
import contextvars
import numbers
from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
_SMALL_INDEX = 4096  # CPU index sets up to this many entries are checked as Python ints
INT64_MAX = 2 ** 63 - 1  # the largest int the kernels take (a C++ int64)


def memory_format(value, name: str):
    """None or a torch.memory_format (e.g. torch.channels_last)."""
    if value is not None and not isinstance(value, torch.memory_format):
        raise TypeError(f"{name} must be None or a torch.memory_format (e.g. torch.channels_last), "
                        f"got {type(value).__name__}")
    return value


def tensor(value, name: str, *, ndim: int | Sequence[int] | None = None, floating: bool = False) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.dim() not in allowed:
            want = " or ".join(f"{d}-D" for d in allowed)
            raise ValueError(f"{name} must be {want}, got shape {tuple(value.shape)}")
    if floating and value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {value.dtype}")
    return value


def same_device_dtype(ref: torch.Tensor, ref_name: str, other: torch.Tensor, name: str, *, dtype: bool = True) -> None:
    if other.device != ref.device:
        raise ValueError(f"{name} is on {other.device} but {ref_name} is on {ref.device}; they must be on the same device")
    if dtype and other.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {other.dtype} but {ref_name} has {ref.dtype}; they must match")


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake  # deferred: a heavy import most runs never need
    return is_fake(t)


def index(value, name: str, size: int, device: torch.device, *, ndim: int = 1, distinct: bool = True) -> torch.Tensor:
    """Validate an index tensor over `size` entries; returns it as int64 on `device`.

    With ndim=2 every row is a separate index set (rows may overlap).
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer indices, got {type(value).__name__}")
    if value.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must have an integer dtype, got {value.dtype}")
    if value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but must be on {device}, the device of the data it indexes")
    if value.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(value.shape)}")
    if torch.compiler.is_compiling() or value.device.type == "meta" or (type(value) is not torch.Tensor
                                                                         and _is_fake(value)):
        # Range and duplicate checks read the values (a host sync and a graph break);
        # inside a compiled graph, and for meta/fake tensors (no values), only the static checks above apply.
        return value.long().contiguous()
    value = value.long()
    rows = value.reshape(-1, value.shape[-1])
    # A partial conv's index set is a few hundred entries: reading them as Python ints costs a few
    # microseconds, where the tensor ops (min, max, sort, compare) cost tens per call.
    listed = rows.tolist() if value.device.type == "cpu" and value.numel() <= _SMALL_INDEX else None
    if listed is not None:
        lo, hi = min(map(min, listed)), max(map(max, listed))
    else:
        lo, hi = int(value.min()), int(value.max())
    if lo < 0:
        raise ValueError(f"{name} has a negative entry ({lo}); indices must lie in [0, {size})")
    if hi >= size:
        raise ValueError(f"{name} has entry {hi}, out of range for size {size}; indices must lie in [0, {size})")
    if distinct:
        if listed is not None:
            duplicate = any(len(set(r)) != len(r) for r in listed)
        else:
            sorted_rows = rows.sort(dim=1).values
            duplicate = bool((sorted_rows[:, 1:] == sorted_rows[:, :-1]).any())
        if duplicate:
            raise ValueError(f"{name} has duplicate entries; each index must appear at most once" +
                             (" per row" if ndim == 2 else ""))
    return value.contiguous()


_CHECKED = contextvars.ContextVar("loft_kernels_arguments_checked", default=False)


@contextlib.contextmanager
def checked_arguments():
    """Around a public function's call of its custom op, after it checked the arguments: the op need not check
    them again. Not while compiling (the public checks skip the values then, so the op must check them)."""
    if torch.compiler.is_compiling():
        yield
        return
    token = _CHECKED.set(True)
    try:
        yield
    finally:
        _CHECKED.reset(token)


def arguments_checked() -> bool:
    """Inside a custom op: whether the public function that called it has checked its arguments."""
    return _CHECKED.get()


def index_in_op(value, name: str, size: int, *, ndim: int = 1):
    """An index as a custom op's kernel receives it, where the public function's checks may not have run (in a
    compiled graph, which cannot read values while tracing, and for a direct `torch.ops.loft_kernels` call):
    int64 and contiguous, as the kernels read it, with its range and duplicates checked on a CPU (on a GPU that
    would cost a host sync per call, so there only its shape is)."""
    if value is None:
        return None
    if value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(value.shape)}")
    if value.device.type == "cpu" and not arguments_checked():
        return index(value, name, size, value.device, ndim=ndim)
    return value.long().contiguous()


def pair(value, name: str, *, minimum: int) -> tuple[int, int]:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got bool")
    if isinstance(value, numbers.Integral):
        value = (int(value), int(value))
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value):
        value = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if max(value) > INT64_MAX:
        raise ValueError(f"{name} must be <= 2**63 - 1, got {value}")
    return value


def positive_int(value, name: str, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if value > INT64_MAX:
        raise ValueError(f"{name} must be <= 2**63 - 1, got {value}")
    return int(value)


def non_negative_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


def ratio(value, name: str = "ratio") -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(value).__name__}")
    value = float(value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must lie in [0, 1), got {value}")
    return value


def tensor_list(value, name: str, *, floating: bool = False, min_ndim: int = 0) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor) or not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list of tensors, got {type(value).__name__}")
    if len(value) == 0:
        raise ValueError(f"{name} must not be empty")
    out = []
    for i, t in enumerate(value):
        t = tensor(t, f"{name}[{i}]", floating=floating)
        if t.dim() < min_ndim:
            raise ValueError(f"{name}[{i}] must have at least {min_ndim} dimension(s), got shape {tuple(t.shape)}")
        out.append(t)
    return out



def has_internal_overlap(value: torch.Tensor) -> bool:
    """True if two elements of `value` are the same memory location (an expanded or overlapping view)."""
    dims = sorted((st, sz) for st, sz in zip(value.stride(), value.shape) if sz > 1)
    if any(st == 0 for st, _ in dims):
        return True
    reach = 0  # largest offset reachable with the smaller-stride dims
    for st, sz in dims:
        if st <= reach:
            break
        reach += st * (sz - 1)
    else:
        return False
    # Interleaved strides (only from as_strided): count the distinct element offsets.
    offsets = torch.zeros((), dtype=torch.int64)
    for st, sz in dims:
        offsets = (offsets.unsqueeze(-1) + torch.arange(sz) * st).reshape(-1)
    return offsets.unique().numel() < offsets.numel()


def writable(value: torch.Tensor, name: str) -> None:
    """Reject a destination whose elements share memory (e.g. `torch.zeros(1, 3).expand(8, 3)`).

    Writing through such a view would silently keep only one of the writes to a
    shared location; torch's own in-place ops refuse it the same way.
    """
    if has_internal_overlap(value):
        raise ValueError(f"{name} has elements that share memory (an expanded or overlapping view, strides "
                         f"{tuple(value.stride())} for shape {tuple(value.shape)}), so it cannot be written to; "
                         f"pass a tensor that owns its memory (e.g. .clone())")
