"""The `triton` backend: Triton kernels for every op (one module per op family).

Runs on CUDA tensors, or on CPU tensors in Triton's numpy interpreter when
TRITON_INTERPRET=1 is set before this module is imported (Triton decides at
kernel-definition time whether to compile or interpret). Under the interpreter
only float32/float64 arithmetic is reliable, so the arithmetic ops register
those dtypes only there; see `_common.FLOAT_DTYPES`.

Modules, one per op family: `partial_conv` (implicit-GEMM partial and grouped
partial convolution, forward and backward), `filter_stats` (segmented
per-filter norms and statistics), `ranking` (footrule and mask-distance
matrices), `packing` (pack/unpack rows). The registry finds each op under its
name here (see ..table).
"""
from __future__ import annotations

import importlib

import torch

from ..._optional import missing_message
from .. import table

try:
    import triton  # noqa: F401
    _IMPORT_ERROR = None
except Exception as exc:  # a missing or broken triton makes the backend unavailable, not the package
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] == "triton":
        _IMPORT_ERROR += "; " + missing_message("triton")


def unavailable_reason() -> str | None:
    """None when the kernels can run here: triton imports and a GPU is present or the interpreter is on."""
    if _IMPORT_ERROR is not None:
        return f"triton cannot be imported ({_IMPORT_ERROR})"
    from ._common import INTERPRET
    if INTERPRET or torch.cuda.is_available():
        return None
    return "no CUDA GPU is available and TRITON_INTERPRET=1 (Triton's CPU interpreter) is not set"


def implementation(name: str):
    """Op `name` from the module of its family (table.OPS)."""
    return getattr(importlib.import_module(f".{table.BY_NAME[name].family}", __name__), name)


if _IMPORT_ERROR is None:
    from ._common import FLOAT_DTYPES as _FLOAT_DTYPES  # noqa: E402
    from .packing import PACK_DTYPES as _PACK_DTYPES  # noqa: E402

    DTYPE_CLASSES = {table.TRITON_FLOAT: _FLOAT_DTYPES, table.TRITON_WORDS: _PACK_DTYPES}
