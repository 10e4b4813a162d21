"""The `cuda` backend: csrc/cuda, built into the extension only when torch has CUDA.

Every op of the table is the function of the same name in the extension's
`cuda` submodule, with the signature of its counterpart in `reference.py`:
the partial convolutions (one launch gathers the weight slice of all groups,
cuDNN convolves, the grouped op as one grouped convolution over the batches
stacked along the channels, one launch scatters the weight and bias
gradients), filter_norms/filter_stats (one warp per row over the whole list),
footrule_matrix/mask_distance_matrix (one block per snapshot pair, ranks from
ATen's stable sort) and pack_rows/unpack_rows (one thread per element).
"""
from __future__ import annotations

from .. import _ext


def unavailable_reason() -> str | None:
    skipped = _ext.cuda_skip_reason()
    if skipped is not None:
        return skipped
    reason = _ext.unavailable_reason()
    if reason is not None:
        return reason
    if not _ext.load().with_cuda:
        failed = _ext.cuda_build_failure()
        return (f"the CUDA kernels failed to build ({failed}); the extension was built with its CPU kernels alone"
                if failed else "the extension was built without its CUDA kernels")
    return None


def implementation(name: str):
    """The implementation of op `name`: resolved from the extension on first call."""
    def call(*args):
        return getattr(_ext.load().cuda, name)(*args)
    call.__name__ = call.__qualname__ = name
    return call
