"""Argument checks shared by the model zoo constructors (width multiplier, block counts, common arguments)."""
from __future__ import annotations

import math
import numbers

from . import _checks as C


def _width(width) -> float:
    if isinstance(width, bool) or not isinstance(width, numbers.Real):
        raise TypeError(f"width must be a positive number, got {type(width).__name__}")
    if not (math.isfinite(width) and width > 0):
        raise ValueError(f"width must be a finite number > 0 (a channel multiplier), got {width}")
    return float(width)


def _scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def _depths(depths, name: str = "depths") -> tuple[int, ...]:
    if not isinstance(depths, (list, tuple)) or not depths:
        raise TypeError(f"{name} must be a non-empty tuple of block counts per stage, got {depths!r}")
    return tuple(C.positive_int(d, f"{name}[{i}]") for i, d in enumerate(depths))


def _common(num_classes, in_channels, width) -> tuple[int, int, float]:
    return (C.positive_int(num_classes, "num_classes"), C.positive_int(in_channels, "in_channels"), _width(width))
