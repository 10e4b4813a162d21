"""The `triton` backend: Triton kernels for every op (one module per op family).

Runs on CUDA tensors, or on CPU tensors in Triton's numpy interpreter when
TRITON_INTERPRET=1 is set before this module is imported (Triton decides at
kernel-definition time whether to compile or interpret). Under the interpreter
only float32/float64 arithmetic is reliable, so the arithmetic ops register
those dtypes only there; see `_common.FLOAT_DTYPES`.

Modules: `conv` (implicit-GEMM partial and grouped partial convolution,
forward and backward), `stats` (segmented per-filter norms and statistics),
`ranking` (footrule and mask-distance matrices), `packing` (pack/unpack rows).
"""
from __future__ import annotations

import torch

try:
    import triton  # noqa: F401
    _IMPORT_ERROR = None
except Exception as exc:  # a missing or broken triton makes the backend unavailable, not the package
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


def unavailable_reason() -> str | None:
    """None when the kernels can run here: triton imports and a GPU is present or the interpreter is on."""
    if _IMPORT_ERROR is not None:
        return f"triton cannot be imported ({_IMPORT_ERROR})"
    from ._common import INTERPRET
    if INTERPRET or torch.cuda.is_available():
        return None
    return "no CUDA GPU is available and TRITON_INTERPRET=1 (Triton's CPU interpreter) is not set"


if _IMPORT_ERROR is None:
    from . import conv, packing, ranking, stats  # noqa: F401,E402  (importing registers the impls)
